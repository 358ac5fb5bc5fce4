"""A sweep dir as data: one `Run` per run dir, with its summary.json and TensorBoard scalars.

A sweep dir holds one run dir per (norm, lr, seed), found at any depth, each with `summary.json`
and event files (docs/design.md#summaryjson and docs/design.md#tensorboard-tags fix both).
`load_runs` reads them all and refuses, in one line, what the report cannot use: a missing or
empty dir, a summary.json without the contract's fields (one made by a bnexp that counted steps
on the test set among them), runs of different experiments mixed in one dir.

Choose on validation, report on test: steps to a target come from `steps_to_val_acc` and the
`val/acc` curve, and every choice is made on them; `final.test_acc` is the test set's one
evaluation at the end of a run, which the report shows and never chooses on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.run.summary import STATUSES, Status, Summary

AGGREGATE_MARKER = "aggregate.json"  # in every aggregate run dir (bnexp/report/aggregate.py): not a run

STEPS_KEY, STEPS_CURVE = "steps_to_val_acc", "val/acc"  # steps to a target count on validation
OLD_STEPS_KEY = "steps_to_test_acc"  # what a bnexp before the move to validation wrote instead
# the Summary fields the report cannot do without (it reads the others with .get: they may be absent)
REQUIRED_KEYS = ("status", "norm", "seed", "steps_done", "final", STEPS_KEY, "config")
REQUIRED_CONFIG_KEYS = ("optim.lr", "train.steps")


class ReportError(Exception):
    """A sweep dir the report cannot use; the message is one line saying what and where."""


@dataclass
class Run:
    """One run dir: its summary.json and its TensorBoard scalars (tag -> (steps, values))."""

    path: Path
    summary: Summary
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def norm(self) -> str:
        return self.summary["norm"]

    @property
    def seed(self):
        return self.summary["seed"]

    @property
    def lr(self) -> float:
        return float(self.config["optim.lr"])

    @property
    def status(self) -> Status:
        return self.summary["status"]

    @property
    def experiment(self) -> str:
        return str(self.config.get("name", "default"))

    @property
    def budget(self) -> int:
        return int(self.config["train.steps"])

    def _final(self, key: str) -> float:
        value = (self.summary.get("final") or {}).get(key)
        return float("nan") if value is None else float(value)

    @property
    def final_test_acc(self) -> float:
        """The test set's accuracy from its one evaluation at the end: reported, never chosen on.
        NaN when the run has none (interrupted before its end, or a diverged run's null)."""
        return self._final("test_acc")

    @property
    def final_val_acc(self) -> float:
        """Validation accuracy at the last evaluation (what ties between choices are broken by); NaN if none."""
        return self._final("val_acc")

    @property
    def mean_val_err(self) -> float:
        """The average validation error over the run (summary.json's area under the curve); NaN if none."""
        value = self.summary.get("mean_val_err")
        return float("nan") if value is None else float(value)

    @property
    def first_eval(self) -> int | None:
        """The first evaluated step after step 0 (None without a val/acc curve): a target first seen
        there may have been crossed at any step before it, so its step count is an upper bound."""
        if STEPS_CURVE not in self.curves:
            return None
        later = [int(s) for s in self.curves[STEPS_CURVE][0] if s > 0]
        return later[0] if later else None

    def steps_to(self, target: float) -> int | None:
        """First evaluated step with validation acc >= target, or None: from summary.json, else the val/acc curve."""
        for key, steps in (self.summary[STEPS_KEY] or {}).items():
            if math.isclose(float(key), target):
                return None if steps is None else int(steps)
        if STEPS_CURVE not in self.curves:
            keys = sorted(self.summary[STEPS_KEY] or {})
            raise ReportError(f"{self.path}: target {target} is not in {STEPS_KEY} {keys} and the run "
                              f"has no {STEPS_CURVE} curve to compute it from; use one of those targets")
        steps, acc = self.curves[STEPS_CURVE]
        hits = np.flatnonzero(acc >= target)
        return int(steps[hits[0]]) if hits.size else None

    def censor_step(self) -> int:
        """The step an unreached target counts at: the budget, or steps_done if interrupted (it may have got there later)."""
        return int(self.summary["steps_done"]) if self.status == "interrupted" else self.budget


def load_runs(sweep_dir) -> list[Run]:
    """Every run below sweep_dir that has a summary.json (found recursively), with its scalar curves."""
    root = _check_sweep_dir(sweep_dir)
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        n = len(dirs_without_summary(root))
        raise ReportError(f"no runs in {root}: no summary.json anywhere below it ({n} run dirs without one)")
    runs = [Run(p.parent, _read_summary(p), read_curves(p.parent)) for p in paths]
    _check_one_experiment(runs)
    return runs


def _check_sweep_dir(sweep_dir) -> Path:
    root = Path(sweep_dir)
    if not root.exists():
        raise ReportError(f"sweep dir {root} does not exist; pass a dir like outputs/multirun/<experiment>/<stamp>")
    if not root.is_dir():
        raise ReportError(f"sweep dir {root} is not a directory")
    if not any(root.iterdir()):
        raise ReportError(f"sweep dir {root} is empty: no run dirs in it")
    return root


def dirs_without_summary(sweep_dir) -> list[Path]:
    """Dirs that look like a run (.hydra/, event files or a checkpoint) but have no summary.json."""
    root = Path(sweep_dir)
    done = {p.parent for p in root.rglob("summary.json")}
    found = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        hidden = any(part.startswith(".") for part in d.relative_to(root).parts)
        inside_run = any(parent in done for parent in d.parents)  # e.g. a nested hparams run
        if hidden or inside_run or d in done or (d / AGGREGATE_MARKER).exists():  # the report's own aggregates
            continue
        if (d / ".hydra").is_dir() or (d / "checkpoint.pt").exists() or any(d.glob("events.out.tfevents.*")):
            found.append(d)
    return found


def _read_summary(path: Path) -> Summary:
    try:
        summary = json.loads(path.read_text())  # NaN literals from a diverged run parse as float nan
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read as JSON ({err})") from None
    if OLD_STEPS_KEY in summary and STEPS_KEY not in summary:
        raise ReportError(f"{path}: made by a bnexp before choices moved to validation ({OLD_STEPS_KEY}, "
                          f"no {STEPS_KEY}); rerun the sweep with this version")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    missing += [f"config[{k!r}]" for k in REQUIRED_CONFIG_KEYS if k not in (summary.get("config") or {})]
    if missing:
        raise ReportError(f"{path}: summary.json lacks {', '.join(missing)}")
    if summary["status"] not in STATUSES:
        raise ReportError(f"{path}: status {summary['status']!r} is not one of {', '.join(STATUSES)}")
    return summary


def read_curves(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar tags of the event files directly in run_dir, as (steps, values) sorted by step."""
    if not any(Path(run_dir).glob("events.out.tfevents.*")):
        return {}
    # note: parses every event in the files, the slow part of loading a sweep (measured for a
    # 10k-step run: docs/results/measurements.md#reading-event-files)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()  # also drops events orphaned by a resumed run's purge_step marker
    curves = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a repeated step keeps its last value
        steps = np.array(sorted(by_step), dtype=np.int64)
        curves[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return curves


def _check_one_experiment(runs: list[Run]) -> None:
    names: dict[str, list[Run]] = {}
    for run in runs:
        names.setdefault(run.experiment, []).append(run)
    if len(names) > 1:
        listed = "; ".join(f"{name}: {len(rs)} runs, e.g. {rs[0].path}" for name, rs in sorted(names.items()))
        raise ReportError(f"runs mix experiments ({listed}); report one experiment's sweep at a time")
