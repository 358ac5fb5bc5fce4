"""hydra/launcher=slurm on a real one-node SLURM cluster (issue 14).

The module's cluster (munged, slurmctld, slurmd; bnexp/jobs/local_slurm.py) starts once, with its
config, state and logs in a temp dir, and is stopped by pid at the end: jobs cancelled first,
then each daemon SIGTERMed (SIGKILLed if it lingers). It has no accounting (sacct fails), as
many small clusters, and one GPU slot (a real GPU where the machine has one, else a slot with
no device behind it). Skipped only where slurm-wlm/munge are not installed or not root.
"""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.jobs.local_slurm import LocalSlurm, gpu_devices, missing_programs
from conftest import TINY_OVERRIDES, TRAIN_SCRIPT, expected_scalar_tags, run_script
from test_resume import assert_same_outcome

MISSING = missing_programs()
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed here (missing: {', '.join(MISSING)}); "
                                               "apt-get install slurm-wlm munge, as .ci/run does"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the one-node SLURM cluster runs slurmd, which must be root"),
]

# Tiny runs as a SLURM sweep: one CPU per job, so the node's two CPUs run two jobs at once.
SLURM = [o for o in TINY_OVERRIDES if not o.startswith("threads=")] + [
    "threads=auto", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM cluster for this module; stopped by pid even when a test fails."""
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield slurm.start(fake_gpus=0 if gpu_devices() else 1)
    finally:
        slurm.stop()


def shadowing_workdir(tmp_path):
    """A working directory holding a package named bnexp that must never be imported.

    A clone named bnexp (a folder without __init__.py) shadows an editable install only; a
    package shadows anything on PYTHONPATH too, so this case fails wherever the working
    directory reaches sys.path."""
    workdir = tmp_path / "work"
    (workdir / "bnexp").mkdir(parents=True)
    (workdir / "bnexp" / "__init__.py").write_text(
        'raise ImportError("the bnexp folder in the working directory was imported")\n')
    return workdir


def job_logs(sweep) -> str:
    """Every job's stdout and stderr (submitit appends the logs of a requeued job's restarts)."""
    logs = sorted((sweep / ".submitit").glob("*/*_log.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)


def summaries(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def test_sweep_through_slurm_from_a_dir_holding_a_bnexp_folder(cluster, tiny_mnist, tmp_path, monkeypatch):
    """A two-job sweep with hydra/launcher=slurm, started where a folder named bnexp would shadow
    the package: each job gives a run dir with summary.json and TensorBoard events, returns its
    val accuracy to the sweep, logs one done line and the device it got; the missing accounting
    is said once instead of a warning on every poll."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sweep = tmp_path / "sweep"
    result = run_script("-m", *SLURM, f"data.root={tiny_mnist}", "seed=0,1", f"hydra.sweep.dir={sweep}",
                        cwd=shadowing_workdir(tmp_path), env=cluster.env(), timeout=240)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    console = result.stdout + result.stderr
    assert "Bypassing sacct error" not in console
    assert console.count("polling job states with squeue instead") == 1

    runs = summaries(sweep)
    assert sorted(s["seed"] for s in runs.values()) == [0, 1]
    for name, summary in runs.items():
        assert summary["status"] == "completed"
        events = EventAccumulator(str(sweep / name))
        events.Reload()
        assert expected_scalar_tags(2, "custom") <= set(events.Tags()["scalars"])

    results = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    for path in results:  # what the sweeper gets back: the job's final val accuracy
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success"
        assert job_return.return_value == runs[os.path.basename(job_return.hydra_cfg.hydra.runtime.output_dir)]["final"]["val_acc"]

    outs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(outs) == 2
    for out in outs:
        text = out.read_text()
        assert text.count("done completed: norm=custom") == 1
        assert re.search(r"device: cpu \(.*; CUDA_VISIBLE_DEVICES=unset\)", text)  # gpus_per_node=0: no GPU given
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@10" in script and "#SBATCH --time=60" in script


def test_optuna_search_through_slurm(cluster, tiny_mnist, tmp_path):
    """hparams_search=optuna_lr with the SLURM launcher: two trials in one batch; the best lr
    reported is that of the trial with the best val accuracy."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                        *SLURM, f"data.root={tiny_mnist}", f"hydra.sweep.dir={sweep}",
                        cwd=tmp_path, env=cluster.env(), timeout=240)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    assert "Best parameters" in result.stdout + result.stderr
    runs = list(summaries(sweep).values())
    assert len(runs) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = max(runs, key=lambda s: s["final"]["val_acc"])
    assert best["best_params"]["optim.lr"] == pytest.approx(top["config"]["optim.lr"])
    assert best["best_value"] == pytest.approx(top["final"]["val_acc"])


def test_batched_groups_as_slurm_jobs(cluster, tiny_mnist, tmp_path):
    """hydra/launcher=batched with executor=slurm: each group of compatible runs is one SLURM job
    (norm=none and norm=custom, two seeds each: two jobs), every member ends as a run of its own
    (summary.json, TensorBoard events), one done line per member, one result per job."""
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("threads=")]
    result = run_script("-m", *tiny, "threads=auto", "hydra/launcher=batched", "hydra.launcher.executor=slurm",
                        "hydra.launcher.submitit.cpus_per_task=1", "norm=none,custom", "seed=0,1",
                        f"data.root={tiny_mnist}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=cluster.env(),
                        timeout=300)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    runs = summaries(sweep)
    assert sorted((s["config"]["norm.name"], s["seed"]) for s in runs.values()) == [
        ("custom", 0), ("custom", 1), ("none", 0), ("none", 1)]
    assert {s["status"] for s in runs.values()} == {"completed"}
    for name in runs:
        events = EventAccumulator(str(sweep / name))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"]
    assert (result.stdout + result.stderr).count("done completed") == 4
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # two groups, two SLURM jobs


def test_gpu_request_reaches_the_job(cluster, tiny_mnist, tmp_path):
    """gpus_per_node=1: sbatch asks for a GPU, SLURM gives the job one (CUDA_VISIBLE_DEVICES=0),
    and device=auto takes it where torch sees a GPU (here: only where the machine has one)."""
    sweep = tmp_path / "sweep"
    result = run_script("-m", *SLURM, "device=auto", f"data.root={tiny_mnist}", "hydra.launcher.gpus_per_node=1",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=cluster.env(), timeout=240)
    assert result.returncode == 0, result.stderr + job_logs(sweep)
    assert "#SBATCH --gpus-per-node=1" in next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # this process sees every GPU there is
    assert re.search(rf"device: {device} \(auto: .*; CUDA_VISIBLE_DEVICES=0\)", job_logs(sweep))


def test_a_job_cancelled_before_it_ran_ends_the_sweep(cluster, tiny_mnist, tmp_path):
    """A job that ends without a result (here: cancelled while held) ends the sweep with an error
    naming its state; polling sacct alone, the sweep would wait for it forever."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(TRAIN_SCRIPT), "-m", *SLURM, f"data.root={tiny_mnist}",
            "++hydra.launcher.additional_parameters.hold=true", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, **cluster.env()}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job = wait_for_job(cluster, proc, "PENDING")
    cluster.run("scancel", job)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"Job {job} " in stderr and "(state: CANCELLED)" in stderr, stderr


def wait_for_job(cluster, proc, state, timeout=120) -> str:
    """The id of this cluster's one job once squeue shows it in `state`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        jobs = cluster.run("squeue", "--noheader", f"--states={state}", "--format=%i").stdout.split()
        if jobs:
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no {state} job after {timeout} s")


# -- time limit and preemption ----------------------------------------------------------------

# A few seconds of training with frequent checkpoints: the test acts on each start's first one.
LONG = [*TINY_OVERRIDES, "train.steps=2000", "train.eval_every=500", "train.checkpoint_every=250",
        "train.log_every=10"]


def job_process(sweep) -> int:
    """The pid of the Python process running this sweep's SLURM job (srun's own argv names it too)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in argv and str(sweep) in argv[-2] and "python" in Path(argv[0]).name:
            return int(cmdline.parent.name)
    raise AssertionError("the job's Python process is not running")


def is_stopped(pid: int) -> bool:
    """True while the process is stopped (state T in /proc/PID/stat); False once it runs or is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def checkpoint_step(run_dir) -> int:
    path = run_dir / "checkpoint.pt"
    return torch.load(path, weights_only=False)["step"] if path.exists() else -1


def wait_until(condition, proc, sweep, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1] + job_logs(sweep)
        assert time.monotonic() < deadline, job_logs(sweep)
        time.sleep(0.1)


@pytest.mark.slow
def test_requeued_then_timed_out_job_resumes_bitwise(cluster, tiny_mnist, tmp_path):
    """One job through preemption and its one-minute time limit, with the launcher's defaults.

    First start: `scontrol requeue` after its first checkpoint (SIGTERM, as preemption with
    PreemptMode=REQUEUE): it checkpoints and SLURM requeues it. Second start: stopped (SIGSTOP)
    after its next checkpoint, so that it outlasts the limit however fast this machine is
    (SLURM's clock runs on), until SLURM's time-limit warning wakes it (SIGCONT, SIGUSR2): it
    checkpoints and submitit requeues it. Then it completes. Each start resumes at the step the
    last one stopped, and the results are bitwise those of an uninterrupted run.
    """
    run = [*LONG, f"data.root={tiny_mnist}"]
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(TRAIN_SCRIPT), "-m", *run, "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=1", f"hydra.sweep.dir={sweep}"]
    with subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *run, f"hydra.run.dir={tmp_path / 'ref'}"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as reference, \
         subprocess.Popen(args, cwd=tmp_path, env={**os.environ, **cluster.env()}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            job = wait_for_job(cluster, proc, "RUNNING")
            wait_until(lambda: list(sweep.glob("*/checkpoint.pt")), proc, sweep)
            (run_dir,) = [p.parent for p in sweep.glob("*/checkpoint.pt")]
            cluster.run("scontrol", "requeue", job)
            wait_until(lambda: "resuming from" in (run_dir / "train.log").read_text(), proc, sweep)
            resumed_at = checkpoint_step(run_dir)
            wait_until(lambda: checkpoint_step(run_dir) > resumed_at, proc, sweep)
            pid = job_process(sweep)
            os.kill(pid, signal.SIGSTOP)  # SLURM sends SIGCONT with its warning signal: that ends the hold
            try:
                wait_until(lambda: not is_stopped(pid), proc, sweep, timeout=90)
            finally:
                if is_stopped(pid):
                    os.kill(pid, signal.SIGCONT)
            _, stderr = proc.communicate(timeout=300)
            assert reference.wait(timeout=300) == 0, reference.stderr.read()  # the same run, uninterrupted
        finally:  # a failed test leaves no process behind (the cluster's teardown cancels the job)
            reference.kill()
            proc.kill()
    logs = job_logs(sweep)
    assert proc.returncode == 0, stderr + logs
    assert "DUE TO JOB REQUEUE" in logs  # SLURM ended the first start itself
    assert "this job is timed-out" in logs and "Requeued job" in logs  # submitit requeued at the limit
    stopped = [int(line.split()[3].rstrip(";")) for line in logs.splitlines()
               if line.startswith("interrupted at step")]
    resumed = [int(line.split()[-1]) for line in (run_dir / "train.log").read_text().splitlines()
               if "resuming from" in line]
    # Each start resumes where a stop saved (a start the warning reaches before it trains, as on a
    # loaded machine, is requeued by submitit alone and the next one resumes from the same step).
    assert len(stopped) >= 2 and set(resumed) == set(stopped)
    assert logs.count("done completed:") == 1
    assert_same_outcome(tmp_path / "ref", run_dir)
