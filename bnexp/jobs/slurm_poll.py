"""SLURM job states for submitit without accounting: squeue where sacct does not answer.

submitit polls `sacct` for the states of a sweep's jobs. On a cluster without accounting (no
slurmdbd, common on small clusters) sacct fails on every poll: submitit warns each time
("Bypassing sacct error"), and a job that dies without writing its result stays UNKNOWN, so
the sweep waits for it forever. This watcher asks sacct once; if it fails, it says so in one
line and asks squeue from then on. squeue lists a job until MinJobAge (300 s by default) after
it ended; a job it no longer lists has ended too, so the sweep collects it (an error naming
the job if it wrote no result) instead of waiting.
"""

from __future__ import annotations

import getpass
import logging
import subprocess

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger("bnexp")
ENDED = "ENDED"  # the state of a job squeue no longer lists: SLURM has forgotten it, so it ended
HEADER = "JobID|State|NodeList"  # the sacct columns submitit parses; squeue prints the same ones
# Job states squeue shows for jobs that have not ended, beyond those submitit already waits for
# (PENDING, RUNNING, REQUEUED, COMPLETING, PREEMPTED): CONFIGURING is a job whose nodes boot.
NOT_ENDED = {"CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED",
             "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's SLURM watcher, with squeue in place of sacct once sacct has failed."""

    def __init__(self, delay_s: int = 600):
        super().__init__(delay_s=delay_s)
        self.accounting: bool | None = None  # unknown until the first poll asks sacct

    def _make_command(self) -> list[str] | None:
        sacct = super()._make_command()
        if sacct is None:
            return None
        if self.accounting is None:
            self.accounting = sacct_answers(sacct)
        if self.accounting:
            return sacct
        # --array: one line per array task; --states=all: ended jobs too, while SLURM keeps them
        return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N",
                f"--user={getpass.getuser()}"]

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return super().is_done(job_id, mode) and self.get_state(job_id, mode="cache") not in NOT_ENDED

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self.accounting:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info(f"{HEADER}\n{text}")
        for job_id in self._registered - self._finished - info.keys():
            info[job_id] = {"JobID": job_id, "State": ENDED, "NodeList": ""}
        return info


def sacct_answers(command: list[str]) -> bool:
    """Run submitit's sacct command once; on failure say in one line what that means."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    else:
        if result.returncode == 0:
            return True
        reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
    log.info("sacct gives no job states here (%s): this cluster keeps no job accounting; "
             "polling job states with squeue instead", reason)
    return False


def install() -> None:
    """Make every SLURM job submitit creates from now on use this watcher (one shared instance)."""
    if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
        SlurmJob.watcher = SqueueFallbackWatcher()
