"""What a run shows while it trains: a tqdm bar on a terminal, one log line per evaluation elsewhere.

The bar moves between evaluations without touching the device: the training loop calls
`tick(step)` after every step with the step count it already holds on the host, and the bar
redraws when REFRESH_S has passed (one clock read per step, a tiny fraction of a step; measured:
docs/results/measurements.md#progress-bar).
The loss and the validation accuracy change only at evaluations, the run's sync points; a value not
measured yet is left out of the bar (and written as "-" in the log line), never shown as nan.
"""

from __future__ import annotations

import logging
import math
import sys
import time

log = logging.getLogger(__name__)

# Seconds between redraws while training: visibly alive, and drawing stays a negligible share
# of the time (measured: docs/results/measurements.md#progress-bar)
REFRESH_S = 0.5


def shown(value: float | None, spec: str) -> str | None:
    """The value formatted, or None while it is not measured (None, nan or inf)."""
    return None if value is None or not math.isfinite(value) else format(value, spec)


class ProgressBar:
    """A tqdm bar when `stream` (default stderr) is a terminal; else one log line per evaluation.

    mode: auto (as above) | quiet (neither: sweeps print one line per finished job instead).
    """

    def __init__(self, total: int, initial: int, mode: str = "auto", stream=None):
        self.total, self.quiet = total, mode == "quiet"
        stream = sys.stderr if stream is None else stream
        self.bar = None
        self.next_draw = 0.0
        if mode == "auto" and stream.isatty():
            from tqdm import tqdm

            # mininterval=0, miniters=1: tick() decides when to draw; tqdm draws whenever asked
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream,
                            mininterval=0, miniters=1)

    def tick(self, step: int) -> None:
        """After a training step: move the bar to `step` when REFRESH_S has passed since the last draw."""
        if self.bar is None:
            return
        now = time.perf_counter()
        if now >= self.next_draw:
            self.next_draw = now + REFRESH_S
            self.bar.update(step - self.bar.n)

    def update(self, step: int, train_loss: float, val_acc: float, steps_per_s: float) -> None:
        """At an evaluation: the step and the values measured so far (nan = not yet)."""
        loss, acc, rate = shown(train_loss, ".4f"), shown(val_acc, ".4f"), shown(steps_per_s, ".0f")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            # tqdm's own step/s is the live rate; the postfix carries what only an evaluation knows
            fields = {"loss": loss, "val_acc": acc}
            self.bar.set_postfix({k: v for k, v in fields.items() if v is not None})
            self.next_draw = time.perf_counter() + REFRESH_S
        elif not self.quiet:
            log.info("step %d/%d  train_loss %s  val_acc %s  %s steps/s",
                     step, self.total, loss or "-", acc or "-", rate or "-")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
