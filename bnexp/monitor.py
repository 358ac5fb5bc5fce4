"""Everything a run writes to TensorBoard, through one writer whose events live in the run dir.

Tags (fixed, see ../shared/design.md): `train/loss`, `val/loss`, `val/acc`, `test/loss`,
`test/acc`, `lr`, `bn/<layer>/running_mean`, `bn/<layer>/running_var` (histogram + mean as a
scalar), `act/<layer>/p15|p50|p85` (the input to the nonlinearity), and hparams in the same run.
With probes on (probe.every > 0): `probe/loss_min|loss_max|grad_change|beta`, `ics/<layer>/l2|cos`;
with probe.train_mode_acc: `test/acc_train_mode` beside the evaluation metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

PERCENTILES = (15, 50, 85)
HPARAM_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss")


class Monitor:
    """A TensorBoard writer for one run.

    `purge_step` is passed on to SummaryWriter: on resume from step s it is s + 1, so events
    that the killed process wrote after its last checkpoint are dropped and the curve stays
    continuous; on a fresh start over leftover events it is 0.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def train_losses(self, first_step: int, values: list[float], every: int) -> None:
        """Write a segment's per-step losses in bulk: values[i] belongs to step first_step + i.

        The loop keeps them on the device and syncs once per segment (bnexp.train.run_segment):
        a sync and add_scalar on every step cost ~20% of throughput.
        """
        for i, value in enumerate(values):
            step = first_step + i
            if step % every == 0:
                self.writer.add_scalar("train/loss", value, step)

    def evaluation(self, step: int, metrics: dict[str, float], lr: float) -> None:
        """val/test loss and accuracy, and the learning rate."""
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar("lr", lr, step)

    def running_stats(self, step: int, norms: dict[str, torch.nn.Module]) -> None:
        """Each BN layer's running mean and variance: the whole vector as a histogram, its mean as a scalar."""
        for name, norm in norms.items():
            for stat in ("running_mean", "running_var"):
                buf = getattr(norm, stat, None)
                if buf is None:
                    continue
                values = buf.detach().float().cpu()
                self._histogram(f"bn/{name}/{stat}", values, step)
                self.writer.add_scalar(f"bn/{name}/{stat}", values.mean().item(), step)

    @torch.no_grad()
    def activations(self, step: int, model: torch.nn.Module, probe: torch.Tensor) -> None:
        """15/50/85th percentiles of each hidden layer's nonlinearity input on the probe batch,
        pooled over units and samples (model in eval mode, as evaluated). No histogram of them:
        at ~15 ms per layer it was the largest logging cost of a run."""
        was_training = model.training
        model.eval()
        preacts = model.preactivations(probe)
        model.train(was_training)
        q = torch.tensor([p / 100 for p in PERCENTILES])
        for k, z in enumerate(preacts, start=1):
            z = z.detach().float().flatten().cpu()
            values = torch.nanquantile(z, q)  # a diverged net has NaNs: percentiles of what is left
            for p, v in zip(PERCENTILES, values.tolist()):
                self.writer.add_scalar(f"act/layer{k}/p{p}", v, step)

    def probes(self, step: int, values: dict[str, float]) -> None:
        """One probe step's values (bnexp/probes.py): `probe/loss_min|loss_max|grad_change|beta`
        and `ics/<layer>/l2|cos`, written at the segment's end with its losses."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A histogram of the finite values (TensorBoard rejects NaN/inf); none if nothing is finite."""
        finite = values[torch.isfinite(values)]
        if finite.numel():
            # TensorBoard's default buckets end at +-1e20; a diverging net goes past that,
            # and float32 bin arithmetic overflows near 1e38: float64 with 64 plain bins then
            huge = finite.abs().max() >= 1e20
            self.writer.add_histogram(tag, finite.double() if huge else finite, step,
                                      bins=64 if huge else "tensorflow")

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The flattened config as hparams of this run (not a nested run, as add_hparams would make).

        The metrics named are the run's own `test/acc` ... scalars, which the HParams tab reads.
        """
        values = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str))}
        values.update({k: str(v) for k, v in config.items() if v is None})
        exp, ssi, sei = hparams(values, {k: metrics.get(k, float("nan")) for k in HPARAM_METRICS})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoMonitor:
    """train.tensorboard=false: the same calls, nothing written (summary.json and checkpoints only).

    Also what scripts/bench.py compares against to measure what logging costs.
    """

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_monitor(run_dir: Path, purge_step: int | None, enabled: bool) -> Monitor | NoMonitor:
    """A Monitor writing into run_dir, or a NoMonitor when TensorBoard output is off."""
    return Monitor(run_dir, purge_step) if enabled else NoMonitor()
