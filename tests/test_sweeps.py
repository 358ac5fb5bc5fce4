"""Sweeps through Hydra's launchers and the Optuna sweeper (issue 6), on tiny data the test writes."""

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from bnexp.jobs.hydra_setup import register_configs
from conftest import CONF_DIR, TINY_OVERRIDES, run_script

SWEEP = [o for o in TINY_OVERRIDES if not o.startswith("threads=")] + ["threads=auto"]


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.parametrize("launcher,threads,why", [
    ("joblib", 1, "per job: joblib runs 2 jobs at once on"),
    ("submitit_local", 1, "per job: submitit starts every job at once"),
])
def test_two_job_sweep_with_each_launcher(tiny_mnist, tmp_path, launcher, threads, why):
    """Both jobs run and write summary.json; dirs are named by override_dirname; threads=auto
    gives each job its share of the cores and its log says why; one 'done' line per job."""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = run_script("-m", *SWEEP, f"data.root={tiny_mnist}", "seed=0,1", f"hydra/launcher={launcher}",
                        *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    runs = summaries(sweep)
    assert len(runs) == 2
    for name, summary in runs.items():
        assert summary["status"] == "completed"
        # override_dirname: key=value of the overrides sorted by key, paths left out
        assert name.startswith("data.val_size=50,data.verify=False,device=cpu,model.widths=[16,16],")
        assert f",seed={summary['seed']},threads=auto," in name and "data.root" not in name
        assert summary["config"]["threads"] == "auto"
        log_text = (sweep / name / "train.log").read_text()
        assert f"torch threads: {threads} (auto: 1," in log_text and why in log_text
    if launcher == "joblib":  # submitit writes job output to .submitit/<id>/ logs instead
        assert (result.stdout + result.stderr).count("done completed: norm=custom") == 2
    else:
        assert list((sweep / ".submitit").glob("*/*_log.out"))


def test_optuna_lr_search_reports_its_best_lr(tiny_mnist, tmp_path):
    """hparams_search=optuna_lr: 2 trials complete; the best lr is the trial with the best val acc."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", *SWEEP,
                        f"data.root={tiny_mnist}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Best parameters" in result.stdout + result.stderr
    runs = list(summaries(sweep).values())
    assert len(runs) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = max(runs, key=lambda s: s["final"]["val_acc"])
    assert best["best_params"]["optim.lr"] == pytest.approx(top["config"]["optim.lr"])
    assert best["best_value"] == pytest.approx(top["final"]["val_acc"])


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_sweep_from_a_dir_holding_a_bnexp_folder(tiny_mnist, tmp_path, launcher):
    """A sweep started where a package named bnexp would shadow ours: submitit starts jobs with
    `python -m`, which puts the working directory first on sys.path; the jobs must not see it.
    (SLURM: tests/test_slurm.py.)"""
    workdir = tmp_path / "work"
    (workdir / "bnexp").mkdir(parents=True)
    (workdir / "bnexp" / "__init__.py").write_text('raise ImportError("the working directory\'s bnexp")\n')
    sweep = tmp_path / "sweep"
    result = run_script("-m", *SWEEP, f"data.root={tiny_mnist}", "seed=0,1", f"hydra/launcher={launcher}",
                        f"hydra.sweep.dir={sweep}", cwd=workdir, timeout=240)
    assert result.returncode == 0, result.stderr
    assert sorted(s["status"] for s in summaries(sweep).values()) == ["completed", "completed"]


def test_slurm_launcher_config_composes():
    """hydra/launcher=slurm is a ready submitit_slurm config: requeue at the time limit on, a
    signal delay that fits a one-minute limit, and a GPU request when asked (jobs: test_slurm.py)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=1"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task == 2 and launcher.gpus_per_node == 1 and launcher.timeout_min == 60
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 10
    assert cfg.hydra.callbacks.launch_setup._target_ == "bnexp.jobs.cluster.LaunchSetup"
