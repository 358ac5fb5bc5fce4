"""Glue between Hydra and the training loop (bnexp.run.loop) for one job: its run dir, what its
launcher leaves it (threads), and its resume command.

scripts/train.py is a thin @hydra.main around `main`. What every job does, solo or in a batched
group (validate, choose threads, fail in one line, the done line, the sweep objective, the
interrupted exit), is bnexp/jobs/lifecycle.py's; what is Hydra-specific lives here, so that
bnexp.run.loop.train stays a plain function that tests call directly.
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

from bnexp.jobs.cluster import in_submitit_job, requeue_with_submitit
from bnexp.jobs import lifecycle
from bnexp.run.loop import USER_ERRORS, train
from bnexp.jobs.run_name import hydra_quoted
from bnexp.run.runtime import available_cores, choose_device, cores_per_job, set_threads
from bnexp.run.signals import RunInterrupted

log = logging.getLogger("bnexp")

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
        cfg = lifecycle.validate(hydra_cfg)
        choice = lifecycle.threads(cfg, 1, *threads_per_job())
        set_threads(choice.threads)
        log.info("torch threads: %d (%s)", torch.get_num_threads(), choice.why)
        where = choose_device(cfg)
        log.info("device: %s (%s; CUDA_VISIBLE_DEVICES=%s)", where.device, where.why,
                 os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))  # what a cluster job was given
        summary = train(cfg, run_dir, progress="quiet" if in_multirun() else "auto")
    except USER_ERRORS as exc:
        lifecycle.fail(str(exc))
    except RunInterrupted as stop:
        what = f"interrupted at step {stop.summary['steps_done']}; checkpoint saved."
        if in_submitit_job():
            print(what, file=sys.stderr)
            requeue_with_submitit(stop.signum)  # near its time limit: resubmitted, exits here
            lifecycle.stop(stop.signum, "The job resumes from it when it restarts (SLURM requeue) or the sweep "
                                        "runs again with the same hydra.sweep.dir.", None)
        lifecycle.stop(stop.signum, what, resume_command(run_dir))
    return lifecycle.finish(summary)
