"""The why studies in the report (bnexp/report/studies.py, report and figure sections): synthetic sweeps
with known answers, then tiny sweeps of each preset made by the real CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from bnexp.report import write as rep
from bnexp.report import studies
from bnexp.report import runs as swp
from conftest import PROJECT_ROOT, TINY_OVERRIDES, run_script

BUDGET = 1000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(sweep, rel, norm, lr, seed, config, s90, final_acc, train_mode_acc=None, probes=None, name="study"):
    """A run dir: summary.json with `config` merged in, and event files with val/acc (reaching 0.9 at
    s90), test/acc once at the end (final_acc) and the given probe curves ({tag: [(step, value)]})."""
    run_dir = sweep / rel
    run_dir.mkdir(parents=True)
    final_val = 0.5 if s90 is None else 0.9  # the val/acc curve's last value
    final = {"train_loss": 0.1, "val_acc": final_val, "val_loss": 0.25, "test_acc": final_acc, "test_loss": 0.2}
    if train_mode_acc is not None:
        final["test_acc_train_mode"] = train_mode_acc
    summary = {"status": "completed", "norm": norm, "seed": seed, "steps_done": BUDGET, "diverged_at_step": None,
               "final": final, "steps_to_val_acc": {"0.90": s90, "0.95": None, "0.97": None, "0.98": None},
               "wall_s": 1.0, "train_steps_per_s": 1000.0,
               "config": {"name": name, "norm.name": norm, "norm.position": "before", "optim.lr": lr, "seed": seed,
                          "train.steps": BUDGET, "train.batch_size": 60, "train.eval_every": 100,
                          "model.widths": "[100, 100, 100]", **config}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    writer = SummaryWriter(str(run_dir))
    for step in range(0, BUDGET + 1, 100):
        writer.add_scalar("val/acc", 0.5 if s90 is None or step < s90 else 0.9, step)
    writer.add_scalar("test/acc", final_acc, BUDGET)  # the test set's one evaluation, at the end
    for tag, points in (probes or {}).items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


DEPTH = {  # (widths, norm, seed) -> steps to 90% validation accuracy
    ("[100, 100]", "none", 0): 200, ("[100, 100]", "none", 1): 300,
    ("[100, 100]", "custom", 0): 100, ("[100, 100]", "custom", 1): 100,
    ("[100, 100, 100, 100]", "none", 0): None, ("[100, 100, 100, 100]", "none", 1): None,
    ("[100, 100, 100, 100]", "custom", 0): 200, ("[100, 100, 100, 100]", "custom", 1): 200,
}


@pytest.fixture
def depth_sweep(tmp_path):
    for (widths, norm, seed), s90 in DEPTH.items():
        write_run(tmp_path, f"{widths},{norm},{seed}", norm, 1.0, seed, {"model.widths": widths}, s90, 0.9)
    return tmp_path


def test_the_study_is_the_key_that_varies_in_study_order(tmp_path):
    """Depth by layer count, batch size numerically (8 before 32), position before then after."""
    for i, bs in enumerate((32, 8, 128)):
        write_run(tmp_path / "bs", f"r{i}", "custom", 1.0, 0, {"train.batch_size": bs}, 100, 0.9)
    for i, pos in enumerate(("after", "before")):
        write_run(tmp_path / "pos", f"r{i}", "custom", 1.0, 0, {"norm.position": pos}, 100, 0.9)
    runs = swp.load_runs(tmp_path / "bs")
    assert studies.find_study(runs) == "train.batch_size"
    assert list(studies.split_by(runs, "train.batch_size")) == [8, 32, 128]
    runs = swp.load_runs(tmp_path / "pos")
    assert studies.find_study(runs) == "norm.position"
    assert list(studies.split_by(runs, "norm.position")) == ["before", "after"]
    assert studies.label("model.widths", "[100, 100, 100, 100]") == "4 x 100"
    assert studies.label("model.widths", "[16, 8]") == "[16, 8]"


def test_a_sweep_without_a_study_key_is_no_study(tmp_path):
    write_run(tmp_path, "a", "none", 1.0, 0, {}, 100, 0.9)
    write_run(tmp_path, "b", "custom", 1.0, 0, {}, 100, 0.9)
    assert studies.study_stats(swp.load_runs(tmp_path), 0.9) is None


def test_depth_study_splits_before_it_counts(depth_sweep):
    """Each depth gets its own groups and speed-ups: nothing pooled across depths."""
    study = studies.study_stats(swp.load_runs(depth_sweep), 0.9)
    assert (study.name, study.key, study.pooled_keys) == ("depth", "model.widths", [])
    assert [v.label for v in study.values] == ["2 x 100", "4 x 100"]
    shallow, deep = (v.stats.speedup.best[0] for v in study.values)
    assert (shallow.norm, shallow.ratio, shallow.kind) == ("custom", pytest.approx(250 / 100), "=")
    assert (deep.ratio, deep.kind) == (pytest.approx(BUDGET / 200), ">")  # none never got there
    assert study.gaps == []


def test_depth_report_section(depth_sweep):
    report, figures = rep.write_report(depth_sweep, target=0.9)
    text = report.read_text()
    assert "## Study: depth (`model.widths`)" in text and "## Per (norm, lr)" not in text
    assert "| 2 x 100 | none | 1 | 2 | 0 | 250 +- 71 (2/2) |" in text
    # best lr and test accuracy of the chosen lr, then the comparison: none never reached 0.9 at 4 layers (a bound)
    assert ("| 4 x 100 | custom | 1 | 200 +- 0 (2/2) | 200 | 0.9000 +- 0.0000 | > 5.00x | 1.00 [1.00, 1.00] | "
            "faster than none | +0.0000 [+0.0000, +0.0000] | no clear difference |") in text
    assert "| 4 x 100 | none | 1 | > 1000 (0/2) | inf (0/2) |" in text
    assert "Speed-up of custom over none to validation accuracy 0.9, each at its best lr, by hidden layers: " \
           "2 x 100: >= 2.50x [2.00, 3.00] (faster than none), 4 x 100: > 5.00x (faster than none)." in text  # custom hit 0.9 at its first evaluation
    assert "| 4 x 100 | custom | 1 | > 5.00x | 1.00 [1.00, 1.00] | faster than none |" in text
    assert "Test accuracy of each norm at its best lr (chosen on validation; the test set's one evaluation at " \
           "the end of each run): none 2 x 100: 0.9000, 4 x 100: 0.9000; custom" in text
    assert [f.name for f in figures] == ["study.png"]
    assert figures[0].read_bytes()[:8] == PNG_MAGIC


def test_batch_size_gap_table(tmp_path):
    """Train-mode minus eval-mode final test accuracy, per run, then mean +- std over seeds."""
    for seed, (ev, tr) in enumerate(((0.90, 0.80), (0.92, 0.86))):
        write_run(tmp_path, f"b2s{seed}", "custom", 0.2, seed, {"train.batch_size": 2}, None, ev, tr)
        write_run(tmp_path, f"b64s{seed}", "custom", 1.0, seed, {"train.batch_size": 64}, 100, 0.95, 0.95)
    study = studies.study_stats(swp.load_runs(tmp_path), 0.9)
    small = study.gaps[0]
    assert (small.label, small.norm, small.lr, small.n) == ("2", "custom", 0.2, 2)
    assert small.gap[0] == pytest.approx(-0.08) and small.gap[1] == pytest.approx(0.04 / 2**0.5)
    text = rep.write_report(tmp_path, target=0.9)[0].read_text()
    assert "| 2 | custom | 0.2 | 2 | 0.9100 +- 0.0141 | 0.8300 +- 0.0424 | -0.0800 +- 0.0283 |" in text
    assert "The train/eval gap of custom is largest at batch size 2: -0.0800 +- 0.0283 (eval mode" in text


def test_probe_numbers_are_per_run_means_then_over_seeds(tmp_path):
    """loss range = max - min per step, averaged over steps (a NaN step left out), then mean +- std over seeds."""
    for seed, scale in enumerate((1.0, 3.0)):
        probes = {"probe/loss_min": [(10, 1.0), (20, 1.0)], "probe/loss_max": [(10, 1.0 + scale), (20, 1.0 + 3 * scale)],
                  "probe/grad_change": [(10, scale), (20, math.nan)], "probe/beta": [(10, 2.0), (20, 4.0)],
                  "ics/layer2/l2": [(10, 0.5)], "ics/layer2/cos": [(10, 0.9)],
                  "ics/head/l2": [(10, 0.25)], "ics/head/cos": [(10, 0.8)],
                  "ics/layer10/l2": [(10, 0.1)], "ics/layer10/cos": [(10, 0.7)]}
        write_run(tmp_path, f"c{seed}", "custom", 1.0, seed, {}, 100, 0.9, probes=probes)
    write_run(tmp_path, "n0", "none", 1.0, 0, {}, 100, 0.9, probes={"probe/loss_min": [(10, 1.0)],
              "probe/loss_max": [(10, 9.0)], "probe/grad_change": [(10, 4.0)], "probe/beta": [(10, 6.0)]})
    runs = swp.load_runs(tmp_path)
    assert studies.probe_quantities(runs) == ["loss range", "grad change", "beta", "ics/layer2/l2",
                                              "ics/layer2/cos", "ics/layer10/l2", "ics/layer10/cos",
                                              "ics/head/l2", "ics/head/cos"]
    none, custom = studies.probe_stats(runs)
    assert (custom.norm, custom.runs) == ("custom", 2)
    assert custom.values["loss range"] == (pytest.approx(4.0), pytest.approx(np.std([2.0, 6.0], ddof=1)))
    assert custom.values["grad change"][0] == pytest.approx(2.0)  # seeds' means 1 and 3 (NaN left out)
    assert custom.values["beta"] == (pytest.approx(3.0), pytest.approx(0.0))
    assert none.values["ics/head/cos"] == (None, None)
    report = rep.write_report(tmp_path, target=0.9)[0].read_text()
    assert "| custom | 1 | 2 | 4 +- 2.83 | 2 +- 1.41 | 3 +- 0 |" in report
    # one none run: the ratio without an interval, and no verdict
    assert ("At lr 1: custom vs none: loss range 0.5x [n/a, n/a] (too few runs to tell), beta 0.5x [n/a, n/a] "
            "(too few runs to tell); mean cos(G, G') over layers: custom 0.800.") in report
    assert "| custom | 1 | 0.5x [n/a, n/a] | 0.5x [n/a, n/a] | 0.5x [n/a, n/a] |" in report


def test_probe_ratios_have_paired_intervals_and_verdicts(tmp_path):
    """Seeds shared: the ratio of means, resampled by seed pairs, and a verdict that follows the interval."""
    for seed in range(4):
        lo = 1.0 + seed  # the seed moves both norms' loss ranges alike; custom's is half of none's per seed
        write_run(tmp_path, f"n{seed}", "none", 1.0, seed, {}, 100, 0.9, probes={
            "probe/loss_min": [(10, 0.0)], "probe/loss_max": [(10, 2 * lo)], "probe/beta": [(10, 1.0 + seed % 2)],
            "probe/grad_change": [(10, 1.0)]})
        write_run(tmp_path, f"c{seed}", "custom", 1.0, seed, {}, 100, 0.9, probes={
            "probe/loss_min": [(10, 0.0)], "probe/loss_max": [(10, lo)], "probe/beta": [(10, 2.0 - seed % 2)],
            "probe/grad_change": [(10, 1.0)]})
    (ratio,) = studies.probe_ratios(swp.load_runs(tmp_path))
    loss, beta = ratio.ratios["loss range"], ratio.ratios["beta"]
    assert loss.paired and (loss.estimate, loss.low, loss.high) == (0.5, 0.5, 0.5)
    assert beta.estimate == 1.0 and beta.low < 1 < beta.high  # 2 vs 1 and 1 vs 2 per seed: no clear difference
    report = rep.write_report(tmp_path, target=0.9)[0].read_text()
    assert "custom vs none: loss range 0.5x [0.5, 0.5] (smaller), beta 1x [" in report
    assert "(no clear difference)" in report


# the presets' launcher (joblib or batched) with n_jobs=1: the jobs (or groups) run in this process, one after another
SHRINK = [o for o in TINY_OVERRIDES if not o.startswith(("train.steps", "train.eval_every", "train.checkpoint_every"))]
SHRINK += ["hydra.launcher.n_jobs=1"]
CLI_SWEEPS = {  # preset -> overrides that keep its sweep tiny; what its report must show
    "santurkar": (["train.steps=30", "train.eval_every=10", "probe.every=10", "norm=none,custom_noisy",
                   "optim.lr=1.0", "seed=0,1"],
                  ["## Why: loss landscape and internal covariate shift", "| custom_noisy | 1 | 2 |"],
                  ["val_acc.png", "steps_to_target.png", "probes.png", "ics.png"]),
    "depth": (["train.steps=30", "train.eval_every=10", "model.widths=[8],[8,8,8]", "norm=none,custom",
               "optim.lr=1.0", "seed=0"],
              ["## Study: depth (`model.widths`)", "| 3 x 8 | custom | 1 | 1 | 0 |"], ["study.png"]),
    "batch_size": (["train.steps=20", "train.eval_every=10", "train.batch_size=2,16", "norm=custom", "seed=0"],
                   ["## Study: batch_size (`train.batch_size`)", "### Training-mode vs eval-mode accuracy",
                    "| 2 | custom | 0.182574 | 1 |"], ["study.png"]),
    "placement": (["train.steps=20", "train.eval_every=10", "norm=custom", "optim.lr=1.0", "seed=0"],
                  ["## Study: placement (`norm.position`)", "| after | custom | 1 | 1 | 0 |"], ["study.png"]),
}


@pytest.mark.parametrize("preset", sorted(CLI_SWEEPS))
def test_preset_sweep_and_report_through_the_cli(preset, tiny_mnist, tmp_path):
    """The preset's multirun on tiny data (shrunk, in one process), then scripts/report.py on it."""
    overrides, expected, pngs = CLI_SWEEPS[preset]
    sweep = tmp_path / "sweep"
    result = run_script("-m", f"experiment={preset}", *SHRINK, f"data.root={tiny_mnist}", *overrides,
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert all(json.loads(p.read_text())["status"] == "completed" for p in sweep.rglob("summary.json"))
    report = run_script(str(sweep), "--target", "0.5", cwd=tmp_path, script=PROJECT_ROOT / "scripts" / "report.py")
    assert report.returncode == 0, report.stderr
    text = (sweep / "report.md").read_text()
    for line in expected:
        assert line in text
    for png in pngs:
        assert (sweep / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in text
