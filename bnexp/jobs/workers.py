"""A group trained somewhere else than the launcher's process: a submitit job, or a worker
process of the batched launcher that reads its group from a file and writes its outcomes back."""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import sys
import threading
from pathlib import Path

from bnexp.run.atomic import atomic_write
from bnexp.run.loop import LOG_FORMAT, MemberSpec, train_group
from bnexp.run.member import Outcome


class GroupJob:
    """train_group as a submitit job: checkpoint() resubmits it when the cluster preempts or
    times it out, and the group then resumes from its members' checkpoints."""

    def __call__(self, specs: list[MemberSpec], threads: int | None) -> list[Outcome]:
        _log_to_stderr()
        return train_group(specs, threads)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def write_request(path: Path, specs: list[MemberSpec], threads: int | None) -> None:
    """The file a worker process reads: the group's members and its threads."""
    atomic_write(path, pickle.dumps({"specs": specs, "threads": threads}))


def read_outcomes(path: Path) -> list[Outcome]:
    return pickle.loads(Path(path).read_bytes())


def outcomes_path(request: Path) -> Path:
    return Path(request).with_suffix(".out")


def worker_main(request: str, launcher_pid: int | None = None) -> None:
    """Entry of a group worker process: train the group of `request`, write its outcomes."""
    if launcher_pid is not None:
        _stop_with_launcher(launcher_pid)
    _log_to_stderr()
    job = pickle.loads(Path(request).read_bytes())
    outcomes = train_group(job["specs"], job["threads"])
    atomic_write(outcomes_path(Path(request)), pickle.dumps(outcomes))


def _stop_with_launcher(pid: int) -> None:
    """SIGTERM this worker when the launcher (process `pid`) exits, even by kill -9, so that it
    checkpoints and exits instead of training on alone (and racing a rerun of the sweep for its
    dirs). A thread waits on a pidfd of the launcher (Linux >= 5.3; elsewhere nothing watches).

    Not PR_SET_PDEATHSIG: a worker's parent is the launcher's fork server, which every worker
    keeps alive (each holds the server's liveness pipe) until it exits itself.
    """
    if not hasattr(os, "pidfd_open"):
        return

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            os.kill(os.getpid(), signal.SIGTERM)
            return
        select.select([fd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _log_to_stderr() -> None:
    """A process of its own has no Hydra logging: INFO lines to stderr in Hydra's format."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
