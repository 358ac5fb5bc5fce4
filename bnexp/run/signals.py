"""Stop signals as a flag the training loop polls between steps."""

from __future__ import annotations

import signal
import threading


class RunInterrupted(Exception):
    """A stop signal (StopFlag.SIGNALS) ended the run after it saved a checkpoint and summary.json."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.summary = signum, summary


class StopFlag:
    """Turns stop signals into a flag the loop polls once per step (a Python bool: no cost).

    SIGINT is Ctrl-C; SIGTERM is kill and how SLURM preempts, requeues or cancels a job;
    SIGUSR2 is what submitit's SLURM jobs get before their time limit (bnexp/jobs/cluster.py).
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
