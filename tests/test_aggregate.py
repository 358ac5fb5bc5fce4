"""Seed aggregates (bnexp/report/aggregate.py): written as TensorBoard runs, read back with EventAccumulator.

The runs are synthetic with values exact in float32, so every statistic is checked exactly.
What the real TensorBoard server makes of them: test_tensorboard_server.py.
"""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata

from bnexp.report import aggregate
from bnexp.report.runs import Run, dirs_without_summary, load_runs

EVALS = np.array([0, 10, 20])


def make_run(sweep, norm, lr, seed, acc, loss=None, write=False):
    """A Run with val/acc, val/loss at EVALS, test/acc and test/loss once at the end (step 20) and
    train/loss at steps 1..20."""
    path = sweep / f"norm={norm},optim.lr={lr:g},seed={seed}"
    path.mkdir(parents=True, exist_ok=True)
    config = {"name": "t", "norm.name": norm, "optim.lr": lr, "seed": seed, "train.steps": 20,
              "data.root": f"/machine/{seed}"}
    summary = {"status": "completed", "norm": norm, "seed": seed, "steps_done": 20, "diverged_at_step": None,
               "final": {"val_acc": acc[-1], "test_acc": 0.5}, "steps_to_val_acc": {"0.95": None}, "config": config}
    loss = np.arange(1, 21, dtype=float) / 4 + seed if loss is None else loss
    end = EVALS[-1:]
    curves = {"val/acc": (EVALS, np.array(acc, dtype=float)), "val/loss": (EVALS, 1 - np.array(acc, dtype=float)),
              "test/acc": (end, np.array([0.5])), "test/loss": (end, np.array([0.5])),
              "train/loss": (np.arange(1, 21), loss)}
    if write:
        (path / "summary.json").write_text(json.dumps(summary))
    return Run(path, summary, curves)


def read(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def values(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture
def runs(tmp_path):
    sweep = tmp_path / "sweep"
    return sweep, [
        make_run(sweep, "custom", 0.1, 0, [0.25, 0.5, 0.75]),
        make_run(sweep, "custom", 0.1, 1, [0.5, 0.75, 1.0]),
        make_run(sweep, "custom", 0.1, 2, [0.75, 1.0, math.nan]),  # diverged before the last eval
        make_run(sweep, "none", 0.1, 0, [0.25, 0.25, 0.5]),
        make_run(sweep, "custom", 1.0, 0, [0.5, 0.5, 0.5]),
    ]


def test_groups_are_configs_without_seed_named_by_what_varies(runs):
    sweep, rs = runs
    groups = aggregate.group_runs_by_config(rs)
    assert sorted(groups) == ["norm=custom,optim.lr=0.1", "norm=custom,optim.lr=1", "norm=none,optim.lr=0.1"]
    assert [r.seed for r in groups["norm=custom,optim.lr=0.1"]] == [0, 1, 2]  # data.root differs: ignored


def test_mean_min_max_std_over_seeds_at_every_eval(runs, tmp_path):
    """Exact statistics; a seed without a finite value at a step drops out there."""
    sweep, rs = runs
    written = aggregate.write_aggregates(rs, sweep, sweep)
    assert sorted(d.name for d in written) == ["norm=custom,optim.lr=0.1", "norm=custom,optim.lr=1",
                                               "norm=none,optim.lr=0.1"]
    acc = read(sweep / "aggregates" / "norm=custom,optim.lr=0.1")
    assert values(acc, "optim.lr=0.1/val/acc/mean") == [(0, 0.5), (10, 0.75), (20, 0.875)]
    assert values(acc, "optim.lr=0.1/val/acc/min") == [(0, 0.25), (10, 0.5), (20, 0.75)]
    assert values(acc, "optim.lr=0.1/val/acc/max") == [(0, 0.75), (10, 1.0), (20, 1.0)]
    std = [v for _, v in values(acc, "optim.lr=0.1/val/acc/std")]
    np.testing.assert_allclose(std, [0.25, 0.25, math.sqrt(0.03125)], rtol=1e-6)  # float32 storage
    assert values(acc, "optim.lr=0.1/val/loss/max") == [(0, 0.75), (10, 0.5), (20, 0.25)]
    # the test set's one point per run is a number for report.md, not a curve to aggregate
    assert not [t for t in acc.Tags()["scalars"] if "/test/" in t]
    # train/loss: per seed the mean over (0, 10] and (10, 20], i.e. 5.5/4 + seed and 15.5/4 + seed
    assert values(acc, "optim.lr=0.1/train/loss/mean") == [(10, 1.375 + 1), (20, 3.875 + 1)]
    assert values(acc, "optim.lr=0.1/train/loss/min") == [(10, 1.375), (20, 3.875)]
    one = read(sweep / "aggregates" / "norm=custom,optim.lr=1")
    assert all(math.isnan(v) for _, v in values(one, "optim.lr=1/val/acc/std"))  # one seed: no std
    assert acc.SummaryMetadata("optim.lr=0.1/val/acc/mean").summary_description.startswith("The mean over seeds")


def test_layout_puts_the_norms_of_one_lr_in_margin_charts(runs):
    sweep, rs = runs
    aggregate.write_aggregates(rs, sweep, sweep)
    acc = read(sweep / "aggregates" / "norm=none,optim.lr=0.1")
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "optim.lr=0.1: none / custom / native over seeds"
    series = [(c.title.split(":")[0], list(c.margin.series)) for c in category.chart]
    # written last to first: TensorBoard shows them reversed, val/acc first
    assert [title for title, _ in series] == ["train/loss per eval interval", "val/loss", "val/acc"]
    scalars = set(acc.Tags()["scalars"])
    for _, (s,) in series:
        assert {s.value, s.lower, s.upper} <= scalars and s.value.endswith("/mean")


def test_aggregates_are_not_runs_of_the_sweep_and_a_rerun_replaces_them(tmp_path):
    """load_runs and dirs_without_summary ignore them; a second report leaves no stale group."""
    sweep = tmp_path / "sweep"
    rs = [make_run(sweep, norm, 0.1, seed, [0.25, 0.5, 0.75], write=True)
          for norm in ("none", "custom") for seed in (0, 1)]
    aggregate.write_aggregates(rs, sweep, sweep)
    assert len(load_runs(sweep)) == 4 and dirs_without_summary(sweep) == []
    marker = json.loads((sweep / "aggregates" / "norm=custom" / "aggregate.json").read_text())
    assert marker["runs"] == ["norm=custom,optim.lr=0.1,seed=0", "norm=custom,optim.lr=0.1,seed=1"]
    assert marker["seeds"] == [0, 1] and "data.root" not in marker["config"]
    aggregate.write_aggregates([r for r in rs if r.norm == "none"], sweep, sweep)
    assert [d.name for d in (sweep / "aggregates").iterdir()] == ["all"]  # only none left: nothing varies
