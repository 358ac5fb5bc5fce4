"""Reading squeue's answer where SLURM keeps no accounting (bnexp/jobs/slurm_poll.py; on a real
cluster: tests/test_slurm.py). These need no SLURM: they feed the watcher squeue's output format."""

from bnexp.jobs.slurm_poll import ENDED, SqueueFallbackWatcher


def watcher_after(squeue_output: str, *job_ids: str) -> SqueueFallbackWatcher:
    """A watcher in squeue mode that registered `job_ids` and then read `squeue_output`."""
    watcher = SqueueFallbackWatcher()
    watcher.accounting = False
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher._info_dict.update(watcher.read_info(squeue_output))
    return watcher


def test_listed_jobs_keep_their_state_and_unlisted_ones_have_ended():
    """Array tasks as squeue --array lists them; a job SLURM no longer lists has ended."""
    watcher = watcher_after("12_0|RUNNING|node1\n12_1|COMPLETED|node1\n", "12_0", "12_1", "13")
    assert [watcher.get_state(j, mode="cache") for j in ("12_0", "12_1", "13")] == ["RUNNING", "COMPLETED", ENDED]
    assert [watcher.is_done(j, mode="cache") for j in ("12_0", "12_1", "13")] == [False, True, True]


def test_jobs_on_their_way_are_not_done():
    """States submitit does not know as unfinished (a job whose nodes boot, a suspended one)."""
    watcher = watcher_after("7|CONFIGURING|\n8|SUSPENDED|node1\n9|REQUEUED|\n", "7", "8", "9")
    assert not any(watcher.is_done(j, mode="cache") for j in ("7", "8", "9"))


def test_no_jobs_listed_means_every_job_ended():
    watcher = watcher_after("", "21_0", "21_1")
    assert all(watcher.is_done(j, mode="cache") for j in ("21_0", "21_1"))
