"""The evaluation schedule (bnexp/run/schedule.py): linear and log-spaced evaluations, the
boundaries the loop stops at, and the area-under-the-curve measure summary.json carries."""

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.config import ConfigError, TrainConfig
from bnexp.run.loop import train
from bnexp.run.schedule import (eval_steps, is_eval_point, mean_val_err, previous_eval, resolution,
                                segment_ends)
from conftest import TINY_OVERRIDES, TRAIN_SCRIPT, run_script, tiny_config


def test_linear_schedule_is_every_eval_every_steps_and_the_last():
    t = TrainConfig(steps=1050, eval_every=100, checkpoint_every=1000)
    assert eval_steps(t) == tuple(range(100, 1001, 100)) + (1050,)
    assert resolution(t) == "every 100 steps (11 evaluations)"


def test_log_schedule_has_as_many_evaluations_a_constant_factor_apart():
    t = TrainConfig(steps=4000, eval_every=100, eval_schedule="log", checkpoint_every=4000)
    steps = eval_steps(t)
    assert len(steps) == 40 == len(eval_steps(TrainConfig(steps=4000, eval_every=100)))  # no more evaluation cost
    assert steps[:3] == (100, 110, 121) and steps[-2:] == (3639, 4000)
    ratios = np.array(steps[1:]) / np.array(steps[:-1])
    assert np.all(np.abs(ratios - 40 ** (1 / 39)) < 0.006)  # 9.9% apart, up to rounding to whole steps
    assert resolution(t) == "40 evaluations spaced evenly in log(step) from 100 to 4000, ~10% apart"
    assert previous_eval(121, t) == 110 and previous_eval(100, t) == 0


def test_log_schedule_with_few_steps_keeps_distinct_whole_steps():
    t = TrainConfig(steps=30, eval_every=1, eval_schedule="log", checkpoint_every=30)
    steps = eval_steps(t)
    assert steps[0] == 1 and steps[-1] == 30 and list(steps) == sorted(set(steps))
    assert len(steps) <= 30


def test_test_every_adds_its_multiples_to_the_evaluations():
    t = TrainConfig(steps=4000, eval_every=100, eval_schedule="log", test_every=1000, checkpoint_every=4000)
    assert {1000, 2000, 3000, 4000} <= set(eval_steps(t))


@pytest.mark.parametrize("schedule", ["linear", "log"])
def test_segments_stop_at_every_evaluation_and_checkpoint(schedule):
    t = TrainConfig(steps=2000, eval_every=100, eval_schedule=schedule, checkpoint_every=70)
    for start in (0, 13, 140, 1999):
        ends = list(segment_ends(start, t))
        want = sorted({s for s in eval_steps(t) if s > start} | set(range(70, 2000, 70)) - set(range(start + 1))
                      | {2000})
        assert ends == want
        assert all(is_eval_point(e, t) or e % 70 == 0 or e == 2000 for e in ends)


def test_mean_val_err_is_the_area_under_the_error_curve_over_the_budget():
    evals = [{"step": 0, "val/acc": 0.1}, {"step": 100, "val/acc": 0.5}, {"step": 400, "val/acc": 0.9}]
    area = 100 * (0.9 + 0.5) / 2 + 300 * (0.5 + 0.1) / 2
    assert math.isclose(mean_val_err(evals, 400, diverged=False), round(area / 400, 6))
    # a diverged run counts at chance from its last evaluation to the budget; an interrupted one has none
    diverged = mean_val_err(evals[:2], 400, diverged=True)
    assert math.isclose(diverged, round((100 * (0.9 + 0.5) / 2 + 300 * 0.9) / 400, 6))
    assert mean_val_err(evals[:2], 400, diverged=False) is None


def test_a_bad_schedule_is_one_line_naming_the_choices(tiny_mnist):
    with pytest.raises(ConfigError, match=r"^train.eval_schedule='cubic' is not allowed: one of linear, log$"):
        tiny_config(tiny_mnist, "train.eval_schedule=cubic")


def _val_curve(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("val/acc")]


def test_a_log_scheduled_run_evaluates_where_the_schedule_says(tiny_mnist, tmp_path):
    cfg = tiny_config(tiny_mnist, "train.steps=300", "train.eval_every=30", "train.eval_schedule=log",
                      "train.checkpoint_every=300")
    summary = train(cfg, tmp_path / "run", progress="quiet")
    curve = _val_curve(tmp_path / "run")
    assert [s for s, _ in curve] == [0, *eval_steps(cfg.train)]
    assert [s for s, _ in curve][1:4] == [30, 39, 50]
    steps, err = np.array([s for s, _ in curve]), 1 - np.array([v for _, v in curve], dtype=np.float64)
    area = float(np.sum(np.diff(steps) * (err[1:] + err[:-1]) / 2)) / 300
    assert summary["mean_val_err"] == pytest.approx(area, abs=2e-6)  # float32 event values vs summary's floats
    first = summary["steps_to_val_acc"]["0.90"]
    assert first is None or first in eval_steps(cfg.train)


RESUMABLE = [*TINY_OVERRIDES, "model.widths=[128,128]", "train.steps=2000", "train.eval_every=100",
             "train.eval_schedule=log", "train.checkpoint_every=70", "norm=custom", "optim.lr=0.05"]


@pytest.mark.slow
def test_a_killed_log_scheduled_run_resumes_bitwise(tiny_mnist, tmp_path):
    """A run killed after a checkpoint between two log-spaced evaluations resumes to the same numbers."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for d in (ref, cut):
        d.mkdir()
    args = [*RESUMABLE, f"data.root={tiny_mnist}"]
    assert run_script(*args, f"hydra.run.dir={ref}", cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args, f"hydra.run.dir={cut}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_script(*args, f"hydra.run.dir={cut}", cwd=tmp_path).returncode == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    for key in ("status", "steps_done", "final", "steps_to_val_acc", "mean_val_err"):
        assert a[key] == b[key], key
    assert _val_curve(ref) == _val_curve(cut)
    pa, pb = torch.load(ref / "model.pt"), torch.load(cut / "model.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
