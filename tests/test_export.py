"""runs.csv and curves.csv (bnexp/report/export.py), read back with the csv module as a plain reader would."""

import csv
import math

import numpy as np

from bnexp.report.export import write_exports
from bnexp.report.runs import Run


def make_run(sweep, rel, status="completed", steps_to=None, final_acc=0.96):
    """A Run as the writer leaves it: val/acc at every evaluation, test/acc once at the end; an
    interrupted run has no test numbers (null)."""
    config = {"name": "t", "norm.name": "custom", "optim.lr": 0.1, "model.widths": "[100, 100]",
              "data.normalize": True, "seed": 0, "data.root": "/home/someone/bnexp/data"}
    tested = status != "interrupted"
    summary = {"status": status, "norm": "custom", "seed": 0, "steps_done": 20,
               "diverged_at_step": 20 if status == "diverged" else None,
               "final": {"train_loss": 0.5, "val_acc": final_acc, "val_loss": 0.125,
                         "test_acc": final_acc - 0.01 if tested else None, "test_loss": math.nan if tested else None},
               "steps_to_val_acc": steps_to or {"0.90": 10, "0.95": None},
               "wall_s": 1.5, "train_steps_per_s": 900.0, "config": config}
    curves = {"val/acc": (np.array([0, 10, 20]), np.array([0.1, 0.9, 0.96], dtype=np.float32).astype(float)),
              "test/acc": (np.array([20]), np.array([0.95])),
              "train/loss": (np.array([1, 2]), np.array([2.5, math.inf]))}
    return Run(sweep / rel, summary, curves)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_runs_csv_one_row_per_run_with_config_status_finals_and_thresholds(tmp_path):
    sweep = tmp_path / "sweep"
    runs = [make_run(sweep, "b/norm=custom,seed=0"), make_run(sweep, "a", "diverged", {"0.90": None, "0.95": None}),
            make_run(sweep, "c", "interrupted")]
    runs_csv, _ = write_exports(runs, sweep, tmp_path)
    rows = read_csv(runs_csv)
    assert [r["run"] for r in rows] == ["a", "b/norm=custom,seed=0", "c"]  # relative to the sweep, sorted
    a, b, c = rows
    for key in ("name", "norm.name", "optim.lr", "model.widths", "data.normalize", "seed", "status",
                "steps_done", "diverged_at_step", "final_test_acc", "final_val_acc", "final_val_loss",
                "final_train_loss", "final_test_loss", "steps_to_val_acc_0.90", "steps_to_val_acc_0.95", "wall_s",
                "train_steps_per_s"):
        assert key in b, key
    assert not [k for k in b if k.startswith("steps_to_") and not k.startswith("steps_to_val_acc_")]
    finals = [k for k in b if k.startswith("final_")]
    assert finals == ["final_train_loss", "final_val_acc", "final_val_loss", "final_test_acc", "final_test_loss"]
    assert b["model.widths"] == "[100, 100]" and b["data.normalize"] == "True" and float(b["optim.lr"]) == 0.1
    assert (b["status"], b["steps_to_val_acc_0.90"], b["steps_to_val_acc_0.95"], b["diverged_at_step"]) == (
        "completed", "10", "", "")
    assert (a["status"], a["diverged_at_step"], a["steps_to_val_acc_0.90"]) == ("diverged", "20", "")
    assert float(b["final_test_acc"]) == 0.95 and math.isnan(float(b["final_test_loss"]))
    assert (float(b["final_val_acc"]), float(b["final_val_loss"])) == (0.96, 0.125)
    assert (c["final_test_acc"], c["final_test_loss"], c["final_val_acc"]) == ("", "", "0.96")  # never tested
    assert "data.root" not in b  # published tables hold no path of the machine that made them


def test_curves_csv_is_tidy_and_exact_for_float32(tmp_path):
    sweep = tmp_path / "sweep"
    run = make_run(sweep, "r")
    _, curves_csv = write_exports([run], sweep, tmp_path, prefix="x_")
    assert curves_csv.name == "x_curves.csv" and (tmp_path / "x_runs.csv").exists()
    rows = read_csv(curves_csv)
    assert list(rows[0]) == ["run", "tag", "step", "value"]
    assert [(r["tag"], int(r["step"])) for r in rows] == [("test/acc", 20), ("train/loss", 1), ("train/loss", 2),
                                                           ("val/acc", 0), ("val/acc", 10), ("val/acc", 20)]
    got = np.array([float(r["value"]) for r in rows[3:]], dtype=np.float32)
    assert np.array_equal(got, np.array([0.1, 0.9, 0.96], dtype=np.float32))  # 9 digits give float32 back
    assert rows[2]["value"] == "inf"
