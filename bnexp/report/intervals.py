"""How sure a comparison is: 95% bootstrap intervals over seeds, the expected running time, and the
probability that one variant's run beats another's.

Every comparison in a report is between two sets of runs that differ in one thing (a norm, a
learning rate) and are repeated over seeds. Its uncertainty comes from those seeds, so it is
resampled over them with `scipy.stats.bootstrap` (percentile intervals, 9,999 resamples, a fixed
random seed so that a report is reproducible):

- *paired* where both sides ran the same seeds (seed i of one beside seed i of the other: same
  initial weights before the norm, same batches), which removes what the seed alone decides;
  unpaired otherwise (each side resampled on its own).
- A comparison whose interval includes no difference (a ratio's 1, a difference's 0) is called
  "no clear difference", whatever its point estimate.

Steps to a target with runs that miss it (benchmarking practice, e.g. COCO's ERT): a run that
never reached the target counts its steps spent (the budget, or where it diverged or stopped),
and the *expected running time* is all steps spent over the runs that reached it:
ERT = sum(spent) / reached. It is the mean steps when every run reached the target, and
infinite when none did. A speed-up is ERT(base) / ERT(variant).

P(variant beats base) is the probability that a random run of the variant reaches the target in
fewer steps than a random run of the base, a miss counting as slower than any hit and a tie
as half (the Mann-Whitney statistic over all pairs; rliable's "probability of improvement").

These intervals treat the best-lr choice as fixed: when the lr was chosen on the same runs'
validation curves, the interval does not include the uncertainty of that choice.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the resampling's own random numbers: the same report every time


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap interval; `paired`: resampled by seed pairs."""

    estimate: float
    low: float
    high: float
    n: int  # pairs when paired, else the smaller side's runs
    paired: bool

    def includes(self, value: float) -> bool:
        return not (self.low > value or self.high < value)


def outcomes(steps: list[int | None], spent: list[int]) -> np.ndarray:
    """Runs' outcomes at one target, one number each: the steps to it (>= 0) where reached,
    else -(steps spent + 1). One array per side keeps hit and cost together when resampled."""
    return np.array([s if s is not None else -(c + 1) for s, c in zip(steps, spent)], dtype=np.float64)


def ert(o: np.ndarray, axis: int = -1) -> np.ndarray:
    """Expected running time along `axis`: steps spent by all runs / runs that reached the target."""
    hit = o >= 0
    spent = np.where(hit, o, -o - 1).sum(axis=axis)
    reached = hit.sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(reached > 0, spent / np.maximum(reached, 1), np.inf)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with inf / x = inf, x / inf = 0 and inf / inf = NaN (undefined: both missed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)


def speedup_statistic(base: np.ndarray, variant: np.ndarray, axis: int = -1) -> np.ndarray:
    return _ratio(ert(base, axis), ert(variant, axis))


def p_beats_statistic(variant: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(a variant run needs fewer steps than a base run), misses slower than any hit, ties 1/2."""
    v = np.moveaxis(np.where(variant >= 0, variant, np.inf), axis, -1)[..., :, None]
    b = np.moveaxis(np.where(base >= 0, base, np.inf), axis, -1)[..., None, :]
    return (v < b).mean(axis=(-2, -1)) + 0.5 * (v == b).mean(axis=(-2, -1))


def mean_difference(variant: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(variant, axis=axis) - np.mean(base, axis=axis)


def mean_ratio(variant: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    return _ratio(np.mean(variant, axis=axis), np.mean(base, axis=axis))


def _quantiles(values: np.ndarray) -> tuple[float, float]:
    """The percentile interval, inf-safe: NaN resamples (undefined) left out, no interpolation."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha], method="inverted_cdf")
    return float(low), float(high)


def bootstrap(statistic: Callable, a: np.ndarray, b: np.ndarray, paired: bool) -> Interval | None:
    """The statistic of (a, b) with its 95% percentile interval over seeds; None below 2 runs a side.

    scipy draws the resamples (`bootstrap_distribution`); the percentiles are taken here, without
    interpolation and leaving out undefined (NaN) resamples, so that an infinite ERT (a resample
    in which no run reached the target) gives an open-ended interval instead of NaN.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(a.size, b.size) < 2 or (paired and a.size != b.size):
        return None
    estimate = float(statistic(a, b))
    if np.all(a == a[0]) and np.all(b == b[0]):  # no spread to resample: the interval is the point
        return Interval(estimate, estimate, estimate, a.size if paired else min(a.size, b.size), paired)
    low, high = _percentiles((a, b), statistic, paired)
    return Interval(estimate, low, high, a.size if paired else min(a.size, b.size), paired)


def _percentiles(samples: tuple, statistic: Callable, paired: bool) -> tuple[float, float]:
    """The 95% percentile interval of statistic over scipy's resamples of samples (inf-safe, _quantiles)."""
    with warnings.catch_warnings():  # scipy's own interval of a distribution with inf/NaN: unused here
        warnings.simplefilter("ignore")
        res = scipy_stats.bootstrap(samples, statistic, paired=paired, vectorized=True, axis=-1,
                                    n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                                    rng=np.random.default_rng(BOOTSTRAP_SEED))
    return _quantiles(np.asarray(res.bootstrap_distribution))


def bootstrap_one(statistic: Callable, a: np.ndarray) -> Interval | None:
    """One sample's statistic (an ERT, a mean) with its 95% percentile interval; None below 2 runs."""
    a = np.asarray(a, dtype=np.float64)
    if a.size < 2:
        return None
    estimate = float(statistic(a))
    if np.all(a == a[0]):
        return Interval(estimate, estimate, estimate, a.size, False)
    low, high = _percentiles((a,), statistic, paired=False)
    return Interval(estimate, low, high, a.size, False)


def pair_by_seed(base: list, variant: list, key=lambda r: r.seed) -> tuple[list, list, bool]:
    """The two sides in seed order, paired when they ran the same seeds (each once), else as given."""
    kb, kv = [key(r) for r in base], [key(r) for r in variant]
    if sorted(map(str, kb)) == sorted(map(str, kv)) and len(set(map(str, kb))) == len(kb):
        order = {str(k): i for i, k in enumerate(sorted(kb, key=str))}
        return (sorted(base, key=lambda r: order[str(key(r))]), sorted(variant, key=lambda r: order[str(key(r))]),
                True)
    return list(base), list(variant), False


def _verdict(ci: Interval | None, null: float, above: str, below: str) -> str:
    """above / below when the interval excludes `null` on that side, else 'no clear difference'."""
    if ci is None or math.isnan(ci.low):
        return "too few runs to tell"
    if ci.low > null:
        return above
    if ci.high < null:
        return below
    return "no clear difference"


def verdict_ratio(ci: Interval | None, faster: str = "faster", slower: str = "slower") -> str:
    """'faster' / 'slower' when the interval excludes 1, else 'no clear difference'."""
    return _verdict(ci, 1.0, faster, slower)


def verdict_difference(ci: Interval | None, higher: str = "higher", lower: str = "lower") -> str:
    """'higher' / 'lower' when the interval excludes 0, else 'no clear difference'."""
    return _verdict(ci, 0.0, higher, lower)


def fmt_interval(ci: Interval | None, spec: str, suffix: str = "") -> str:
    """'1.57x [1.21, 2.05]' (suffix 'x'); 'inf' for an open end; 'n/a' without an interval."""
    if ci is None:
        return "n/a"
    f = lambda v: "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else format(v, spec))
    return f"{f(ci.estimate)}{suffix} [{f(ci.low)}, {f(ci.high)}]"
