"""hydra/launcher=batched end to end, and whole-sweep resume with any launcher (issue 15).

Each test runs scripts/train.py -m as a user would, on tiny IDX data the test writes.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_OVERRIDES, TRAIN_SCRIPT, expected_scalar_tags, run_script

TINY = [o for o in TINY_OVERRIDES if not o.startswith("threads=")]
# Two groups (train.steps differs) of two runs; long enough to be stopped after a checkpoint.
# Checkpoints and evals at different periods: a resume restarts between eval points.
RESUMABLE = [*TINY, "threads=1", "model.widths=[64,64]", "train.eval_every=100", "train.checkpoint_every=70",
             "optim.momentum=0.9", "optim.lr=0.05", "train.steps=100,600", "seed=0,1", "hydra/launcher=batched"]


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def exact(value: float):
    """A scalar as compared bitwise: NaN (summary/steps_to_0.95 when never reached) by name, since NaN != NaN."""
    return "nan" if math.isnan(value) else value


def outcome(run_dir):
    """What must match bitwise: summary metrics, every scalar curve, final params."""
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    curves = {tag: [(e.step, exact(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    params = torch.load(run_dir / "model.pt")
    return ({k: summary[k] for k in ("status", "steps_done", "final", "steps_to_val_acc", "diverged_at_step")},
            curves, {k: v.tolist() for k, v in params.items()})


def assert_same_sweep(a, b):
    names = sorted(p.parent.name for p in a.glob("*/summary.json"))
    assert names == sorted(p.parent.name for p in b.glob("*/summary.json")) and len(names) == 4
    for name in names:
        assert outcome(a / name) == outcome(b / name), name


def start(sweep, data_root, *args):
    """The sweep as a process of its own session, so that a kill reaches its workers too."""
    command = [sys.executable, str(TRAIN_SCRIPT), "-m", *args, f"data.root={data_root}", f"hydra.sweep.dir={sweep}"]
    return subprocess.Popen(command, cwd=sweep.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def stopped_part_way(sweep) -> list[str]:
    """Runs of the sweep with a checkpoint and no summary: stopped before their end."""
    return [p.parent.name for p in sweep.glob("*/checkpoint.pt") if not (p.parent / "summary.json").exists()]


def wait_for(paths_glob, sweep, proc, timeout=240):
    deadline = time.time() + timeout
    while not list(sweep.glob(paths_glob)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no {paths_glob} appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted batched sweep that every stopped-and-resumed sweep must reproduce bitwise."""
    from conftest import write_tiny_mnist

    base = tmp_path_factory.mktemp("reference")
    write_tiny_mnist(base / "data")
    result = run_script("-m", *RESUMABLE, f"data.root={base / 'data'}", f"hydra.sweep.dir={base / 'sweep'}",
                        cwd=base)
    assert result.returncode == 0, result.stderr
    return base


def test_batched_sweep_runs_are_runs_of_their_own(tiny_mnist, tmp_path):
    """Two groups in two worker processes: every job has its dir (named by its overrides),
    .hydra/, log, summary.json, every TensorBoard tag, checkpoint and model.pt; one done line
    each; threads=auto shares the cores between the two group processes."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", *TINY, "threads=auto", f"data.root={tiny_mnist}", "hydra/launcher=batched",
                        "hydra.launcher.n_jobs=2", "norm=none,custom", "seed=0,1", f"hydra.sweep.dir={sweep}",
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "4 jobs in 2 groups (2, 2; max_batch 25), 2 at a time in worker processes" in out
    runs = summaries(sweep)
    assert len(runs) == 4 and out.count("done completed: norm=") == 4
    for name, summary in runs.items():
        run = sweep / name
        assert summary["status"] == "completed" and summary["steps_done"] == 60
        assert f",seed={summary['seed']}," in name and f"norm={summary['norm']}" in name
        assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
        assert (run / "model.pt").exists() and (run / "checkpoint.pt").exists()
        events = EventAccumulator(str(run))
        events.Reload()
        assert set(events.Tags()["scalars"]) == expected_scalar_tags(2, summary["norm"])
        log = (run / "train.log").read_text()
        assert "torch threads: 1 (auto: 1, " in log and "batched launcher runs 2 groups at once" in log
        assert "trained in a batched group of 2)" in log and "done completed" in log
        assert log.count("done completed") == 1  # no other job's lines
    assert not (sweep / ".batched").exists()


def test_optuna_search_through_the_batched_launcher(tiny_mnist, tmp_path):
    """hparams_search=optuna_lr with 2 trials per batch: one group of 2; the best lr is the best trial's."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                        *TINY, "threads=1", f"data.root={tiny_mnist}", "hydra/launcher=batched",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 jobs in 1 group (2; max_batch 25)" in result.stdout + result.stderr
    runs = list(summaries(sweep).values())
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert len(runs) == 2 and best["best_value"] == pytest.approx(max(s["final"]["val_acc"] for s in runs))
    assert any(s["config"]["optim.lr"] == pytest.approx(best["best_params"]["optim.lr"])
               and s["final"]["val_acc"] == pytest.approx(best["best_value"]) for s in runs)  # ties: either


def test_groups_as_submitit_jobs(tiny_mnist, tmp_path):
    """executor=local: each group is a submitit job on this machine; results come back per job."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", *TINY, "threads=auto", f"data.root={tiny_mnist}", "hydra/launcher=batched",
                        "hydra.launcher.executor=local", "hydra.launcher.submitit.cpus_per_task=1",
                        "norm=none,custom", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(summaries(sweep)) == 4 and (result.stdout + result.stderr).count("done completed") == 4
    assert list((sweep / ".submitit").glob("*/*_log.err"))


def test_a_bad_launcher_setting_is_one_line(tiny_mnist, tmp_path):
    result = run_script("-m", *TINY, f"data.root={tiny_mnist}", "hydra/launcher=batched",
                        "hydra.launcher.executor=bogus", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: hydra.launcher.executor='bogus' is not allowed: one of none, local, slurm" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("n_jobs,sweeper", [(1, "basic"), (2, "basic"), (2, "batched_basic")],
                         ids=["in-order", "prepared-in-2-processes", "no-sweeper-pass"])
def test_a_bad_value_in_a_sweep_is_one_line_for_its_first_job(tiny_mnist, tmp_path, n_jobs, sweeper):
    """Jobs are prepared one after another, or in n_jobs forked processes, after the basic
    sweeper composed them or (batched_basic) not: either way the first bad job in sweep order is
    named on one line and nothing trains."""
    sweep = tmp_path / "s"
    result = run_script("-m", *TINY, f"data.root={tiny_mnist}", "hydra/launcher=batched",
                        f"hydra/sweeper={sweeper}", f"hydra.launcher.n_jobs={n_jobs}", "optim.lr=0.1,-1,-2",
                        "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["error: optim.lr=-1.0 is not allowed: a finite number > 0"], result.stderr
    assert not list(sweep.glob("*/summary.json")) and not list(sweep.glob("*/*.pt"))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130),
                                      pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_every_member_and_prints_the_sweep_resume_command(reference, tmp_path, sig, code):
    """Ctrl-C / SIGTERM: members checkpointed (interrupted), groups not begun stay so, exit 128+n,
    and the printed command finishes the sweep bitwise as if never stopped."""
    sweep = tmp_path / "sweep"
    proc = start(sweep, reference / "data", *RESUMABLE)
    wait_for("*/checkpoint.pt", sweep, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr
    assert "interrupted" in [s["status"] for s in summaries(sweep).values()]
    command = stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert f"hydra.sweep.dir={sweep}" in command and "hydra/launcher=batched" in command
    resumed = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_sweep(reference / "sweep", sweep)


def test_a_killed_batched_sweep_resumes_bitwise_and_keeps_finished_runs(reference, tmp_path):
    """kill -9 once the second group has a checkpoint; the same command with the sweep's dir:
    the first group's completed runs are not trained again, the second group resumes, and
    everything ends bitwise as in the uninterrupted sweep."""
    sweep = tmp_path / "sweep"
    proc = start(sweep, reference / "data", *RESUMABLE)
    wait_for("*train.steps=600*/checkpoint.pt", sweep, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {n: s for n, s in summaries(sweep).items() if s["status"] == "completed"}
    assert len(done_before) == 2 and all("train.steps=100" in n for n in done_before)
    result = run_script("-m", *RESUMABLE, f"data.root={reference / 'data'}", f"hydra.sweep.dir={sweep}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("already completed") == 2
    assert all(summaries(sweep)[n] == s for n, s in done_before.items())  # untouched, wall time included
    assert_same_sweep(reference / "sweep", sweep)


@pytest.mark.slow
def test_a_killed_joblib_sweep_resumes_with_the_same_command(reference, tmp_path):
    """Whole-sweep resume with another launcher: kill -9 a joblib sweep (and its workers) once both
    short runs completed and a long one has a checkpoint; the same command with its sweep dir
    keeps the completed runs and resumes the others to the result of an uninterrupted run."""
    sweep = tmp_path / "sweep"
    joblib = [a if a != "hydra/launcher=batched" else "hydra/launcher=joblib" for a in RESUMABLE]
    joblib = [*joblib, "hydra.launcher.n_jobs=2"]
    proc = start(sweep, reference / "data", *joblib)
    # Kill in a state, not at a time: both short runs done and a long one part way (a checkpoint,
    # no summary). Which job finishes when is the scheduler's, so no more is assumed of the rest.
    deadline = time.monotonic() + 240
    while not (len(list(sweep.glob("*train.steps=100*/summary.json"))) == 2 and stopped_part_way(sweep)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never saw both short runs done and a long one part way"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {n for n, s in summaries(sweep).items() if s["status"] == "completed"}
    stopped = stopped_part_way(sweep)
    assert sum("train.steps=100" in n for n in finished) == 2 and stopped
    result = run_script("-m", *joblib, f"data.root={reference / 'data'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = summaries(sweep)
    assert len(runs) == 4 and {s["status"] for s in runs.values()} == {"completed"}
    for name in finished:
        assert "already completed" in (sweep / name / "train.log").read_text()
    name = stopped[0]
    assert "resuming from" in (sweep / name / "train.log").read_text()
    # a solo run resumed: it ends where the same solo run never stopped ends
    alone = tmp_path / "alone"
    args = [a for a in RESUMABLE if not a.startswith(("train.steps=", "seed=", "hydra/"))]
    solo = run_script(*args, "train.steps=600", f"seed={runs[name]['seed']}", f"data.root={reference / 'data'}",
                      f"hydra.run.dir={alone}", cwd=tmp_path)
    assert solo.returncode == 0, solo.stderr
    assert outcome(sweep / name) == outcome(alone)


def test_batched_basic_sweeper_leaves_composition_to_the_batched_launcher_only():
    """hydra/sweeper=batched_basic composes no job config itself before a batched launch (the
    launcher does), and every one before any other launcher's, as Hydra's basic sweeper does."""
    from hydra_plugins.bnexp_batched_launcher.batched_launcher import BatchedLauncher
    from hydra_plugins.bnexp_batched_launcher.sweeper import BatchedBasicSweeper

    class CountingLoader:
        def __init__(self):
            self.composed = []

        def load_sweep_config(self, master_config, sweep_overrides):
            self.composed.append(sweep_overrides)

    batch = [["seed=0"], ["seed=1"], ["seed=2"]]
    for launcher, expected in ((BatchedLauncher(), []), (object(), batch)):
        sweeper = BatchedBasicSweeper(max_batch_size=None, params=None)
        loader = CountingLoader()
        sweeper.launcher, sweeper.config = launcher, {}
        sweeper.hydra_context = type("Context", (), {"config_loader": loader})()
        sweeper.validate_batch_is_legal(batch)
        assert loader.composed == expected


def test_convergence_with_the_batched_launcher_composes():
    """experiment=convergence hydra/launcher=batched: the batched launcher, with the experiment's
    n_jobs=-1 (one group process per core) and the default max_batch of 25."""
    from bnexp.config import PROJECT_ROOT
    from bnexp.jobs.hydra_setup import register_configs
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=convergence", "hydra/launcher=batched"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("BatchedLauncher")
    assert (launcher.n_jobs, launcher.max_batch, launcher.executor) == (-1, 25, "none")


@pytest.mark.slow
def test_workers_checkpoint_and_exit_when_the_launcher_is_killed(tiny_mnist, tmp_path):
    """n_jobs=2: kill -9 the launcher alone; its group workers get SIGTERM (Linux), checkpoint
    every member as interrupted and exit; the same command finishes the sweep."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "threads=1", "model.widths=[64,64]", "train.steps=3000", "train.eval_every=100",
            "train.checkpoint_every=70", "hydra/launcher=batched", "hydra.launcher.n_jobs=2",
            "norm=none,custom", "seed=0,1"]
    proc = start(sweep, tiny_mnist, *args)
    deadline = time.time() + 240
    while len(list(sweep.glob("*/checkpoint.pt"))) < 4:
        assert proc.poll() is None and time.time() < deadline, "no checkpoints appeared"
        time.sleep(0.05)
    proc.kill()  # the launcher only, not its session
    proc.wait()
    deadline = time.time() + 120
    while len(summaries(sweep)) < 4:
        assert time.time() < deadline, "the workers did not stop"
        time.sleep(0.1)
    assert {s["status"] for s in summaries(sweep).values()} == {"interrupted"}
    result = run_script("-m", *args, f"data.root={tiny_mnist}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert {s["status"] for s in summaries(sweep).values()} == {"completed"}


def test_slurm_executor_gets_the_launchers_job_parameters(tmp_path, monkeypatch):
    """executor=slurm builds a submitit SLURM executor (no cluster needed to build it) with the
    config's time, cpus, memory, partition from $BNEXP_SLURM_PARTITION and requeue count.

    submitit's SlurmExecutor refuses to be built where `srun` is not on PATH, though building it
    runs nothing: a stand-in srun first on PATH lets it build anywhere (here and on a cluster),
    and fails loudly should anything run it."""
    from bnexp.config import PROJECT_ROOT
    from bnexp.jobs.hydra_setup import register_configs
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from hydra_plugins.bnexp_batched_launcher._core import make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\necho "srun stand-in of test_sweep_launchers.py: not to be run" >&2\nexit 1\n')
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("BNEXP_SLURM_PARTITION", "debug")
    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=batched", "hydra.launcher.executor=slurm",
                                                       f"hydra.launcher.submitit_folder={tmp_path}/%j"],
                      return_hydra_config=True)
    executor = make_executor(instantiate(cfg.hydra.launcher))
    assert executor.cluster == "slurm"
    params = executor._executor.parameters
    assert (params["time"], params["cpus_per_task"], params["mem"], params["partition"]) == (60, 2, "8GB", "debug")
    assert executor._executor.max_num_timeout == 3
