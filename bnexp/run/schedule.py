"""When a run evaluates, measures the test set and checkpoints: a pure function of train.*.

Steps to a validation accuracy can only be as fine as the evaluations that see it: a run that
crosses 90% at step 230 and is evaluated every 100 steps reports 300, 30% late. Speed-ups are
ratios, so what matters is the *relative* gap between consecutive evaluations, and with a linear
schedule it is large early (where the curves move fast and the 90% targets fall) and small late.

`train.eval_schedule`:

- `linear`: every train.eval_every steps, and the last step.
- `log`: as many evaluations as linear (steps // eval_every, so no more evaluation cost), spaced
  evenly in log(step) from step eval_every to the last step: consecutive evaluations are a
  constant factor apart, (steps / eval_every) ** (1 / (n - 1)). For 4,000 steps and
  eval_every=100 that is 40 evaluations 9.9% apart: 100, 110, 121, ..., 3,639, 4,000.

Both add every multiple of train.test_every (a person asking for the test set more often gets a
validation evaluation there too) and step 0 (a fresh run's evaluation before training; the loop
does that one itself). A resumed run recomputes the same schedule from its config.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Iterator

from bnexp.config import TrainConfig


@functools.lru_cache(maxsize=64)
def _eval_steps(steps: int, every: int, schedule: str, test_every: int) -> tuple[int, ...]:
    if schedule == "log":
        n = max(1, steps // every)
        ratio = (steps / every) ** (1 / (n - 1)) if n > 1 else 1.0
        points = {min(steps, round(every * ratio ** i)) for i in range(n)}
    else:
        points = set(range(every, steps + 1, every))
    if test_every > 0:
        points |= set(range(test_every, steps + 1, test_every))
    return tuple(sorted(points | {steps}))


def eval_steps(t: TrainConfig) -> tuple[int, ...]:
    """Every step after 0 at which the run evaluates (validation, histograms), ascending; the last is t.steps."""
    return _eval_steps(t.steps, t.eval_every, t.eval_schedule, t.test_every)


def resolution(t: TrainConfig) -> str:
    """How fine steps-to-target is under this schedule, in words for a report."""
    steps = eval_steps(t)
    if t.eval_schedule == "log" and len(steps) > 1:
        gap = (steps[-1] / steps[0]) ** (1 / (len(steps) - 1)) - 1
        return f"{len(steps)} evaluations spaced evenly in log(step) from {steps[0]} to {steps[-1]}, ~{gap:.0%} apart"
    return f"every {t.eval_every} steps ({len(steps)} evaluations)"


def previous_eval(step: int, t: TrainConfig) -> int:
    """The evaluation before `step` (0 for the first): a target first seen at `step` was crossed after it."""
    steps = eval_steps(t)
    i = bisect.bisect_left(steps, step)
    return steps[i - 1] if i > 0 else 0


def segment_ends(start: int, t: TrainConfig) -> Iterator[int]:
    """The boundaries after step `start`, in order: evaluations, multiples of checkpoint_every, and the last step."""
    evals = eval_steps(t)
    step = start
    while step < t.steps:
        i = bisect.bisect_right(evals, step)
        step = min(evals[i], (step // t.checkpoint_every + 1) * t.checkpoint_every, t.steps)
        yield step


def is_eval_point(step: int, t: TrainConfig) -> bool:
    evals = eval_steps(t)
    i = bisect.bisect_left(evals, step)
    return i < len(evals) and evals[i] == step


def is_test_point(step: int, t: TrainConfig) -> bool:
    """An evaluation that also measures the test set: the last step, and every train.test_every steps if set."""
    return step == t.steps or (t.test_every > 0 and step % t.test_every == 0)


def is_checkpoint_point(step: int, t: TrainConfig) -> bool:
    return step % t.checkpoint_every == 0 or step == t.steps


def mean_val_err(evals: list[dict], budget: int, diverged: bool) -> float | None:
    """The area under the validation-error curve (1 - val/acc) over steps 0..budget, divided by
    the budget: the average error over training, lower = converged sooner (an anytime measure
    that needs no target). Trapezoids between evaluations, in steps (not log steps), so late
    training weighs as much per step as early. A diverged run counts at chance (0.9 error, 10
    classes) from its last evaluation on; a run that stopped short of its budget otherwise has
    none (None)."""
    points = [(e["step"], 1.0 - e["val/acc"]) for e in evals if math.isfinite(e.get("val/acc", math.nan))]
    if not points or points[-1][0] < budget and not diverged:
        return None
    if points[-1][0] < budget:
        points.append((points[-1][0], 0.9))
        points.append((budget, 0.9))
    area = sum((s1 - s0) * (e0 + e1) / 2 for (s0, e0), (s1, e1) in zip(points, points[1:]))
    span = points[-1][0] - points[0][0]
    return round(area / span, 6) if span > 0 else round(points[0][1], 6)
