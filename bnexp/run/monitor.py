"""Everything a run writes to TensorBoard, through one writer whose events live in the run dir.

Tags (bnexp/run/tags.py names them and says what each shows): `train/loss`, `val/loss`, `val/acc`,
`test/loss`, `test/acc`, `lr`; per BN layer the histograms `bn/<layer>/running_mean|running_var`
and the scalars `bn/<layer>/running_mean_avg|running_var_avg` (one tag, one kind);
`act/<layer>/p15|p50|p85` (the input to the nonlinearity); at the end `summary/steps_to_0.95`
and the run's HParams entry (bnexp/run/hparams.py), in the same run.
With probes on (probe.every > 0): `probe/loss_min|loss_max|grad_change|beta`, `ics/<layer>/l2|cos`;
with probe.train_mode_acc: `test/acc_train_mode` beside the evaluation metrics.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensorboard.compat import tf
from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter, _AsyncWriter
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import histogram
from torch.utils.tensorboard.writer import FileWriter

from bnexp.run import crc32c
from bnexp.run.hparams import hparams_summaries
from bnexp.run.tags import (BN_STATS, PERCENTILES, STEPS_TAG, STEPS_TARGET, act_tag, bn_histogram_tag,
                        bn_scalar_tag, describe)


EVENT_FILE_PREFIX = "events.out.tfevents."
_SECONDS = re.compile(re.escape(EVENT_FILE_PREFIX) + r"(\d+)")
_files = itertools.count()  # this process's event files, as TensorBoard's writer counts them


def event_file_name(run_dir: Path, now: float | None = None) -> str:
    """A new event file's name in run_dir that sorts after every event file already there.

    TensorBoard reads a run's event files one after another in name order (its DirectoryWatcher
    sorts them), so a resumed run's purge marker (Monitor's purge_step) only drops the killed
    process's later events when the resumed file comes after the killed one's. TensorBoard's
    EventFileWriter names a file `events.out.tfevents.<seconds>.<host>.<pid>.<n>` (n counts the
    process's writers) and compares pid and n as text: a run resumed in the same second sorts
    before or after its earlier file by chance (counter 10 < 9, pid 10234 < 5784), and any
    run resumed after the clock stepped back sorts first. Here the seconds are now or one past
    the latest event file's in the dir, whichever is later: ten digits, so larger seconds sort
    later whatever follows them (until the year 2286); host, pid and counter stay as TensorBoard's.
    """
    seconds = [int(m[1]) for p in Path(run_dir).glob(EVENT_FILE_PREFIX + "*") if (m := _SECONDS.match(p.name))]
    at = max(int(time.time() if now is None else now), max(seconds, default=-1) + 1)
    return f"{EVENT_FILE_PREFIX}{at:010d}.{socket.gethostname()}.{os.getpid()}.{next(_files)}"


class NamedEventFileWriter(EventFileWriter):
    """TensorBoard's EventFileWriter writing to the file `path` rather than one it names after the
    clock (event_file_name says why). Its __init__ is EventFileWriter's with that one change;
    the rest (queue, writer thread, flush, close) is EventFileWriter's own."""

    def __init__(self, path: Path, max_queue_size: int = 10, flush_secs: float = 120):
        self._logdir = str(Path(path).parent)
        tf.io.gfile.makedirs(self._logdir)
        self._file_name = str(path)
        self._general_file_writer = tf.io.gfile.GFile(self._file_name, "wb")
        self._async_writer = _AsyncWriter(RecordWriter(self._general_file_writer), max_queue_size, flush_secs)
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2",
                             source_metadata=SourceMetadata(writer="tensorboard.summary.writer.event_file_writer")))
        self.flush()


class RunWriter(SummaryWriter):
    """torch's SummaryWriter whose event file is named by event_file_name: it sorts after the
    run dir's earlier event files, so on resume the purge marker and the new events are read
    after the killed process's events, as SummaryWriter's purge_step assumes."""

    def _get_file_writer(self):
        """SummaryWriter's, with the file named by event_file_name (and no filename_suffix)."""
        if self.all_writers is None or self.file_writer is None:
            file_writer = FileWriter.__new__(FileWriter)  # its __init__ only makes the EventFileWriter
            file_writer.event_writer = NamedEventFileWriter(Path(self.log_dir) / event_file_name(Path(self.log_dir)),
                                                            self.max_queue, self.flush_secs)
            self.file_writer, self.all_writers = file_writer, {file_writer.get_logdir(): file_writer}
            if self.purge_step is not None:  # as SummaryWriter: a restart marker at purge_step
                file_writer.add_event(Event(step=self.purge_step, file_version="brain.Event:2"))
                file_writer.add_event(Event(step=self.purge_step, session_log=SessionLog(status=SessionLog.START)))
                self.purge_step = None
        return self.file_writer


class Monitor:
    """A TensorBoard writer for one run.

    `purge_step` is passed on to SummaryWriter: on resume from step s it is s + 1, so events
    that the killed process wrote after its last checkpoint are dropped and the curve stays
    continuous; on a fresh start over leftover events it is 0. That needs the new event file
    to sort after the earlier ones, which RunWriter's name makes sure of (event_file_name).
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        crc32c.install()  # the records' checksums with numpy, faster than TensorBoard's (docs/results/measurements.md#crc32c)
        self.writer = RunWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.described: set[str] = set()  # tags whose first event (with the description) is written

    def _write(self, summary: Summary, step: int, plugin) -> None:
        """Give the tag's first event in this process its plugin and description (TensorBoard
        reads them there); `plugin` is the scalar or histogram plugin's metadata module."""
        value = summary.value[0]
        if value.tag not in self.described:
            self.described.add(value.tag)
            value.metadata.CopyFrom(plugin.create_summary_metadata(value.tag, describe(value.tag)))
        self.writer.file_writer.add_summary(summary, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar event (what add_scalar writes, plus the description on the first one)."""
        self._write(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step, scalar_metadata)

    def train_losses(self, first_step: int, values: list[float], every: int) -> None:
        """Write a segment's per-step losses in bulk: values[i] belongs to step first_step + i.

        The loop keeps them on the device and syncs once per segment (bnexp.run.loop.Loop.run_segment):
        a sync and add_scalar on every step cost a large share of throughput (docs/results/measurements.md#logging-cost).
        """
        for i, value in enumerate(values):
            step = first_step + i
            if step % every == 0:
                self.scalar("train/loss", value, step)

    def evaluation(self, step: int, metrics: dict[str, float], lr: float) -> None:
        """Validation (and, at test points, test) loss and accuracy, and the learning rate."""
        for tag, value in metrics.items():
            self.scalar(tag, value, step)
        self.scalar("lr", lr, step)

    def running_stats(self, step: int, norms: dict[str, torch.nn.Module]) -> None:
        """Each BN layer's running mean and variance: every feature as a histogram, their average
        as a scalar under a tag of its own (one tag, one kind: bnexp/run/tags.py)."""
        for name, norm in norms.items():
            for stat in BN_STATS:
                buf = getattr(norm, stat, None)
                if buf is None:
                    continue
                values = buf.detach().float().cpu()
                self._histogram(bn_histogram_tag(name, stat), values, step)
                self.scalar(bn_scalar_tag(name, stat), values.mean().item(), step)

    @torch.no_grad()
    def activations(self, step: int, model: torch.nn.Module, probe: torch.Tensor) -> None:
        """15/50/85th percentiles of each hidden layer's nonlinearity input on the probe batch,
        pooled over units and samples (model in eval mode, as evaluated). No histogram of them:
        it was the largest logging cost of a run (docs/results/measurements.md#logging-cost)."""
        was_training = model.training
        model.eval()
        preacts = model.preactivations(probe)
        model.train(was_training)
        q = torch.tensor([p / 100 for p in PERCENTILES])
        for k, z in enumerate(preacts, start=1):
            values = nanquantile(z, q)  # a diverged net has NaNs: percentiles of what is left
            for p, v in zip(PERCENTILES, values.tolist()):
                self.scalar(act_tag(f"layer{k}", p), v, step)

    def probes(self, step: int, values: dict[str, float]) -> None:
        """One probe step's values (bnexp/run/probes.py): `probe/loss_min|loss_max|grad_change|beta`
        and `ics/<layer>/l2|cos`, written at the segment's end with its losses."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A histogram of the finite values (TensorBoard rejects NaN/inf); none if nothing is finite."""
        finite = values[torch.isfinite(values)]
        if finite.numel():
            # TensorBoard's default buckets end at +-1e20; a diverging net goes past that,
            # and float32 bin arithmetic overflows near 1e38: float64 with 64 plain bins then
            huge = finite.abs().max() >= 1e20
            bins = 64 if huge else self.writer.default_bins  # default_bins: add_histogram's "tensorflow"
            self._write(histogram(tag, finite.double() if huge else finite, bins), step, histogram_metadata)

    def run_end(self, summary: dict[str, Any]) -> None:
        """At the end of a completed or diverged run: steps to STEPS_TARGET as a scalar (NaN when
        never reached) and the run's HParams entry, whose metrics are its final test/acc, val/acc,
        steps to the target (on val/acc), test/loss, val/loss (bnexp/run/hparams.py)."""
        reached = summary["steps_to_val_acc"].get(f"{STEPS_TARGET:.2f}")
        step = summary["steps_done"] if summary["steps_done"] is not None else 0
        self.scalar(STEPS_TAG, math.nan if reached is None else reached, step)
        for part in hparams_summaries(summary["config"], summary["status"], summary["wall_s"]):
            self.writer.file_writer.add_summary(part)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def nanquantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.nanquantile(values.flatten(), q) (linear interpolation, NaNs left out), bit for bit:
    NaN where every value is NaN.

    torch sorts with a generic single-threaded sort (the 100,000 pre-activations of a layer on
    the probe batch: three of these per evaluation were the largest logging cost of a batched
    group); numpy's sort is vectorized and several times faster (docs/results/measurements.md#logging-cost). The
    interpolation is torch's:
    rank = q * (n - 1) in float64, then a float32 lerp between the values either side of it.
    """
    ordered = np.sort(values.detach().float().flatten().cpu().numpy())  # NaNs sort last
    n = len(ordered) - int(np.isnan(ordered).sum())
    if n == 0:
        return torch.full_like(q, math.nan)
    ordered = torch.from_numpy(ordered[:n])
    ranks = q.double() * (n - 1)
    below, above = ranks.floor().long(), ranks.ceil().long()
    return ordered[below].lerp(ordered[above], (ranks - below).to(ordered.dtype)).to(q.dtype)


class NoMonitor:
    """train.tensorboard=false: the same calls, nothing written (summary.json and checkpoints only).

    Also what scripts/bench.py compares against to measure what logging costs.
    """

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_monitor(run_dir: Path, purge_step: int | None, enabled: bool) -> Monitor | NoMonitor:
    """A Monitor writing into run_dir, or a NoMonitor when TensorBoard output is off."""
    return Monitor(run_dir, purge_step) if enabled else NoMonitor()
