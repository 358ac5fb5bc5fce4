"""Reliability (issue 7): killed runs resume exactly, signals checkpoint, bad state is refused."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_OVERRIDES, TRAIN_SCRIPT, run_script

# Long enough (a few seconds) to be killed mid-run; checkpoints and evals at different periods,
# so a resume must restart mid-way between eval points.
RESUMABLE = [*TINY_OVERRIDES, "model.widths=[128,128]", "train.steps=2000", "train.eval_every=100",
             "train.checkpoint_every=70", "norm=custom", "optim.momentum=0.9", "optim.lr=0.05"]


def start(run_dir, data_root, *extra):
    args = [sys.executable, str(TRAIN_SCRIPT), *RESUMABLE, f"data.root={data_root}",
            f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(args, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(run_dir, data_root, *extra):
    result = run_script(*RESUMABLE, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *extra,
                        cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return result


def wait_for_checkpoint(run_dir, proc, timeout=120):
    deadline = time.time() + timeout
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def kill_after_first_checkpoint(run_dir, data_root, delay=0.0):
    """Start a run, let it write its first checkpoint (and run `delay` s more), then kill -9 it."""
    proc = start(run_dir, data_root)
    wait_for_checkpoint(run_dir, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def outcome(run_dir):
    """What must match bitwise: final params, summary metrics, per-eval accuracies, the loss curve."""
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
              for tag in ("train/loss", "test/acc", "val/acc", "act/layer2/p50")}
    params = torch.load(run_dir / "model.pt")
    return summary, curves, params


def assert_same_outcome(a_dir, b_dir):
    (sa, ca, pa), (sb, cb, pb) = outcome(a_dir), outcome(b_dir)
    for key in ("status", "steps_done", "final", "steps_to_val_acc", "diverged_at_step"):
        assert sa[key] == sb[key], key
    assert ca == cb  # one continuous curve each: same steps, no duplicates, same values
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that every interrupted-and-resumed run must reproduce bitwise."""
    from conftest import write_tiny_mnist

    base = tmp_path_factory.mktemp("reference")
    write_tiny_mnist(base / "data")
    finish(base / "run", base / "data")
    return base


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_then_resume_is_bitwise_identical(reference, tmp_path, trial):
    """Property: kill -9 anywhere after the first checkpoint, resume, get the uninterrupted result."""
    delay = random.Random(trial).uniform(0.0, 1.5)
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint(run_dir, reference / "data", delay)
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill: make it longer"
    finish(run_dir, reference / "data")
    assert_same_outcome(reference / "run", run_dir)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_sigint_and_sigterm_checkpoint_and_print_the_resume_command(reference, tmp_path, sig, code):
    """Ctrl-C / SIGTERM / SIGUSR2: checkpoint, status interrupted, the exact resume command, exit 128+n."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, reference / "data")
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["steps_done"] == torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    command = stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert f"hydra.run.dir={run_dir}" in command and "optim.lr=0.05" in command
    resumed = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outcome(reference / "run", run_dir)


def test_resume_with_another_config_is_refused_and_overwrites_nothing(reference, tmp_path):
    """A checkpoint made with other values: exit non-zero, list the differing keys, touch nothing."""
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint(run_dir, reference / "data")
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = run_script(*RESUMABLE, f"data.root={reference / 'data'}", f"hydra.run.dir={run_dir}",
                        "optim.lr=0.07", "seed=5", cwd=tmp_path)
    assert result.returncode != 0
    assert "optim.lr: 0.05 -> 0.07" in result.stderr and "seed: 0 -> 5" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not (run_dir / "summary.json").exists()


def test_corrupt_checkpoint_is_named_and_not_silently_replaced(reference, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run_script(*RESUMABLE, f"data.root={reference / 'data'}", f"hydra.run.dir={run_dir}",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert f"{run_dir / 'checkpoint.pt'}: corrupt checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == b"PK\x03\x04 not really a checkpoint"


def test_resume_never_starts_over(reference, tmp_path):
    """train.resume=never ignores the checkpoint and reproduces the run from step 0."""
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint(run_dir, reference / "data")
    finish(run_dir, reference / "data", "train.resume=never")
    assert_same_outcome(reference / "run", run_dir)


def test_completed_run_dir_rerun_changes_nothing(reference, tmp_path):
    """Re-running into a finished run dir resumes at its end: same summary, no new training."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference / "run", run_dir)
    result = finish(run_dir, reference / "data")
    assert "already completed" in result.stdout + result.stderr
    assert_same_outcome(reference / "run", run_dir)


def test_two_runs_started_together_get_different_dirs(tiny_mnist, tmp_path):
    """Run dirs carry microseconds: two runs started in the same instant never share one."""
    args = [sys.executable, str(TRAIN_SCRIPT), *TINY_OVERRIDES, f"data.root={tiny_mnist}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)


def test_unwritable_data_root_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    result = run_script(*TINY_OVERRIDES, f"data.root={blocker / 'data'}", f"hydra.run.dir={tmp_path / 'r'}",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert str(blocker / "data") in result.stderr and "Traceback" not in result.stderr


def test_truncated_idx_file_is_named(tiny_mnist, tmp_path):
    images = tiny_mnist / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    result = run_script(*TINY_OVERRIDES, f"data.root={tiny_mnist}", f"hydra.run.dir={tmp_path / 'r'}",
                        cwd=tmp_path)
    assert result.returncode != 0
    assert "t10k-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
