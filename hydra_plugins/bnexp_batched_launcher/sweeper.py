"""`hydra/sweeper=batched_basic`: Hydra's basic sweeper without its second composition of every job.

Before it launches a batch, Hydra's BasicSweeper composes every job's config once, in its own
process, only to fail fast on a bad one (Hydra's code calls this step slow for large sweeps and
a candidate for disabling). The batched launcher composes and validates every job of the batch
itself, in one forked process per core, before any group starts, and stops on the first bad one
in sweep order with the same one-line errors: so with it the sweeper's pass is the same work
done twice, ~0.25 s a job in one process (75 jobs: seconds before anything trains,
docs/results/measurements.md#batched-launcher-start-up). With any other launcher this sweeper
validates exactly as the basic one does.
"""

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class BatchedBasicSweeper(BasicSweeper):
    """BasicSweeper that leaves the composition check to the batched launcher, which makes it anyway."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from .batched_launcher import BatchedLauncher

        if isinstance(self.launcher, BatchedLauncher):
            return  # every job is composed and checked by the launcher's prepare_all before any runs
        super().validate_batch_is_legal(batch)
