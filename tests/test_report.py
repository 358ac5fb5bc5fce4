"""Tests for the sweep report (bnexp.report.runs, bnexp.report.stats, bnexp.report.write, bnexp.report.figures) on synthetic
sweep dirs with known answers.

The synthetic sweep (budget 1000 steps, eval every 100, two seeds per group) is written by
write_run(): summary.json per the contract of docs/design.md#summaryjson plus real TensorBoard
event files. Its val/acc curve is a step function consistent with the summary's
steps_to_val_acc and final.val_acc; test/acc is one point at the end (the test set's one
evaluation, final.test_acc), none for an interrupted run. The final test accuracies differ from
the validation ones, so a number taken from the wrong split shows.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from bnexp.report import figures

from bnexp.report import stats

from bnexp.report import runs as swp
from bnexp.report import write as rep
from bnexp.report.stats import mean_std
from bnexp.report import tables
from bnexp.report.tables import fmt_mean_std
from bnexp.run.schedule import mean_val_err

ROOT = Path(__file__).resolve().parents[1]
BUDGET, EVAL_EVERY, N_LOSS = 1000, 100, 150
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def acc_curve(s90, s95, s97, last_step):
    """Eval steps and a step-function validation accuracy that crosses 0.90/0.95/0.97 exactly at s90/s95/s97."""
    steps = np.arange(0, last_step + 1, EVAL_EVERY)
    acc = np.full(len(steps), 0.5)
    for start, value in ((s90, 0.9), (s95, 0.95), (s97, 0.97)):
        if start is not None:
            acc[steps >= start] = value
    return steps, acc


def write_run(sweep, rel, norm, lr, seed, steps_to, final_acc, status="completed", steps_done=BUDGET,
              name="convergence", loss_bumps=(), final_val=None):
    """One synthetic run dir: summary.json + event files (val/acc, test/acc at the end, train/loss, act/layer1..3).

    final_acc is the final test accuracy (None for an interrupted run: its test set was never
    evaluated); the final validation accuracy is final_val, else the val/acc curve's last value
    (NaN when final_acc is NaN: a diverged run's model)."""
    run_dir = sweep / rel
    run_dir.mkdir(parents=True)
    s90, s95, s97 = steps_to
    steps, val = acc_curve(s90, s95, s97, steps_done)
    test_acc = None if status == "interrupted" else final_acc
    if final_val is None:
        final_val = math.nan if test_acc is not None and math.isnan(test_acc) else float(val[-1])
    summary = {
        "status": status, "norm": norm, "seed": seed, "steps_done": steps_done,
        "diverged_at_step": steps_done if status == "diverged" else None,
        "final": {"train_loss": 0.1, "val_acc": final_val, "val_loss": 0.25, "test_acc": test_acc,
                  "test_loss": None if test_acc is None else 0.2},
        "steps_to_val_acc": {"0.90": s90, "0.95": s95, "0.97": s97, "0.98": None},
        "mean_val_err": mean_val_err([{"step": int(a), "val/acc": float(b)} for a, b in zip(steps, val)], BUDGET,
                                     status == "diverged"),
        "wall_s": 1.0, "train_steps_per_s": 1000.0,
        "config": {"name": name, "norm.name": norm, "optim.name": "sgd", "optim.lr": lr, "seed": seed,
                   "train.steps": BUDGET, "train.batch_size": 60, "train.eval_every": EVAL_EVERY,
                   "model.widths": "[100, 100, 100]"},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))  # NaN final acc is written as NaN
    writer = SummaryWriter(str(run_dir))
    for step, acc in zip(steps, val):
        writer.add_scalar("val/acc", acc, int(step))
        for layer in (1, 2, 3):
            for q, offset in (("p15", -1.0), ("p50", 0.0), ("p85", 1.0)):
                writer.add_scalar(f"act/layer{layer}/{q}", offset + step / 1000 * (norm == "none"), int(step))
    if test_acc is not None:  # the test set's one evaluation, at the end
        writer.add_scalar("test/acc", test_acc, steps_done)
    bumps = dict(loss_bumps)
    for step in range(1, min(N_LOSS, steps_done) + 1):
        # exactly representable in float32, so differences below are exact
        writer.add_scalar("train/loss", 2.0 - step / 256 + seed / 64 + bumps.get(step, 0.0), step)
    writer.close()
    return run_dir


# (norm, lr, seed) -> (steps to val acc 0.90/0.95/0.97, final test acc (an interrupted run has none), status, steps_done)
SWEEP = {
    ("none", 0.1, 0): ((600, None, None), 0.93, "completed", BUDGET),
    ("none", 0.1, 1): ((800, None, None), 0.94, "completed", BUDGET),
    ("none", 1.0, 0): ((200, 400, None), 0.96, "completed", BUDGET),
    ("none", 1.0, 1): ((300, 600, 900), 0.97, "completed", BUDGET),
    ("none", 10.0, 0): ((None, None, None), math.nan, "diverged", 50),
    ("none", 10.0, 1): ((400, None, None), 0.92, "interrupted", 500),
    ("custom", 0.1, 0): ((200, 300, 700), 0.975, "completed", BUDGET),
    ("custom", 0.1, 1): ((200, 500, None), 0.968, "completed", BUDGET),
    ("custom", 1.0, 0): ((100, 200, 300), 0.98, "completed", BUDGET),
    ("custom", 1.0, 1): ((100, 300, 400), 0.981, "completed", BUDGET),
    ("custom", 10.0, 0): ((100, 200, 300), 0.982, "completed", BUDGET),
    ("custom", 10.0, 1): ((100, 200, 300), 0.983, "completed", BUDGET),
}
# native = custom at lr 0.1 and 1 (no native at lr 10); final acc shifted by these amounts
NATIVE_ACC_SHIFT = {(0.1, 0): 0.0, (0.1, 1): 0.001, (1.0, 0): 0.0, (1.0, 1): -0.002}
# train/loss bumps: one inside the first 100 steps (counted), one after them (ignored)
NATIVE_LOSS_BUMPS = {(0.1, 0): {7: 2.0**-12}, (1.0, 0): {120: 0.5}}


def write_sweep(sweep: Path) -> Path:
    """The synthetic sweep above, some runs nested one level deeper, plus one dir without a summary."""
    for (norm, lr, seed), (steps, acc, status, done) in SWEEP.items():
        nest = "lr10/" if lr == 10.0 else ""
        write_run(sweep, f"{nest}norm={norm},optim.lr={lr:g},seed={seed}", norm, lr, seed, steps, acc, status, done)
        if norm == "custom" and lr != 10.0:
            write_run(sweep, f"norm=native,optim.lr={lr:g},seed={seed}", "native", lr, seed, steps,
                      acc + NATIVE_ACC_SHIFT[(lr, seed)], status, done, loss_bumps=NATIVE_LOSS_BUMPS.get((lr, seed), {}))
    (sweep / "norm=none,optim.lr=0.1,seed=2" / ".hydra").mkdir(parents=True)  # crashed before summary.json
    (sweep / ".submitit" / "123").mkdir(parents=True)  # launcher bookkeeping: not a run
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def summary(sweep) -> stats.SweepStats:
    return stats.summarize(swp.load_runs(sweep), 0.95, swp.dirs_without_summary(sweep))


def group(summary, norm, lr) -> stats.Group:
    (g,) = [g for g in summary.groups if g.norm == norm and g.lr == lr]
    return g


def test_load_runs_finds_nested_runs_and_curves(sweep):
    """Every summary.json is found, nested ones too; curves come back from the event files."""
    runs = swp.load_runs(sweep)
    assert len(runs) == 16
    nested = [r for r in runs if r.lr == 10.0]
    assert len(nested) == 4 and all(r.path.parent.name == "lr10" for r in nested)
    run = next(r for r in runs if (r.norm, r.lr, r.seed) == ("none", 10.0, 0))
    steps, acc = run.curves["val/acc"]
    assert steps.tolist() == [0] and run.status == "diverged" and math.isnan(run.final_test_acc)
    assert run.curves["test/acc"][0].tolist() == [50]  # the test set once, at the end
    assert run.curves["train/loss"][0].tolist() == list(range(1, 51))


def test_resumed_run_curve_is_continuous(tmp_path):
    """Events a killed process wrote after the resume point are dropped (purge_step marker)."""
    first = SummaryWriter(str(tmp_path))
    for step in range(1, 61):
        first.add_scalar("train/loss", 1.0, step)
    first.close()
    resumed = SummaryWriter(str(tmp_path), purge_step=41)
    for step in range(41, 51):  # stopped again before step 60: steps 51..60 of the first process are stale
        resumed.add_scalar("train/loss", 2.0, step)
    resumed.close()
    steps, loss = swp.read_curves(tmp_path)["train/loss"]
    assert steps.tolist() == list(range(1, 51))
    assert loss.tolist() == [1.0] * 40 + [2.0] * 10


def test_dirs_without_summary(sweep):
    """A run dir that crashed before summary.json counts; hidden launcher dirs and parents do not."""
    assert [p.name for p in swp.dirs_without_summary(sweep)] == ["norm=none,optim.lr=0.1,seed=2"]


def test_counts(summary):
    c = summary.counts
    assert (c.runs, c.completed, c.diverged, c.interrupted) == (16, 14, 1, 1)
    assert len(c.without_summary) == 1
    assert summary.experiment == "convergence" and summary.budgets == [1000]
    assert summary.varying_keys == []


def test_group_order_and_status_counts(summary):
    keys = [(g.norm, g.lr) for g in summary.groups]
    assert keys == [("none", 0.1), ("none", 1.0), ("none", 10.0), ("custom", 0.1), ("custom", 1.0),
                    ("custom", 10.0), ("native", 0.1), ("native", 1.0)]
    g = group(summary, "none", 10.0)
    assert (g.runs, g.diverged, g.interrupted) == (2, 1, 1)


def test_steps_to_target_mean_std_and_reached(summary):
    """Steps to a validation accuracy: mean and sample std over the seeds that reached it; k/n counts every seed."""
    s = group(summary, "custom", 0.1).steps_to
    assert (s[0.95].mean, s[0.95].std, s[0.95].reached, s[0.95].n) == (400, pytest.approx(100 * 2**0.5), 2, 2)
    assert (s[0.97].mean, s[0.97].std, s[0.97].reached) == (700, None, 1)
    assert s[0.97].censored_mean == (700 + 1000) / 2
    s = group(summary, "none", 0.1).steps_to
    assert (s[0.90].mean, s[0.90].std) == (700, pytest.approx(100 * 2**0.5))
    assert (s[0.95].mean, s[0.95].reached, s[0.95].censored_mean) == (None, 0, 1000)
    # diverged run censored at the budget, interrupted one at its steps_done
    assert group(summary, "none", 10.0).steps_to[0.95].censored_mean == (1000 + 500) / 2


def test_final_accuracies_skip_nan_and_missing(summary):
    """Final test acc (reported) and final validation acc (ties) over the runs with a finite value:
    none at lr 10 has a diverged run (NaN) and an interrupted one (validation 0.9, no test set)."""
    acc = group(summary, "none", 10.0).final_val_acc
    assert (acc.mean, acc.std, acc.n) == (0.9, None, 1)
    acc = group(summary, "none", 10.0).final_test_acc
    assert (acc.mean, acc.std, acc.n) == (None, None, 0)
    acc = group(summary, "none", 1.0).final_test_acc
    assert acc.mean == pytest.approx(0.965) and acc.std == pytest.approx(0.01 / 2**0.5)
    acc = group(summary, "none", 1.0).final_val_acc  # the val/acc curves' last values: 0.95 and 0.97
    assert acc.mean == pytest.approx(0.96) and acc.std == pytest.approx(0.02 / 2**0.5)


def test_speedups_per_lr(summary):
    """Exact where both reached; a lower bound where none never did (budget / steps)."""
    got = {(s.norm, s.lr): (s.ratio, s.kind) for s in summary.speedup.by_lr}
    assert got == {
        ("custom", 0.1): (pytest.approx(1000 / 400), ">"),   # none: 0/2 within 1000 steps
        ("custom", 1.0): (pytest.approx(500 / 250), "="),
        ("custom", 10.0): (pytest.approx(750 / 200), ">"),   # none: diverged (1000) + interrupted at 500
        ("native", 0.1): (pytest.approx(1000 / 400), ">"),
        ("native", 1.0): (pytest.approx(500 / 250), "="),
    }


def test_speedups_at_best_lr(summary):
    sp = summary.speedup
    assert sp.none_best_lr == 1.0
    best = {b.norm: (b.lr, b.ratio, b.kind) for b in sp.best}
    assert best == {"custom": (10.0, pytest.approx(500 / 200), "="), "native": (1.0, pytest.approx(500 / 250), "=")}


def test_best_lr_ties_are_broken_on_validation_never_on_test(tmp_path):
    """Same steps to the target at two lrs: the higher final validation accuracy wins, although the
    other lr has the higher test accuracy (and the lower lr, the last tie-break)."""
    for seed in (0, 1):
        write_run(tmp_path, f"a{seed}", "custom", 0.1, seed, (100, 200, 300), 0.99, final_val=0.97)
        write_run(tmp_path, f"b{seed}", "custom", 1.0, seed, (100, 200, 300), 0.95, final_val=0.975)
    groups = stats.summarize(swp.load_runs(tmp_path)).groups
    assert stats.best_group(groups, "custom", 0.95).lr == 1.0
    assert stats.best_group(groups, "custom", 0.97).lr == 1.0


def test_speedup_ratio_is_the_ert_ratio_with_bounds_where_one_side_never_reached():
    """ERT(base) / ERT(variant) where both reached the target at least once (a miss counts its
    steps spent); a lower bound when the base never did, an upper bound when the variant never did,
    n/a when neither did."""
    def steps(per_run, budget=1000):
        spent = [s if s is not None else budget for s in per_run]
        hit = [s for s in per_run if s is not None]
        return stats.StepStats(n=len(per_run), reached=len(hit), mean=None, std=None,
                               censored_mean=sum(spent) / len(spent), steps=list(per_run), spent=spent)
    assert stats.speedup_ratio(steps([500, 700]), steps([300, 300])) == (2.0, "=")
    # base: one hit at 600 and one miss (1000 spent) = 1600 steps per hit; variant 200 per hit
    assert stats.speedup_ratio(steps([600, None]), steps([200, 200])) == (8.0, "=")
    assert stats.speedup_ratio(steps([None, None]), steps([200, 300])) == (4.0, ">")
    assert stats.speedup_ratio(steps([600, 600]), steps([None, None])) == (0.6, "<")
    assert stats.speedup_ratio(steps([None, None]), steps([None, None])) == (None, "n/a")
    assert steps([600, None]).ert == 1600 and steps([None, None]).ert == math.inf
    assert tables.fmt_ratio(4.0, ">") == "> 4.00x" and tables.fmt_ratio(None, "n/a") == "n/a"


def test_agreement(summary):
    """Max |diff| of final test acc over matching (lr, seed); of train/loss over the first 100 steps only."""
    ag = summary.agreement
    assert (ag.pairs, ag.acc_pairs, ag.loss_pairs) == (4, 4, 4)
    assert ag.max_acc_diff == pytest.approx(0.002) and ag.max_acc_pair == (1.0, 1)
    assert ag.max_loss_diff == 2.0**-12 and ag.max_loss_pair == (0.1, 0)
    assert ag.matches is True


def test_agreement_flags_a_mismatch(tmp_path):
    write_run(tmp_path, "c", "custom", 1.0, 0, (100, 200, 300), 0.98)
    write_run(tmp_path, "n", "native", 1.0, 0, (100, 200, 300), 0.90, loss_bumps={3: 0.25})
    ag = stats.agreement(swp.load_runs(tmp_path))
    assert ag.max_acc_diff == pytest.approx(0.08) and ag.max_loss_diff == 0.25 and ag.matches is False


def test_conclusion_is_built_from_the_numbers(summary):
    text = rep.conclusion(summary)
    assert text.startswith("Within 1000 steps, validation accuracy 0.95 was reached by none with every seed at lr 1; "
                           "custom with every seed at lr 0.1, 1, 10; native with every seed at lr 0.1, 1.")
    assert ("Against none at the same lr, custom: faster than none at lr 0.1 (> 2.50x), lr 1 (2.00x [2.00, 2.00]), "
            "lr 10 (> 3.75x).") in text
    assert ("against none at lr 1: custom at lr 10, the edge of its grid, 2.50x [2.00, 3.00], faster than none; "
            "native at lr 1, the edge of its grid, 2.00x [2.00, 2.00], faster than none.") in text
    assert ("not used to choose): none (lr 1) 0.9650 +- 0.0071, custom (lr 10) 0.9825 +- 0.0007, "
            "native (lr 1) 0.9795 +- 0.0007.") in text
    assert "none at lr 10: 1/2 diverged, 1/2 interrupted" in text
    assert "the first training loss by at most 0 (allowed 0.001)" in text and "custom matches native" in text
    assert text.endswith("The first 100 losses agree within 0.000244 at lr 0.1, 1.")


def test_agreement_per_lr_tells_drift_from_a_different_function(tmp_path):
    """Same first loss, same final accuracy, losses drifting later: matches, and the drift is named."""
    write_run(tmp_path, "c", "custom", 1.0, 0, (100, 200, 300), 0.98)
    write_run(tmp_path, "n", "native", 1.0, 0, (100, 200, 300), 0.98, loss_bumps={3: 0.25})
    summary = stats.summarize(swp.load_runs(tmp_path))
    ag = summary.agreement
    assert ag.matches is True and ag.max_step1_diff == 0.0
    assert ag.by_lr == [stats.LrAgreement(lr=1.0, pairs=1, max_acc_diff=0.0, max_loss_diff=0.25, max_step1_diff=0.0)]
    assert "At lr 1 (up to 0.25) they drift apart within the first 100 steps" in rep.conclusion(summary)


def test_target_from_curve_when_not_in_summary(sweep):
    """A target missing from steps_to_val_acc is found on the val/acc curve (test/acc, one point at the end, is not used)."""
    runs = swp.load_runs(sweep)
    run = next(r for r in runs if (r.norm, r.lr, r.seed) == ("custom", 0.1, 1))
    assert run.steps_to(0.93) == 500 and run.steps_to(0.99) is None and run.steps_to(0.9) == 200
    s = stats.summarize(runs, target=0.93)
    assert s.thresholds == [0.9, 0.93, 0.95, 0.97]


def test_bad_target():
    with pytest.raises(swp.ReportError, match="target 1.5 is not a validation accuracy"):
        stats.summarize([], target=1.5)


def test_write_report_markdown_and_figures(tmp_path):
    """report.md has the table rows we can compute by hand; figures are real PNGs."""
    sweep = write_sweep(tmp_path / "sweep")
    report, figures = rep.write_report(sweep)
    text = report.read_text()
    err = fmt_mean_std(mean_std([r.mean_val_err for r in swp.load_runs(sweep) if (r.norm, r.lr) == ("none", 0.1)]),
                       ".4f")
    assert f"| none | 0.1 | 2 | 0 | 0 | 700 +- 141 (2/2) | > 1000 (0/2) | > 1000 (0/2) | inf (0/2) | {err} | 0.9350 +- 0.0071 |" in text
    assert "| none | 10 | 2 | 1 | 1 | 400 (1/2) | > 750 (0/2) | > 750 (0/2) | inf (0/2) |" in text
    assert "| custom | 0.1 | > 1000 (0/2) | 400 +- 141 (2/2) | > 2.50x | 1.00 [1.00, 1.00] | faster than none |" in text
    # the best lr (chosen on validation) at the edge of custom's grid; its test accuracy; paired by seed:
    # none at lr 1 took 400 and 600 steps, custom at lr 10 200 and 200, so the two resampled ratios are 2 and 3
    assert ("| custom | 10 (grid edge) | 200 +- 0 (2/2) | 0.9825 +- 0.0007 | 2.50x [2.00, 3.00] | 1.00 [1.00, 1.00] | "
            "faster than none |") in text
    assert "| no clear difference |" not in text  # every interval here excludes 1 (and 0)
    assert "| norm | lr | runs | diverged | interrupted | steps to 90% val acc |" in text
    assert "Run dirs without summary.json (not counted below): 1" in text
    assert [f.name for f in figures] == ["val_acc.png", "activations.png", "steps_to_target.png"]
    for fig in figures:
        data = fig.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
        assert f"![{fig.name}]({fig.name})" in text
    assert "at lr 0.1, seed 0, last hidden layer 3" in text


def test_activation_pair_prefers_native_and_healthy_runs(sweep):
    base, run, layer = figures.pick_activation_pair(swp.load_runs(sweep))
    assert (base.norm, run.norm, run.lr, run.seed, layer) == ("none", "native", 0.1, 0, 3)


# ----------------------------------------------------------------------------- errors

def test_error_missing_dir(tmp_path):
    with pytest.raises(swp.ReportError, match="does not exist"):
        swp.load_runs(tmp_path / "nope")


def test_error_empty_dir(tmp_path):
    with pytest.raises(swp.ReportError, match="is empty"):
        swp.load_runs(tmp_path)


def test_error_no_runs(tmp_path):
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    with pytest.raises(swp.ReportError, match=r"no summary.json anywhere below it \(1 run dirs without one\)"):
        swp.load_runs(tmp_path)


def test_error_mixed_experiments(tmp_path):
    write_run(tmp_path, "a", "none", 1.0, 0, (100, 200, 300), 0.98, name="convergence")
    write_run(tmp_path, "b", "none", 1.0, 1, (100, 200, 300), 0.98, name="ioffe2015")
    with pytest.raises(swp.ReportError, match=r"runs mix experiments \(convergence: 1 runs, .*; ioffe2015: 1 runs"):
        swp.load_runs(tmp_path)


def test_error_bad_summary(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text('{"status": "completed"}')
    with pytest.raises(swp.ReportError, match="summary.json lacks norm, seed"):
        swp.load_runs(tmp_path)
    (tmp_path / "a" / "summary.json").write_text("{not json")
    with pytest.raises(swp.ReportError, match="cannot read as JSON"):
        swp.load_runs(tmp_path)


def test_error_summary_from_before_choices_moved_to_validation(tmp_path):
    """A summary.json with steps_to_test_acc and no steps_to_val_acc is refused in one line naming it."""
    path = write_run(tmp_path, "old", "none", 1.0, 0, (100, 200, 300), 0.98) / "summary.json"
    summary = json.loads(path.read_text())
    summary["steps_to_test_acc"] = summary.pop("steps_to_val_acc")
    path.write_text(json.dumps(summary))
    with pytest.raises(swp.ReportError) as err:
        swp.load_runs(tmp_path)
    assert str(err.value) == (f"{path}: made by a bnexp before choices moved to validation (steps_to_test_acc, "
                              "no steps_to_val_acc); rerun the sweep with this version")


# ----------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_error_is_one_line_exit_2(tmp_path):
    proc = run_cli(tmp_path / "missing")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_writes_report(tmp_path):
    write_run(tmp_path, "norm=none,seed=0", "none", 1.0, 0, (200, 400, None), 0.96)
    write_run(tmp_path, "norm=native,seed=0", "native", 1.0, 0, (100, 200, 300), 0.98)
    proc = run_cli(tmp_path, "--target", "0.97")
    assert proc.returncode == 0, proc.stderr
    assert f"report:  {tmp_path / 'report.md'}" in proc.stdout and proc.stdout.count("figure:") == 3
    assert "| native | 1 | > 1000 (0/1) | 300 (1/1) | > 3.33x |" in (tmp_path / "report.md").read_text()


def test_cli_out_dir_and_prefix_keep_links_consistent(sweep, tmp_path):
    """--out/--prefix: report.md and figures land elsewhere, and the markdown links the written names."""
    out = tmp_path / "docs"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep), "--out", str(out), "--prefix", "conv_"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (out / "conv_report.md").read_text()
    for name in ("conv_val_acc.png", "conv_activations.png", "conv_steps_to_target.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text
    assert not (sweep / "conv_report.md").exists()


def test_report_of_runs_without_event_files(tiny_mnist, tmp_path):
    """train.tensorboard=false runs: the tables come from summary.json; no curves, no curve figures."""
    from bnexp.run.loop import train
    from conftest import tiny_config

    for norm in ("none", "custom"):
        train(tiny_config(tiny_mnist, f"norm={norm}", "train.tensorboard=false"), tmp_path / "sweep" / norm,
              progress="quiet")
    report, figures = rep.write_report(tmp_path / "sweep")
    assert [f.name for f in figures] == ["steps_to_target.png"]
    assert "| custom |" in report.read_text() and "| none |" in report.read_text()


def test_validation_figure_draws_bands_only_over_several_seeds(tmp_path):
    """No band is promised over one seed; with two seeds each norm gets its min..max band, and
    custom stays visible under native (wider, drawn below it)."""
    from matplotlib.collections import PolyCollection

    write_run(tmp_path / "one", "c", "custom", 1.0, 0, (100, 200, 300), 0.98)
    write_run(tmp_path / "one", "n", "native", 1.0, 0, (100, 200, 300), 0.98)
    fig = figures.val_acc_figure(swp.load_runs(tmp_path / "one"))
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert "one seed: no band" in fig._suptitle.get_text()
    custom, native = ax.lines
    assert custom.get_linewidth() > native.get_linewidth() and custom.get_zorder() < native.get_zorder()
    assert native.get_linestyle() == "--"
    for seed in (0, 1):
        write_run(tmp_path / "two", f"c{seed}", "custom", 1.0, seed, (100, 200 + 100 * seed, 300), 0.98)
    (ax,) = [a for a in figures.val_acc_figure(swp.load_runs(tmp_path / "two")).axes if a.get_visible()]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1
