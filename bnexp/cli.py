"""Glue between Hydra and bnexp.train: run dir, threads, exit codes, user errors as one line.

scripts/train.py is a thin @hydra.main around `main`; everything Hydra-specific lives here so
that bnexp.train stays a plain function that tests call directly.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bnexp.checkpoint import CheckpointError
from bnexp.cluster import in_submitit_job, requeue_with_submitit
from bnexp.config import ConfigError, to_config
from bnexp.data import DataError
from bnexp.run_name import hydra_quoted
from bnexp.runtime import available_cores, choose_threads, cores_per_job, pick_device, set_threads, work_per_op
from bnexp.train import RunInterrupted, train

log = logging.getLogger("bnexp")
USER_ERRORS = (ConfigError, DataError, CheckpointError)
POOR_OBJECTIVE = 0.0  # what a diverged run returns to a sweeper: below chance (0.1), never NaN


def fail(message: str, code: int = 2) -> None:
    """Print one line and exit; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"error: {message}", file=sys.stderr)  # not log.error: Hydra's console handler would repeat it
    sys.exit(code)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same overrides, the same run dir."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    return shlex.join([sys.executable, sys.argv[0], *overrides, f"hydra.run.dir={hydra_quoted(str(run_dir))}"])


def threads_per_job() -> tuple[int | None, str]:
    """Cores this job's launcher leaves it (None: all this process may use), and why, for the log.

    joblib runs n_jobs jobs at once on this machine: they split the cores (cores_per_job).
    submitit gives a job cpus_per_task cores, and its local launcher starts every job at once,
    so without cpus_per_task a job takes 1. The basic launcher runs jobs one after another.
    """
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    cores = available_cores()
    if "submitit" in target:
        cpus = launcher.get("cpus_per_task")
        if cpus:
            return cpus, f"submitit cpus_per_task={cpus}"
        return 1, "submitit starts every job at once"
    if "joblib" in target:
        n = launcher.get("n_jobs", 1) or 1
        jobs = max(1, cores + 1 + n) if n < 0 else n  # joblib's rule: -1 = all cores, -2 = all but one
        return cores_per_job(jobs, cores), f"joblib runs {jobs} jobs at once on {cores} cores"
    return None, ""


def in_multirun() -> bool:
    """True inside a -m sweep: jobs then print one line when done instead of progress lines."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


def main(hydra_cfg: DictConfig) -> float:
    """Validate, train, summarize one job; return the sweep objective (final val accuracy)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_config(hydra_cfg)
        choice = choose_threads(cfg.threads, work_per_op(cfg.model.widths, cfg.train.batch_size),
                                *threads_per_job())
        set_threads(choice.threads)
        log.info("torch threads: %d (%s)", torch.get_num_threads(), choice.why)
        log.info("device: %s (CUDA_VISIBLE_DEVICES=%s)", pick_device(cfg.device),
                 os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))  # what a cluster job was given
        summary = train(cfg, run_dir, progress="quiet" if in_multirun() else "auto")
    except USER_ERRORS as exc:
        fail(str(exc))
    except RunInterrupted as stop:
        print(f"interrupted at step {stop.summary['steps_done']}; checkpoint saved.", file=sys.stderr)
        if in_submitit_job():
            requeue_with_submitit(stop.signum)  # near its time limit: resubmitted, exits here
            print("The job resumes from it when it restarts (SLURM requeue) or the sweep runs again "
                  "with the same hydra.sweep.dir.", file=sys.stderr)
        else:
            print(f"Resume with:\n  {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    report_job(summary)
    return objective(summary)


def objective(summary: dict) -> float:
    """The sweep objective of a finished run: its final val accuracy; diverged (or NaN) scores POOR_OBJECTIVE."""
    val_acc = summary["final"]["val_acc"]
    return val_acc if summary["status"] == "completed" and val_acc == val_acc else POOR_OBJECTIVE


def report_job(summary: dict) -> None:
    """One line per finished job: what the sweep's console log shows instead of interleaved bars."""
    c, f = summary["config"], summary["final"]
    val = "n/a" if f["val_acc"] is None or f["val_acc"] != f["val_acc"] else f"{f['val_acc']:.4f}"
    log.info("done %s: norm=%s lr=%s seed=%s val_acc=%s steps=%d time=%.1fs",
             summary["status"], c["norm.name"], c["optim.lr"], c["seed"], val,
             summary["steps_done"], summary["wall_s"])
