"""The numbers of the *why* studies: which study a sweep is, BN's advantage per study value,
the train/eval accuracy gap, and the landscape and ICS probes per variant.

A sweep is a *study* when one of STUDY_KEYS differs between its runs (conf/experiment/depth,
batch_size, placement): its runs are then split by that key's value and each part gets the
ordinary statistics of bnexp.report.stats (groups by (norm, lr), speed-ups over none), never pooled
across values. Probe curves (probe/*, ics/*; bnexp/run/probes.py) are summarized per run as the
mean over its probe steps, then as mean +- std over seeds per (study value, norm, lr).
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

import numpy as np

from bnexp.report.intervals import Interval, bootstrap, mean_ratio, pair_by_seed
from bnexp.report.stats import SweepStats, group_runs, mean_std, summarize
from bnexp.report.runs import Run

# config key -> study name; the first key that varies decides (conf/experiment/<name>.yaml)
STUDY_KEYS = {"model.widths": "depth", "train.batch_size": "batch_size", "norm.position": "placement"}
STUDY_COLUMN = {"depth": "hidden layers", "batch_size": "batch size", "placement": "BN position"}
PROBES = ("loss range", "grad change", "beta")  # probe quantities, from the probe/ tags
PROBE_TAGS = {"grad change": "probe/grad_change", "beta": "probe/beta"}  # loss range = loss_max - loss_min
POSITION_ORDER = ("before", "after")


@dataclass(frozen=True)
class StudyValue:
    """The runs of one value of the study key, with their bnexp.report.stats numbers."""

    value: str  # as in the flattened config, e.g. "[100, 100]"
    label: str  # as the report shows it, e.g. "2"
    stats: SweepStats


@dataclass(frozen=True)
class Gap:
    """Final test accuracy in eval mode and in training mode (probe.train_mode_acc) over seeds."""

    label: str
    norm: str
    lr: float
    n: int
    eval_acc: tuple[float | None, float | None]  # (mean, std)
    train_acc: tuple[float | None, float | None]
    gap: tuple[float | None, float | None]  # train mode - eval mode, per run, then mean and std


@dataclass(frozen=True)
class Study:
    name: str  # depth | batch_size | placement
    key: str  # the config key that varies
    values: list[StudyValue]
    gaps: list[Gap]  # empty unless the runs measured training-mode accuracy
    pooled_keys: list[str]  # other keys that vary too (pooled within a value; the report warns)


@dataclass(frozen=True)
class ProbeRatio:
    """One (study value, lr, norm): each probe quantity's mean over seeds as a multiple of none's,
    with its 95% bootstrap interval (paired by seed where both ran the same seeds)."""

    label: str
    norm: str
    lr: float
    ratios: dict[str, Interval | None]


@dataclass(frozen=True)
class ProbeRow:
    """One (study value, norm, lr): each probe quantity as (mean, std) over seeds of per-run means."""

    label: str  # the study value's label, "" outside a study
    norm: str
    lr: float
    runs: int  # runs with probe curves
    values: dict[str, tuple[float | None, float | None]]


def _config_value(run: Run, key: str) -> str:
    return json.dumps(run.config.get(key), sort_keys=True, default=str)


def find_study(runs: list[Run]) -> str | None:
    """The first STUDY_KEYS key whose value differs between runs, or None."""
    for key in STUDY_KEYS:
        if len({_config_value(r, key) for r in runs}) > 1:
            return key
    return None


def label(key: str, value) -> str:
    """A study value as the report shows it: widths as 'layers x width' (the list itself when mixed)."""
    if key == "model.widths":
        widths = ast.literal_eval(value) if isinstance(value, str) else list(value)
        return f"{len(widths)} x {widths[0]}" if len(set(widths)) == 1 else str(widths)
    return str(value)


def _sort_key(key: str, value):
    if key == "model.widths":
        widths = ast.literal_eval(value) if isinstance(value, str) else list(value)
        return (len(widths), widths)
    if key == "norm.position":
        return (POSITION_ORDER.index(value) if value in POSITION_ORDER else len(POSITION_ORDER), str(value))
    return (float(value),) if isinstance(value, (int, float)) else (math.inf, str(value))


def split_by(runs: list[Run], key: str) -> dict:
    """Runs by their value of `key`, values in study order (depth, batch size ascending; before, after)."""
    parts: dict = {}
    for run in runs:
        parts.setdefault(run.config.get(key), []).append(run)
    return {v: parts[v] for v in sorted(parts, key=lambda v: _sort_key(key, v))}


def study_stats(runs: list[Run], target: float) -> Study | None:
    """The study a sweep is (None if no STUDY_KEYS key varies), with per-value numbers and gaps."""
    key = find_study(runs)
    if key is None:
        return None
    values = [StudyValue(str(v), label(key, v), summarize(rs, target)) for v, rs in split_by(runs, key).items()]
    others = [k for k in STUDY_KEYS if k != key and len({_config_value(r, k) for r in runs}) > 1]
    pooled = sorted({k for v in values for k in v.stats.varying_keys} | set(others))
    return Study(name=STUDY_KEYS[key], key=key, values=values, gaps=train_eval_gaps(runs, key), pooled_keys=pooled)


def train_mode_acc(run: Run) -> float:
    """Final test accuracy in training mode: summary.json's final.test_acc_train_mode, else the curve; NaN if neither."""
    value = (run.summary.get("final") or {}).get("test_acc_train_mode")
    if value is None and "test/acc_train_mode" in run.curves:
        value = run.curves["test/acc_train_mode"][1][-1]
    return float("nan") if value is None else float(value)


def _finite_mean_std(values) -> tuple[float | None, float | None]:
    return mean_std([v for v in values if math.isfinite(v)])


def train_eval_gaps(runs: list[Run], key: str | None) -> list[Gap]:
    """Per (study value, norm, lr): final test accuracy in eval and training mode, and their gap."""
    if not any(math.isfinite(train_mode_acc(r)) for r in runs):
        return []
    parts = split_by(runs, key) if key else {None: runs}
    gaps = []
    for value, part in parts.items():
        for (norm, lr), rs in group_runs(part).items():
            ev = [r.final_test_acc for r in rs]
            tr = [train_mode_acc(r) for r in rs]
            gaps.append(Gap(label="" if key is None else label(key, value), norm=norm, lr=lr, n=len(rs),
                            eval_acc=_finite_mean_std(ev), train_acc=_finite_mean_std(tr),
                            gap=_finite_mean_std([t - e for t, e in zip(tr, ev)])))
    return gaps


# ----------------------------------------------------------------------------- probes


def has_probes(runs: list[Run]) -> bool:
    return any("probe/beta" in r.curves for r in runs)


def ics_names(runs: list[Run]) -> list[str]:
    """The layers with ICS curves (`layer2`, ..., `head`), from the input."""
    names = {t.split("/")[1] for r in runs for t in r.curves if t.startswith("ics/") and t.endswith("/l2")}
    return sorted(names, key=lambda n: (n == "head", int(n.removeprefix("layer")) if n != "head" else 0))


def probe_series(run: Run, quantity: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of one probe quantity: 'loss range', 'grad change', 'beta', 'ics/<layer>/l2|cos'."""
    if quantity == "loss range":
        if "probe/loss_max" not in run.curves or "probe/loss_min" not in run.curves:
            return None
        (steps, hi), (_, lo) = run.curves["probe/loss_max"], run.curves["probe/loss_min"]
        return steps, hi - lo
    tag = PROBE_TAGS.get(quantity, quantity)
    return run.curves.get(tag)


def probe_quantities(runs: list[Run]) -> list[str]:
    """Every probe quantity the runs have: the landscape ones, then ICS per layer (l2, cos)."""
    return list(PROBES) + [f"ics/{n}/{m}" for n in ics_names(runs) for m in ("l2", "cos")]


def run_mean(run: Run, quantity: str) -> float:
    """The mean of a quantity over a run's probe steps (non-finite values, e.g. after divergence, left out)."""
    series = probe_series(run, quantity)
    if series is None:
        return float("nan")
    values = series[1][np.isfinite(series[1])]
    return float(values.mean()) if values.size else float("nan")


def probe_stats(runs: list[Run], key: str | None = None) -> list[ProbeRow]:
    """Per (study value, norm, lr): each probe quantity's mean +- std over seeds of per-run means."""
    probed = [r for r in runs if "probe/beta" in r.curves]
    if not probed:
        return []
    quantities = probe_quantities(probed)
    parts = split_by(probed, key) if key else {None: probed}
    rows = []
    for value, part in parts.items():
        for (norm, lr), rs in group_runs(part).items():
            values = {q: _finite_mean_std([run_mean(r, q) for r in rs]) for q in quantities}
            rows.append(ProbeRow("" if key is None else label(key, value), norm, lr, len(rs), values))
    return rows


def probe_ratios(runs: list[Run], key: str | None = None) -> list[ProbeRatio]:
    """Per (study value, lr) and norm other than none: mean(norm's per-run means) / mean(none's), with intervals."""
    probed = [r for r in runs if "probe/beta" in r.curves]
    if not probed:
        return []
    quantities = probe_quantities(probed)
    parts = split_by(probed, key) if key else {None: probed}
    out = []
    for value, part in parts.items():
        groups = group_runs(part)
        for (norm, lr), rs in groups.items():
            base = groups.get(("none", lr))
            if norm == "none" or base is None:
                continue
            b, v, paired = pair_by_seed(base, rs)
            ratios = {}
            for q in quantities:
                bq, vq = np.array([run_mean(r, q) for r in b]), np.array([run_mean(r, q) for r in v])
                keep = np.isfinite(bq) & np.isfinite(vq) if paired else None
                vq, bq = (vq[keep], bq[keep]) if paired else (vq[np.isfinite(vq)], bq[np.isfinite(bq)])
                ratios[q] = bootstrap(mean_ratio, vq, bq, paired)
                if ratios[q] is None and vq.size and bq.size:  # one run a side: the estimate, no interval
                    ratios[q] = Interval(float(mean_ratio(vq, bq)), math.nan, math.nan, min(vq.size, bq.size), paired)
            out.append(ProbeRatio("" if key is None else label(key, value), norm, lr, ratios))
    return out
