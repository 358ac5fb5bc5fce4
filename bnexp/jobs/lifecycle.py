"""One job's lifecycle, written once: `scripts/train.py` (bnexp/cli.py) and the batched launcher
(hydra_plugins/bnexp_batched_launcher) both go through these functions.

    validate      Hydra's composed config -> a checked Config (bad input: ConfigError, one line)
    threads       torch threads for a job of K members, and why (logged as the job's first line)
    fail          a user error: one line on stderr, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
    finish        a finished run's `done ...` line and the value returned to the sweeper
    stop          an interrupted job or sweep: what was kept, the resume command, exit 128 + signal
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig

from bnexp.config import Config, to_config
from bnexp.run.summary import Summary
from bnexp.run.runtime import ThreadChoice, choose_threads, work_per_op

log = logging.getLogger("bnexp")
POOR_OBJECTIVE = 0.0  # what a diverged run returns to a sweeper: below chance (0.1), never NaN


def validate(hydra_cfg: DictConfig) -> Config:
    """The job's config, checked (bnexp/config.py); raises ConfigError naming the bad key."""
    return to_config(hydra_cfg)


def threads(cfg: Config, members: int, cores: int | None, why: str) -> ThreadChoice:
    """torch threads of a job's process (bnexp.run.runtime.choose_threads).

    cores: what the launcher leaves this process (None: all it may use); the work: each op of a
    group of K is one batched op over the K members, K times a member's work per op.
    """
    return choose_threads(cfg.threads, members * work_per_op(cfg.model.widths, cfg.train.batch_size), cores, why)


def fail(message: str, code: int = 2) -> None:
    """Print one line and exit; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"error: {message}", file=sys.stderr)  # not log.error: Hydra's console handler would repeat it
    sys.exit(code)


def finish(summary: Summary) -> float:
    """Log the finished run's one `done ...` line; return its sweep objective."""
    report_job(summary)
    return objective(summary)


def objective(summary: Summary) -> float:
    """The sweep objective of a finished run: its final val accuracy; diverged (or NaN) scores POOR_OBJECTIVE."""
    val_acc = summary["final"]["val_acc"]
    return val_acc if summary["status"] == "completed" and val_acc == val_acc else POOR_OBJECTIVE


def report_job(summary: Summary) -> None:
    """One line per finished job: what the sweep's console log shows instead of interleaved bars."""
    c, f = summary["config"], summary["final"]
    val = "n/a" if f["val_acc"] is None or f["val_acc"] != f["val_acc"] else f"{f['val_acc']:.4f}"
    log.info("done %s: norm=%s lr=%s seed=%s val_acc=%s steps=%d time=%.1fs",
             summary["status"], c["norm.name"], c["optim.lr"], c["seed"], val,
             summary["steps_done"], summary["wall_s"])


def stop(signum: int, what: str, resume: str | None) -> None:
    """An interrupted job or sweep: say what was kept and how to go on; exit 128 + the signal."""
    print(what, file=sys.stderr)
    if resume is not None:
        print(f"Resume with:\n  {resume}", file=sys.stderr)
    sys.exit(128 + signum)
