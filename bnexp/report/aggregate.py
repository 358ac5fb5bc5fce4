"""Seeds aggregated for TensorBoard: one run per configuration, its mean and spread over seeds.

TensorBoard cannot group runs (its issue #376), so the report writes the groups as runs of their
own, beside report.md:

    <out>/<prefix>aggregates/norm=custom,optim.lr=0.1/     events + aggregate.json
    <out>/<prefix>aggregates/norm=none,optim.lr=0.1/       ...

A group is every run with the same config but the seed (and the keys that say where or how a
run was resumed, IGNORED_KEYS); it is named by the keys that vary between groups, as Hydra names
sweep jobs. Each aggregate run holds, at every evaluated step, the mean, min, max and std (ddof=1)
over seeds of val/acc, val/loss, and of train/loss averaged over each eval interval. The test set
is evaluated once, at the end of a run (one test/acc point per run: a number for report.md, not a
curve), so it is not aggregated here. Statistics use the seeds with a finite value at that step:
a diverged seed drops out.

The tags start with the rest of the group name without the norm, e.g. `optim.lr=0.1/val/acc/mean`,
because TensorBoard draws every run that has a chart's tags in that chart: so the Scalars tab
groups none/custom/native of one learning rate together, and the custom-scalars layout written
into the same runs gives one margin chart (mean with its min..max band) per metric and lr.

`aggregate.json` in each dir says which runs went in; the sweep loader skips dirs holding it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from torch.utils.tensorboard import SummaryWriter

from bnexp.report.runs import AGGREGATE_MARKER, Run

AGGREGATES_DIR = "aggregates"
MARKER = AGGREGATE_MARKER  # in every aggregate run dir; bnexp.report.runs.dirs_without_summary skips them
IGNORED_KEYS = ("seed", "data.root", "train.resume")  # not part of what a configuration is
EVAL_METRICS = ("val/acc", "val/loss")  # curves at every evaluation; test/* has one point per run
LOSS = "train/loss"
STATS = ("mean", "min", "max", "std")
SHORT_KEYS = {"norm.name": "norm", "optim.name": "optim"}  # config groups, named as on the command line
NORM_KEY = "norm.name"


def aggregates_dir(out_dir, prefix: str = "") -> Path:
    return Path(out_dir) / f"{prefix}{AGGREGATES_DIR}"


def config_without_seed(run: Run) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in run.config.items() if k not in IGNORED_KEYS))


def _value(v) -> str:
    """A config value as the command line writes it: 1.0 -> '1', 0.1 -> '0.1' (repr where 'g' loses digits)."""
    if isinstance(v, float) and math.isfinite(v) and float(f"{v:g}") == v:
        return f"{v:g}"
    return str(v).replace("/", "_")  # a dir name, and a tag prefix: no nesting


def _label(config: dict, keys: Iterable[str]) -> str:
    """`norm=custom,optim.lr=0.1`: the keys sorted as Hydra sorts overrides; 'all' when none."""
    items = sorted(f"{SHORT_KEYS.get(k, k)}={_value(config[k])}" for k in keys if k in config)
    return ",".join(items) or "all"


def group_runs_by_config(runs: list[Run]) -> dict[str, list[Run]]:
    """{group name: its runs (seeds ascending)}, a group being one config without its seed."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_without_seed(run), []).append(run)
    varying = varying_keys(runs)
    return {_label(rs[0].config, varying): sorted(rs, key=lambda r: str(r.seed))
            for rs in groups.values()}


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys (but IGNORED_KEYS) whose values differ between runs."""
    keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def chart_group(run: Run, varying: list[str]) -> str:
    """The group name without the norm: the runs one margin chart compares, e.g. `optim.lr=0.1`."""
    return _label(run.config, [k for k in varying if k != NORM_KEY])


def interval_means(steps: np.ndarray, values: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the per-step values over each eval interval (previous eval, this eval], at the eval step."""
    out_steps, out_values = [], []
    for lo, hi in zip(evals[:-1], evals[1:]):
        inside = values[(steps > lo) & (steps <= hi)]
        if inside.size:
            out_steps.append(int(hi))
            out_values.append(float(np.mean(inside)))
    return np.array(out_steps, dtype=np.int64), np.array(out_values)


def seed_curves(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The run's curves that are aggregated: the eval metrics, and train/loss per eval interval
    (the intervals between the steps of its val/acc curve, its evaluations)."""
    curves = {tag: run.curves[tag] for tag in EVAL_METRICS if tag in run.curves}
    if LOSS in run.curves and EVAL_METRICS[0] in run.curves:
        curves[LOSS] = interval_means(*run.curves[LOSS], run.curves[EVAL_METRICS[0]][0])
    return curves


def stats_over_seeds(curves: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, dict[str, float]]:
    """{step: {mean, min, max, std}} over the curves' finite values at each step (std NaN for one)."""
    by_step: dict[int, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps.tolist(), values.tolist()):
            if math.isfinite(v):
                by_step.setdefault(int(s), []).append(v)
    out = {}
    for step in sorted(by_step):
        v = np.array(by_step[step])
        out[step] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                     "std": float(v.std(ddof=1)) if v.size > 1 else math.nan}
    return out


def describe(metric: str, stat: str) -> str:
    what = (f"{LOSS} averaged over each eval interval" if metric == LOSS else metric)
    spread = {"mean": "mean", "min": "lowest value", "max": "highest value",
              "std": "sample standard deviation (ddof=1)"}[stat]
    return (f"The {spread} over seeds of {what}, for the config the run is named after; a seed "
            "without a finite value at a step (diverged) is left out there.")


def layout(group: str) -> dict:
    """Custom-scalars layout for one chart group: a margin chart (mean, band min..max) per metric.

    Written last to first: TensorBoard 2.21's custom-scalars tab shows a category's charts in
    reverse order (seen in its screenshots with both loaders), so people see val/acc first.
    """
    charts = {f"{metric}{' per eval interval' if metric == LOSS else ''}: mean over seeds, band min..max":
              ["Margin", [f"{group}/{metric}/{s}" for s in ("mean", "min", "max")]]
              for metric in reversed((*EVAL_METRICS, LOSS))}
    return {f"{group}: none / custom / native over seeds": charts}


def write_aggregate(run_dir: Path, group: str, stats: dict[str, dict[int, dict[str, float]]]) -> None:
    """One aggregate run: every statistic as a scalar with its description, then the layout."""
    writer = SummaryWriter(str(run_dir))
    try:
        for metric, by_step in stats.items():
            for stat in STATS:
                tag = f"{group}/{metric}/{stat}"
                for i, (step, values) in enumerate(by_step.items()):
                    value = Summary.Value(tag=tag, simple_value=values[stat])
                    if i == 0:  # TensorBoard reads plugin and description from a tag's first event
                        value.metadata.CopyFrom(scalar_metadata.create_summary_metadata(
                            tag, describe(metric, stat)))
                    writer.file_writer.add_summary(Summary(value=[value]), step)
        writer.add_custom_scalars(layout(group))
    finally:
        writer.close()


def clear_aggregates(root: Path) -> None:
    """Remove aggregate runs a previous report wrote (dirs holding MARKER), nothing else."""
    if root.is_dir():
        for marker in root.glob(f"*/{MARKER}"):
            shutil.rmtree(marker.parent)


def write_aggregates(runs: list[Run], sweep_dir, out_dir, prefix: str = "") -> list[Path]:
    """Write one aggregate run per config without its seed into <out>/<prefix>aggregates/.

    Runs without curves (train.tensorboard=false) have nothing to aggregate and are skipped;
    returns the aggregate run dirs written.
    """
    root = aggregates_dir(out_dir, prefix)
    clear_aggregates(root)
    varying = varying_keys(runs)
    written = []
    for name, group_runs in group_runs_by_config(runs).items():
        per_seed = [seed_curves(r) for r in group_runs]
        metrics = [m for m in (*EVAL_METRICS, LOSS) if any(m in c for c in per_seed)]
        if not metrics:
            continue
        stats = {m: stats_over_seeds([c[m] for c in per_seed if m in c]) for m in metrics}
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_aggregate(run_dir, chart_group(group_runs[0], varying), stats)
        (run_dir / MARKER).write_text(json.dumps(
            {"sweep": str(sweep_dir), "runs": [os.path.relpath(r.path, sweep_dir) for r in group_runs],
             "seeds": [r.seed for r in group_runs],
             "config": {k: v for k, v in group_runs[0].config.items() if k not in IGNORED_KEYS}}, indent=1))
        written.append(run_dir)
    return written
