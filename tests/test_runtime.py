"""Thread choice (issue 12): auto = 1 thread below the work-per-op crossover, the job's share of
the cores above it; jobs that run at once never ask for more threads than there are cores."""

import os
import subprocess
import sys

import pytest
from conftest import TINY_OVERRIDES, TRAIN_SCRIPT

from bnexp.run.runtime import (THREADS_CROSSOVER_MACS, available_cores, choose_threads, cores_per_job,
                           work_per_op)


def test_work_per_op_is_the_mean_matmul_of_the_default_mlp():
    """784-100-100-100-10 at batch 60: 60 x (78400 + 10000 + 10000 + 1000) / 4 multiply-adds."""
    assert work_per_op([100, 100, 100], 60) == 60 * (784 * 100 + 100 * 100 * 2 + 100 * 10) // 4
    assert work_per_op([16], 20, inputs=8, classes=2) == 20 * (8 * 16 + 16 * 2) // 2


@pytest.mark.parametrize("jobs,cores,expected", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5),
                                                 (0, 4, 4)])
def test_cores_per_job_never_oversubscribes_with_threads(jobs, cores, expected):
    """n_jobs x threads <= cores whenever there are at least as many cores as jobs; never below 1."""
    share = cores_per_job(jobs, cores)
    assert share == expected
    assert share >= 1 and (jobs > cores or max(jobs, 1) * share <= cores)


def test_default_mlp_gets_one_thread_and_says_why():
    choice = choose_threads("auto", work_per_op([100, 100, 100], 60), 2)
    assert choice.threads == 1
    assert choice.why.startswith("auto: 1, 1.5M multiply-adds per op < crossover")


def test_big_work_gets_the_jobs_share_of_cores():
    """Above the crossover auto takes every core the launcher leaves the job, and names the launcher."""
    big = work_per_op([1024] * 3, 1024)
    assert big >= THREADS_CROSSOVER_MACS
    assert choose_threads("auto", big, 4).threads == 4
    shared = choose_threads("auto", big, 1, "joblib runs 2 jobs at once on 2 cores")
    assert shared.threads == 1 and "1 core(s) per job: joblib runs 2 jobs at once on 2 cores" in shared.why
    assert choose_threads("auto", big).threads == available_cores()


def test_crossover_is_the_boundary():
    assert choose_threads("auto", THREADS_CROSSOVER_MACS - 1, 2).threads == 1
    assert choose_threads("auto", THREADS_CROSSOVER_MACS, 2).threads == 2


def test_explicit_threads_are_kept_and_oversubscription_is_named():
    assert choose_threads("3", 1, 2).threads == 3
    assert choose_threads("1", 10**12, 8).why == "threads=1 as given"
    over = choose_threads("2", 1, 1, "joblib runs 2 jobs at once on 2 cores")
    assert over.threads == 2 and "more than 1 core(s) per job" in over.why


def test_train_script_logs_threads_and_passive_openmp_wait(tiny_mnist, tmp_path):
    """A run through scripts/train.py logs `torch threads: N (why)`; with 2 threads the why shows
    the passive wait policy train.py chose, and OpenMP itself (OMP_DISPLAY_ENV, printed when torch
    loads it) reports no spinning: the policy was in place in time."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("threads=")]
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *overrides, "threads=2", f"data.root={tiny_mnist}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "torch threads: 2 (threads=2 as given; OMP_WAIT_POLICY=PASSIVE)" in log_text
    # GNU OpenMP's default is 300000 spins (as time: docs/results/measurements.md#test-timings)
    assert "GOMP_SPINCOUNT = '0'" in result.stderr


def launcher_share(*overrides: str):
    """cli.threads_per_job() under the Hydra config these overrides compose (launcher included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from bnexp import cli
    from bnexp.jobs.hydra_setup import register_configs
    from conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return cli.threads_per_job()
    finally:
        HydraConfig.instance().cfg = None


def test_launchers_split_the_cores_between_jobs_that_run_at_once():
    """joblib: cores / n_jobs (-1 = one job per core); submitit: cpus_per_task, else 1 (all its
    local jobs start at once); basic: jobs run one after another, each with every core."""
    cores = available_cores()
    assert launcher_share() == (None, "")
    assert launcher_share("hydra/launcher=joblib", "hydra.launcher.n_jobs=2") == (
        cores_per_job(2, cores), f"joblib runs 2 jobs at once on {cores} cores")
    assert launcher_share("hydra/launcher=joblib", "hydra.launcher.n_jobs=-1") == (
        1, f"joblib runs {cores} jobs at once on {cores} cores")
    assert launcher_share("hydra/launcher=submitit_local") == (1, "submitit starts every job at once")
    assert launcher_share("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=2") == (
        2, "submitit cpus_per_task=2")
