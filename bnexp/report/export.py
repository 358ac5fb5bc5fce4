"""A sweep as two tidy CSV tables, for pandas, R or a spreadsheet (`pandas.read_csv(path)`, no options).

- runs.csv: one row per run: `run` (its dir relative to the sweep dir), every config key but
  the machine's paths (`data.root`: published tables hold no path of the machine that made them),
  `status`, `steps_done`, `diverged_at_step`, the final metrics (`final_train_loss`,
  `final_val_acc`, `final_val_loss`, `final_test_acc`, `final_test_loss` always, in that order,
  then any others a summary has, e.g. `final_test_acc_train_mode`), the steps to each validation
  accuracy threshold (`steps_to_val_acc_0.95`, empty when never reached), timing.
- curves.csv: one row per logged scalar point: `run`, `tag`, `step`, `value`.

Empty cells are missing values (None in summary.json); NaN and inf are written as `nan`, `inf`,
which pandas reads as floats.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnexp.report.runs import Run

RESULT_COLUMNS = ("status", "steps_done", "diverged_at_step", "mean_val_err")
# summary.json's `final` keys, as final_<key> columns in this order even where a summary lacks one
# (final.test_* are null for a run interrupted before its end, whose test set was never evaluated)
FINAL_KEYS = ("train_loss", "val_acc", "val_loss", "test_acc", "test_loss")
STEPS_KEY = "steps_to_val_acc"  # summary.json's steps to each validation accuracy: steps_to_val_acc_<t> columns
TIMING_COLUMNS = ("wall_s", "train_steps_per_s")
MACHINE_KEYS = ("data.root",)  # a path of the machine that ran the sweep, not part of the experiment


def run_id(run: Run, sweep_dir) -> str:
    """The run's dir relative to the sweep dir: the name TensorBoard shows for `--logdir <sweep>`."""
    return Path(os.path.relpath(run.path, sweep_dir)).as_posix()


def _cell(value: Any) -> Any:
    return "" if value is None else value


def _thresholds(runs: list[Run]) -> list[str]:
    keys = {k for r in runs for k in (r.summary.get(STEPS_KEY) or {})}
    return sorted(keys, key=float)


def runs_table(runs: list[Run], sweep_dir) -> tuple[list[str], list[dict]]:
    """(header, rows) of runs.csv."""
    config_keys = list(dict.fromkeys(k for r in runs for k in r.config if k not in MACHINE_KEYS))
    final_keys = list(dict.fromkeys([*FINAL_KEYS, *(k for r in runs for k in (r.summary.get("final") or {}))]))
    thresholds = _thresholds(runs)
    header = ["run", *config_keys, *RESULT_COLUMNS, *(f"final_{k}" for k in final_keys),
              *(f"{STEPS_KEY}_{t}" for t in thresholds), *TIMING_COLUMNS]
    rows = []
    for run in sorted(runs, key=lambda r: run_id(r, sweep_dir)):
        s = run.summary
        row = {"run": run_id(run, sweep_dir), **{k: run.config.get(k) for k in config_keys}}
        row.update({k: s.get(k) for k in (*RESULT_COLUMNS, *TIMING_COLUMNS)})
        row.update({f"final_{k}": (s.get("final") or {}).get(k) for k in final_keys})
        row.update({f"{STEPS_KEY}_{t}": (s.get(STEPS_KEY) or {}).get(t) for t in thresholds})
        rows.append({k: _cell(v) for k, v in row.items()})
    return header, rows


def curve_rows(runs: list[Run], sweep_dir):
    """(run, tag, step, value) for every scalar point of every run, by run, tag and step.

    Values are float32 in the event files: 9 significant digits give them back exactly.
    """
    for run in sorted(runs, key=lambda r: run_id(r, sweep_dir)):
        name = run_id(run, sweep_dir)
        for tag in sorted(run.curves):
            steps, values = run.curves[tag]
            for step, value in zip(steps.tolist(), values.tolist()):
                yield name, tag, step, f"{value:.9g}"


def write_exports(runs: list[Run], sweep_dir, out_dir, prefix: str = "") -> list[Path]:
    """Write <out>/<prefix>runs.csv and <out>/<prefix>curves.csv; returns their paths."""
    out = Path(out_dir)
    runs_csv, curves_csv = out / f"{prefix}runs.csv", out / f"{prefix}curves.csv"
    header, rows = runs_table(runs, sweep_dir)
    with open(runs_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    with open(curves_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("run", "tag", "step", "value"))
        writer.writerows(curve_rows(runs, sweep_dir))  # note: every train/loss point: ~1 row per step per run
    return [runs_csv, curves_csv]
