"""bnexp's runs as launcher jobs (submitit on SLURM or locally, joblib): imports, polling, requeue.

Two pieces, one per side of a sweep:

- `LaunchSetup`, a Hydra callback (conf/config.yaml, `hydra.callbacks`), runs in the process
  that launches a sweep. Before any job starts it sets PYTHONSAFEPATH=1, which the job
  processes inherit: submitit starts each job with `python -m submitit.core._submit` and
  joblib its workers with `python -m/-c`, and those put the working directory first on
  sys.path, where a folder named `bnexp` (a clone, say) would shadow the installed package.
  With hydra/launcher=slurm it also makes submitit poll job states with squeue where the
  cluster keeps no accounting (bnexp/jobs/slurm_poll.py).
- `requeue_with_submitit`, called by bnexp.cli in the job after a signal stopped the run and
  its checkpoint is saved: submitit's signal (SIGUSR2) means the time limit is near or the job
  is preempted, and submitit's handler resubmits the job, which resumes from that checkpoint.

Nothing here imports submitit until a sweep or a job needs it.
"""

from __future__ import annotations

import os
import signal

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SAFE_PATH = "PYTHONSAFEPATH"  # Python >= 3.11: no working directory (or script dir) on sys.path


class LaunchSetup(Callback):
    """Prepares a sweep's job processes; a no-op for single runs."""

    def __init__(self) -> None:
        self._previous: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._previous = os.environ.get(SAFE_PATH)
        os.environ[SAFE_PATH] = "1"  # inherited by jobs: subprocesses, and sbatch's exported environment
        if str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            from bnexp.jobs.slurm_poll import install

            install()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._previous is None:
            os.environ.pop(SAFE_PATH, None)
        else:
            os.environ[SAFE_PATH] = self._previous


def in_submitit_job() -> bool:
    """True in a job that submitit started (on SLURM or locally)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def submitit_signal() -> int:
    """The signal submitit's jobs get before their time limit or on preemption (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def requeue_with_submitit(signum: int) -> None:
    """Inside a submitit job stopped by submitit's signal: hand the signal to submitit's handler.

    The handler asks Hydra's launcher for a checkpoint (it resubmits the same job, so the run
    restarts in the same run dir and resumes), requeues the job (`scontrol requeue` on SLURM, a
    restart locally), and exits; it raises instead once the job has used up max_num_timeout.
    Returns without doing anything outside submitit jobs and for other signals: SIGTERM comes
    from SLURM itself when it requeues or cancels a job, and SLURM decides what follows.
    """
    if not in_submitit_job() or signum != submitit_signal():
        return
    handler = signal.getsignal(signum)
    if callable(handler):  # submitit's SignalHandler.checkpoint_and_try_requeue
        handler(signum, None)
