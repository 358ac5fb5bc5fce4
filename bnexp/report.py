"""Sweep dir -> report.md and figures: does batch norm make training converge faster?

A sweep dir holds one run dir per (norm, lr, seed), each with `summary.json` and TensorBoard
event files (see design.md for both contracts). This module reads them all, groups the runs by
(norm, optim.lr) over seeds, and writes into the sweep dir:

- report.md: per-group steps to 90/95/97% test accuracy (mean +- std and how many seeds got
  there), final test accuracy, the speed-up of custom/native over none, custom-vs-native
  agreement and a conclusion written from those numbers;
- test_acc.png, activations.png (Ioffe 2015 Fig. 1b,c), steps_to_target.png;
- runs.csv and curves.csv (bnexp/export.py) and aggregates/, one TensorBoard run per config
  with its mean and spread over seeds (bnexp/aggregate.py).

Runs that diverged or were interrupted are counted and shown, never dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # Figure + savefig renders with Agg; no pyplot global state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnexp.aggregate import MARKER as AGGREGATE_MARKER
from bnexp.aggregate import write_aggregates
from bnexp.export import write_exports

NORM_ORDER = ("none", "custom", "native")  # the baseline first, then the two BN variants
THRESHOLDS = (0.90, 0.95, 0.97)  # test accuracies the table always shows
STATUSES = ("completed", "diverged", "interrupted")
N_LOSS_COMPARE = 100  # custom vs native: compare this many first train/loss values
AGREE_LOSS_TOL = 1e-3  # float rounding alone stays far below this after 100 steps
AGREE_ACC_TOL = 0.005  # 50 of the 10,000 test images; rounding can flip a few late in training
REQUIRED_KEYS = ("status", "norm", "seed", "steps_done", "final", "steps_to_test_acc", "config")
REQUIRED_CONFIG_KEYS = ("optim.lr", "train.steps")


class ReportError(Exception):
    """A sweep dir the report cannot use; the message is one line saying what and where."""


@dataclass
class Run:
    """One run dir: its summary.json and its TensorBoard scalars (tag -> (steps, values))."""

    path: Path
    summary: dict
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
    def status(self) -> str:
        return self.summary["status"]

    @property
    def experiment(self) -> str:
        return str(self.config.get("name", "default"))

    @property
    def budget(self) -> int:
        return int(self.config["train.steps"])

    @property
    def final_test_acc(self) -> float:
        """Final test accuracy; NaN when the run has none (a diverged run may write null)."""
        value = (self.summary.get("final") or {}).get("test_acc")
        return float("nan") if value is None else float(value)

    def steps_to(self, target: float) -> int | None:
        """First evaluated step with test acc >= target, or None: from summary.json, else the test/acc curve."""
        for key, steps in (self.summary["steps_to_test_acc"] or {}).items():
            if math.isclose(float(key), target):
                return None if steps is None else int(steps)
        if "test/acc" not in self.curves:
            keys = sorted(self.summary["steps_to_test_acc"] or {})
            raise ReportError(f"{self.path}: target {target} is not in steps_to_test_acc {keys} and the run "
                              "has no test/acc curve to compute it from; use one of those targets")
        steps, acc = self.curves["test/acc"]
        hits = np.flatnonzero(acc >= target)
        return int(steps[hits[0]]) if hits.size else None

    def censor_step(self) -> int:
        """The step an unreached target counts at: the budget, or steps_done if interrupted (it may have got there later)."""
        return int(self.summary["steps_done"]) if self.status == "interrupted" else self.budget


# ----------------------------------------------------------------------------- loading

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


def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())  # NaN literals from a diverged run parse as float nan
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read as JSON ({err})") from None
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
    # note: parses every event in the files: ~1.4 s for a 10k-step run (10k losses, 100 evals) on one CPU core
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


# ----------------------------------------------------------------------------- numbers

def summarize(runs: list[Run], target: float = 0.95, without_summary=()) -> dict:
    """Plain-data summary of a sweep: per-group stats, speed-ups at `target`, agreement, conclusion."""
    if not 0 < target <= 1:
        raise ReportError(f"target {target} is not a test accuracy in (0, 1]")
    thresholds = sorted(set(THRESHOLDS) | {target}, key=float)
    groups = [_group_stats(norm, lr, rs, thresholds) for (norm, lr), rs in group_runs(runs).items()]
    out = {
        "experiment": runs[0].experiment,
        "target": target,
        "thresholds": thresholds,
        "counts": _counts(runs, without_summary),
        "budgets": sorted({r.budget for r in runs}),
        "eval_every": sorted({r.config.get("train.eval_every") for r in runs}, key=str),
        "varying_keys": varying_keys(runs),
        "groups": groups,
        "speedup": speedups(groups, target),
        "agreement": agreement(runs),
    }
    out["conclusion"] = conclusion(out)
    return out


def _norm_key(norm: str):
    return (NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER), norm)


def group_runs(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    """Runs by (norm, lr), norms in NORM_ORDER then by name, lrs ascending, seeds ascending in each."""
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.norm, run.lr), []).append(run)
    order = sorted(groups, key=lambda k: (_norm_key(k[0]), k[1]))
    return {k: sorted(groups[k], key=lambda r: str(r.seed)) for k in order}


def _counts(runs: list[Run], without_summary) -> dict:
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    return {"runs": len(runs), **counts, "without_summary": [str(p) for p in without_summary]}


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of a list; None where undefined (no values / one value)."""
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def steps_stats(runs: list[Run], target: float) -> dict:
    """Steps to `target` over seeds: mean/std of those that reached it, k/n, and the censored mean."""
    steps = [r.steps_to(target) for r in runs]
    reached = [s for s in steps if s is not None]
    censored = [s if s is not None else r.censor_step() for r, s in zip(runs, steps)]
    mean, std = mean_std(reached)
    return {"n": len(runs), "reached": len(reached), "mean": mean, "std": std,
            "censored_mean": float(np.mean(censored)), "steps": steps}


def _group_stats(norm: str, lr: float, runs: list[Run], thresholds) -> dict:
    accs = [r.final_test_acc for r in runs if math.isfinite(r.final_test_acc)]
    acc_mean, acc_std = mean_std(accs)
    return {
        "norm": norm, "lr": lr, "seeds": [r.seed for r in runs], "runs": len(runs),
        "diverged": sum(r.status == "diverged" for r in runs),
        "interrupted": sum(r.status == "interrupted" for r in runs),
        "steps_to": {t: steps_stats(runs, t) for t in thresholds},
        "final_test_acc": {"mean": acc_mean, "std": acc_std, "n": len(accs)},
    }


def speedup_ratio(base: dict, variant: dict) -> tuple[float | None, str]:
    """(ratio of mean steps base/variant, kind): '=' exact, '>' lower bound, '<' upper bound, 'n/a'.

    An unreached seed counts at its censor step, which is below its true (unknown) step count:
    so the base's mean is a lower bound when the base missed, the variant's when the variant missed.
    """
    base_exact = base["reached"] == base["n"]
    variant_exact = variant["reached"] == variant["n"]
    if not (base_exact or variant_exact) or variant["censored_mean"] == 0:
        return None, "n/a"
    ratio = base["censored_mean"] / variant["censored_mean"]
    kind = "=" if base_exact and variant_exact else (">" if variant_exact else "<")
    return ratio, kind


def best_group(groups: list[dict], norm: str, target: float) -> dict | None:
    """The norm's best lr: most seeds reaching the target, then fewest (censored) mean steps, then lowest lr."""
    mine = [g for g in groups if g["norm"] == norm]
    if not mine:
        return None
    def rank(g):
        s = g["steps_to"][target]
        return (-s["reached"] / s["n"], s["censored_mean"], g["lr"])
    return min(mine, key=rank)


def speedups(groups: list[dict], target: float) -> dict:
    """Speed-up of every non-`none` norm over none at each shared lr and at each norm's own best lr."""
    base = {g["lr"]: g for g in groups if g["norm"] == "none"}
    by_lr, best = [], []
    variants = [n for n in dict.fromkeys(g["norm"] for g in groups) if n != "none"]
    for g in groups:
        if g["norm"] != "none" and g["lr"] in base:
            ratio, kind = speedup_ratio(base[g["lr"]]["steps_to"][target], g["steps_to"][target])
            by_lr.append({"norm": g["norm"], "lr": g["lr"], "ratio": ratio, "kind": kind})
    none_best = best_group(groups, "none", target)
    for norm in variants:
        g = best_group(groups, norm, target)
        ratio, kind = (None, "n/a") if none_best is None else speedup_ratio(
            none_best["steps_to"][target], g["steps_to"][target])
        best.append({"norm": norm, "lr": g["lr"], "ratio": ratio, "kind": kind})
    return {"none_best_lr": None if none_best is None else none_best["lr"], "by_lr": by_lr, "best": best}


def _loss_diffs(a: Run, b: Run) -> np.ndarray | None:
    """|diff| of the first N_LOSS_COMPARE train/loss values ([inf] if the steps or NaNs differ)."""
    if "train/loss" not in a.curves or "train/loss" not in b.curves:
        return None
    (sa, va), (sb, vb) = (r.curves["train/loss"] for r in (a, b))
    n = min(N_LOSS_COMPARE, len(sa), len(sb))
    if n == 0 or not np.array_equal(sa[:n], sb[:n]):
        return np.array([math.inf])
    d = np.abs(va[:n] - vb[:n])
    both_nan = np.isnan(va[:n]) & np.isnan(vb[:n])
    return np.where(both_nan, 0.0, np.where(np.isnan(d), math.inf, d))


def _loss_diff(a: Run, b: Run) -> float | None:
    """Max |diff| of the first N_LOSS_COMPARE train/loss values (inf if the steps or NaNs differ)."""
    d = _loss_diffs(a, b)
    return None if d is None else float(d.max())


def _max_with_pair(items):
    items = [(v, k) for k, v in items if v is not None]
    return max(items, key=lambda x: x[0]) if items else (None, None)


def _pair_numbers(c: Run, n: Run) -> dict:
    d = _loss_diffs(c, n)
    acc = abs(c.final_test_acc - n.final_test_acc)
    return {"acc": acc if math.isfinite(acc) else None,
            "loss": None if d is None else float(d.max()),
            "step1": None if d is None else float(d[0])}


def _max_of(numbers: list[dict], key: str) -> float | None:
    values = [x[key] for x in numbers if x[key] is not None]
    return max(values) if values else None


def agreement(runs: list[Run]) -> dict:
    """custom vs native on the same (lr, seed): max |diff| of final test acc and of the first train losses.

    Overall and per lr. `step1` is the loss difference at the first step (same weights, same
    batch: pure float rounding of one forward pass); a difference that starts there and grows
    over the first steps is rounding amplified by the training dynamics, not another function.
    `matches`: final accuracies within AGREE_ACC_TOL and first-step losses within AGREE_LOSS_TOL.
    """
    custom = {(r.lr, r.seed): r for r in runs if r.norm == "custom"}
    native = {(r.lr, r.seed): r for r in runs if r.norm == "native"}
    pairs = sorted(set(custom) & set(native), key=str)
    numbers = {k: _pair_numbers(custom[k], native[k]) for k in pairs}
    acc_max, acc_pair = _max_with_pair([(k, v["acc"]) for k, v in numbers.items()])
    loss_max, loss_pair = _max_with_pair([(k, v["loss"]) for k, v in numbers.items()])
    step1_max = _max_of(list(numbers.values()), "step1")
    matches = None
    if acc_max is not None or step1_max is not None:
        matches = ((acc_max is None or acc_max <= AGREE_ACC_TOL)
                   and (step1_max is None or step1_max <= AGREE_LOSS_TOL))
    by_lr = []
    for lr in sorted({k[0] for k in pairs}):
        at = [v for k, v in numbers.items() if k[0] == lr]
        by_lr.append({"lr": lr, "pairs": len(at), "max_acc_diff": _max_of(at, "acc"),
                      "max_loss_diff": _max_of(at, "loss"), "max_step1_diff": _max_of(at, "step1")})
    return {"pairs": len(pairs), "acc_pairs": sum(v["acc"] is not None for v in numbers.values()),
            "max_acc_diff": acc_max, "max_acc_pair": acc_pair,
            "loss_pairs": sum(v["loss"] is not None for v in numbers.values()),
            "max_loss_diff": loss_max, "max_loss_pair": loss_pair, "max_step1_diff": step1_max,
            "by_lr": by_lr, "matches": matches}


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys that differ between runs besides norm.*, optim.lr and seed (the grouping ignores them)."""
    keys = set().union(*(r.config for r in runs))
    out = []
    for key in sorted(keys):
        if key.startswith("norm.") or key in ("optim.lr", "seed"):
            continue
        if len({json.dumps(r.config.get(key), sort_keys=True, default=str) for r in runs}) > 1:
            out.append(key)
    return out


# ----------------------------------------------------------------------------- words

def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def fmt_ratio(ratio: float | None, kind: str) -> str:
    """'2.50x', '> 2.00x' (lower bound), '< 0.50x' (upper bound) or 'n/a'."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}x" if kind == "=" else f"{kind} {ratio:.2f}x"


def fmt_steps(stats: dict) -> str:
    """'1500 +- 100 (3/3)'; '> 3000 (0/3)' when no seed reached it (3000 = the censored mean)."""
    k, n = stats["reached"], stats["n"]
    if k == 0:
        return f"> {stats['censored_mean']:.0f} ({k}/{n})"
    std = "" if stats["std"] is None else f" +- {stats['std']:.0f}"
    return f"{stats['mean']:.0f}{std} ({k}/{n})"


def fmt_acc(acc: dict, runs: int) -> str:
    if acc["mean"] is None:
        return f"n/a (0/{runs} finite)"
    std = "" if acc["std"] is None else f" +- {acc['std']:.4f}"
    extra = f" ({acc['n']}/{runs} finite)" if acc["n"] < runs else ""
    return f"{acc['mean']:.4f}{std}{extra}"


def _lrs(groups, norm, target, full: bool) -> list[str]:
    out = []
    for g in groups:
        s = g["steps_to"][target]
        if g["norm"] == norm and s["reached"] > 0 and (s["reached"] == s["n"]) == full:
            out.append(fmt_lr(g["lr"]) + ("" if full else f" ({s['reached']}/{s['n']} seeds)"))
    return out


def _reach_sentence(summary: dict) -> str:
    groups, t = summary["groups"], summary["target"]
    budget = "/".join(str(b) for b in summary["budgets"])
    parts = []
    for norm in dict.fromkeys(g["norm"] for g in groups):
        full, partial = _lrs(groups, norm, t, True), _lrs(groups, norm, t, False)
        if not full and not partial:
            parts.append(f"{norm} reached it at no lr")
            continue
        text = f"{norm} with every seed at lr {', '.join(full)}" if full else f"{norm} with no lr for every seed"
        parts.append(text + (f", partly at lr {', '.join(partial)}" if partial else ""))
    return f"Within {budget} steps, test accuracy {t:g} was reached by " + "; ".join(parts) + "."


def _gap_word(ratio: float) -> str:
    if ratio >= 2:
        return "a large gap"
    if ratio >= 1.25:
        return "a moderate gap"
    if ratio > 0.8:
        return "a small gap"
    return "none faster by a large margin"


def _gap_sentences(summary: dict) -> list[str]:
    out = []
    for norm in dict.fromkeys(s["norm"] for s in summary["speedup"]["by_lr"]):
        rows = [s for s in summary["speedup"]["by_lr"] if s["norm"] == norm and s["ratio"] is not None]
        if not rows:
            out.append(f"The speed-up of {norm} over none is undefined at every shared lr (neither reached the target).")
            continue
        lo, hi = min(rows, key=lambda s: s["ratio"]), max(rows, key=lambda s: s["ratio"])
        describe = lambda s: f"{fmt_ratio(s['ratio'], s['kind'])} at lr {fmt_lr(s['lr'])} ({_gap_word(s['ratio'])})"
        if lo is hi:
            out.append(f"The speed-up of {norm} over none is {describe(lo)}.")
        else:
            out.append(f"The speed-up of {norm} over none ranges from {describe(lo)} to {describe(hi)}.")
    return out


def _best_sentence(summary: dict) -> str | None:
    sp = summary["speedup"]
    if sp["none_best_lr"] is None or not sp["best"]:
        return None
    parts = [f"{b['norm']} (lr {fmt_lr(b['lr'])}) {fmt_ratio(b['ratio'], b['kind'])}" for b in sp["best"]]
    return (f"Each at its own best lr, against none at lr {fmt_lr(sp['none_best_lr'])}: "
            + ", ".join(parts) + ".")


def _status_sentence(summary: dict) -> str:
    hit = [g for g in summary["groups"] if g["diverged"] or g["interrupted"]]
    if not hit:
        return "No run diverged or was interrupted."
    parts = []
    for g in hit:
        words = [f"{g[k]}/{g['runs']} {k}" for k in ("diverged", "interrupted") if g[k]]
        parts.append(f"{g['norm']} at lr {fmt_lr(g['lr'])}: {', '.join(words)}")
    return "Runs that did not complete: " + "; ".join(parts) + "."


def _agreement_sentence(ag: dict) -> str:
    if ag["pairs"] == 0:
        return "custom and native cannot be compared: no (lr, seed) has a run of both."
    if ag["matches"] is None:
        return f"custom and native share {ag['pairs']} (lr, seed) pairs but no finite accuracy or loss to compare."
    verdict = "custom matches native" if ag["matches"] else "custom does NOT match native"
    acc = "n/a" if ag["max_acc_diff"] is None else f"{ag['max_acc_diff']:.4g}"
    step1 = "n/a" if ag["max_step1_diff"] is None else f"{ag['max_step1_diff']:.3g}"
    text = (f"{verdict}: over {ag['pairs']} (lr, seed) pairs the final test accuracy differs by at most {acc} "
            f"(allowed {AGREE_ACC_TOL}) and the first training loss by at most {step1} (allowed {AGREE_LOSS_TOL:g}).")
    close = [r for r in ag["by_lr"] if r["max_loss_diff"] is not None and r["max_loss_diff"] <= AGREE_LOSS_TOL]
    drift = [r for r in ag["by_lr"] if r["max_loss_diff"] is not None and r["max_loss_diff"] > AGREE_LOSS_TOL]
    if close:
        text += (f" The first {N_LOSS_COMPARE} losses agree within {max(r['max_loss_diff'] for r in close):.3g} "
                 f"at lr {', '.join(fmt_lr(r['lr']) for r in close)}.")
    if drift:
        text += (" At lr " + ", ".join(f"{fmt_lr(r['lr'])} (up to {r['max_loss_diff']:.3g})" for r in drift)
                 + f" they drift apart within the first {N_LOSS_COMPARE} steps from a first-step difference of "
                 f"at most {max(r['max_step1_diff'] for r in drift):.3g}: rounding amplified by the training "
                 "dynamics at that learning rate.")
    return text


def conclusion(summary: dict) -> str:
    """One paragraph written from the summary's numbers."""
    sentences = [_reach_sentence(summary), *_gap_sentences(summary), _best_sentence(summary),
                 _status_sentence(summary), _agreement_sentence(summary["agreement"])]
    return " ".join(s for s in sentences if s)


# ----------------------------------------------------------------------------- report.md

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _header_lines(summary: dict, sweep_dir: Path) -> list[str]:
    c = summary["counts"]
    lines = [f"# Sweep report: {summary['experiment']}", "", f"Sweep dir: `{sweep_dir}`", "",
             f"- Runs with summary.json: {c['runs']} ({c['completed']} completed, {c['diverged']} diverged, "
             f"{c['interrupted']} interrupted).",
             f"- Run dirs without summary.json (not counted below): {len(c['without_summary'])}"
             + "".join(f"\n  - `{p}`" for p in c["without_summary"]),
             f"- Budget (train.steps): {', '.join(map(str, summary['budgets']))}; test accuracy evaluated every "
             f"{', '.join(map(str, summary['eval_every']))} steps."]
    if summary["varying_keys"]:
        lines.append(f"- Warning: config keys other than norm, optim.lr and seed differ between runs and are "
                     f"pooled within each (norm, lr): {', '.join(summary['varying_keys'])}.")
    return lines + [""]


def _group_lines(summary: dict) -> list[str]:
    ts = summary["thresholds"]
    header = ["norm", "lr", "runs", "diverged", "interrupted"] + [f"steps to {t * 100:g}%" for t in ts] + ["final test acc"]
    rows = [[g["norm"], fmt_lr(g["lr"]), str(g["runs"]), str(g["diverged"]), str(g["interrupted"])]
            + [fmt_steps(g["steps_to"][t]) for t in ts] + [fmt_acc(g["final_test_acc"], g["runs"])]
            for g in summary["groups"]]
    intro = ("Steps to a test accuracy: mean +- sample std (ddof=1) over the seeds that reached it, then "
             "(k/n seeds reached); n counts every run, diverged and interrupted included. '> B (0/n)': no seed "
             "reached it; B is the mean over seeds of the budget (steps_done for an interrupted run). "
             "Final test acc: mean +- std over runs with a finite value.")
    return ["## Per (norm, lr)", "", intro, "", *_table(header, rows), ""]


def _speedup_lines(summary: dict) -> list[str]:
    t, sp = summary["target"], summary["speedup"]
    intro = (f"Speed-up = (mean steps for none to reach test acc >= {t:g}) / (mean steps for the variant), "
             "means over seeds. A seed that never reached the target counts at its budget (steps_done if "
             "interrupted), which makes that mean a bound: '> x' is a lower bound (none missed the target), "
             "'< x' an upper bound (the variant missed it), 'n/a' when both missed it.")
    lines = [f"## Speed-up over none (target {t:g})", "", intro, ""]
    if sp["none_best_lr"] is None:
        return lines + ["No `none` runs in this sweep: no speed-up to compute.", ""]
    steps = {(g["norm"], g["lr"]): fmt_steps(g["steps_to"][t]) for g in summary["groups"]}
    rows = [[s["norm"], fmt_lr(s["lr"]), steps[("none", s["lr"])], steps[(s["norm"], s["lr"])],
             fmt_ratio(s["ratio"], s["kind"])] for s in sp["by_lr"]]
    lines += ["At each lr:", "", *_table(["norm", "lr", "none steps", "its steps", "speed-up"], rows), ""]
    rows = [["none", fmt_lr(sp["none_best_lr"]), steps[("none", sp["none_best_lr"])], "1 (reference)"]]
    rows += [[b["norm"], fmt_lr(b["lr"]), steps[(b["norm"], b["lr"])], fmt_ratio(b["ratio"], b["kind"])]
             for b in sp["best"]]
    lines += ["At each variant's own best lr (most seeds reaching the target, then fewest mean steps):", "",
              *_table(["norm", "best lr", "steps", "speed-up over none at its best lr"], rows), ""]
    return lines


def _agreement_lines(ag: dict) -> list[str]:
    lines = ["## custom vs native agreement", ""]
    if ag["pairs"] == 0:
        return lines + ["No (lr, seed) has both a custom and a native run.", ""]
    pair = lambda p: "" if p is None else f" (lr {fmt_lr(p[0])}, seed {p[1]})"
    acc = "n/a" if ag["max_acc_diff"] is None else f"{ag['max_acc_diff']:.4g}{pair(ag['max_acc_pair'])}"
    loss = "n/a" if ag["max_loss_diff"] is None else f"{ag['max_loss_diff']:.3g}{pair(ag['max_loss_pair'])}"
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    rows = [[fmt_lr(r["lr"]), str(r["pairs"]), fmt(r["max_acc_diff"], ".4g"), fmt(r["max_step1_diff"], ".3g"),
             fmt(r["max_loss_diff"], ".3g")] for r in ag["by_lr"]]
    table = _table(["lr", "pairs", "max |diff| final test acc", "max |diff| loss at step 1",
                    f"max |diff| first {N_LOSS_COMPARE} losses"], rows)
    return lines + [f"- Matching (lr, seed) pairs: {ag['pairs']}",
                    f"- Max |diff| of final test accuracy over {ag['acc_pairs']} pairs: {acc}",
                    f"- Max |diff| of the first {N_LOSS_COMPARE} train/loss values over {ag['loss_pairs']} "
                    f"pairs: {loss}", "", *table, ""]


def render_markdown(summary: dict, sweep_dir: Path, figures: dict[str, str]) -> str:
    """report.md text; `figures` maps each written PNG's file name to a caption."""
    lines = _header_lines(summary, sweep_dir) + _group_lines(summary) + _speedup_lines(summary)
    lines += _agreement_lines(summary["agreement"]) + ["## Conclusion", "", summary["conclusion"], ""]
    lines += ["## Figures", ""]
    lines += [f"![{name}]({name})\n\n{caption}\n" for name, caption in figures.items()] or ["No figures (no curves)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures

COLORS = {"none": "tab:red", "custom": "tab:blue", "native": "tab:green"}
# custom and native should overlap exactly: different dashes and markers keep both visible
STYLES = {"none": ("-", "o"), "custom": ("-", "o"), "native": ("--", "s")}


def _pool_curves(runs: list[Run], tag: str):
    """Steps and per-step mean/min/max over the runs that logged that step (diverged runs stop early)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for s, v in zip(*run.curves.get(tag, ((), ()))):
            by_step.setdefault(int(s), []).append(v)
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    return steps, *(np.array([f(v) for v in vals]) for f in (np.mean, np.min, np.max))


ZOOM = (0.9, 1.0)  # the lower panels: where the variants' final accuracies differ


def plot_test_acc(runs: list[Run], path: Path) -> Path | None:
    """Test accuracy vs step, one column per lr, a line (mean) and min..max band per norm over
    seeds; the top row shows 0..1, the bottom row zooms into 90..100%."""
    groups = {k: rs for k, rs in group_runs(runs).items() if any("test/acc" in r.curves for r in rs)}
    if not groups:
        return None
    lrs = sorted({lr for _, lr in groups})
    fig = Figure(figsize=(max(7, 4 * len(lrs)), 6.5), layout="constrained")
    axes = fig.subplots(2, len(lrs), squeeze=False, sharey="row")
    for (norm, lr), rs in groups.items():
        steps, mean, lo, hi = _pool_curves(rs, "test/acc")
        color = COLORS.get(norm)
        for ax in axes[:, lrs.index(lr)]:
            ax.plot(steps, mean, STYLES.get(norm, ("-",))[0], color=color, label=f"{norm} (n={len(rs)})")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    for column, lr in enumerate(lrs):
        top, bottom = axes[:, column]
        top.set(title=f"lr {fmt_lr(lr)}", ylim=(0, 1))
        bottom.set(xlabel="step", ylim=ZOOM)
        top.legend(fontsize="small")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[1, 0].set_ylabel(f"test accuracy (zoom {ZOOM[0]:g}-{ZOOM[1]:g})")
    fig.suptitle("Test accuracy per norm: line = mean, band = min..max over seeds")
    fig.savefig(path, dpi=100)
    return path


def _last_layer(run: Run) -> int | None:
    layers = [int(t.split("/")[1].removeprefix("layer")) for t in run.curves
              if t.startswith("act/layer") and t.endswith("/p50")]
    return max(layers) if layers else None


def pick_activation_pair(runs: list[Run]):
    """(none run or None, BN run, layer): prefer native, else custom; same lr and seed; healthy runs first."""
    for norm in ("native", "custom"):
        bn = [r for r in runs if r.norm == norm and _last_layer(r) is not None]
        none = {(r.lr, r.seed): r for r in runs if r.norm == "none" and _last_layer(r) is not None}
        pairs = [(none.get((r.lr, r.seed)), r) for r in bn]
        if pairs:
            rank = lambda p: (p[0] is None, sum(r.status != "completed" for r in p if r), p[1].lr, str(p[1].seed))
            base, run = min(pairs, key=rank)
            return base, run, _last_layer(run)
    return None


def plot_activations(runs: list[Run], path: Path) -> tuple[Path, str] | None:
    """Ioffe 2015 Fig. 1(b,c): 15/50/85th percentiles of the last hidden layer's nonlinearity input."""
    picked = pick_activation_pair(runs)
    if picked is None:
        return None
    base, run, layer = picked
    shown = [r for r in (base, run) if r is not None]
    fig = Figure(figsize=(4.5 * len(shown), 3.5), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, shown):
        for p, style in (("p15", ":"), ("p50", "-"), ("p85", "--")):
            steps, vals = r.curves[f"act/layer{_last_layer(r)}/{p}"]
            ax.plot(steps, vals, style, color=COLORS.get(r.norm), label=p)
        ax.set(title=f"{r.norm} ({r.status})", xlabel="step")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"layer {layer} nonlinearity input")
    where = f"lr {fmt_lr(run.lr)}, seed {run.seed}, last hidden layer {layer}"
    fig.suptitle(f"Input to the last hidden layer's nonlinearity: {where}")
    fig.savefig(path, dpi=100)
    return path, where


def plot_steps_to_target(summary: dict, path: Path) -> Path:
    """Mean steps to the target vs lr (log x) per norm; seeds that never reached it as 'x' at the top."""
    t, groups = summary["target"], summary["groups"]
    top = max(summary["budgets"]) * 1.08
    fig = Figure(figsize=(8.5, 4), layout="constrained")
    ax = fig.subplots()
    for norm in dict.fromkeys(g["norm"] for g in groups):
        mine = [g for g in groups if g["norm"] == norm]
        color = COLORS.get(norm)
        hit = [g for g in mine if g["steps_to"][t]["reached"]]
        line, marker = STYLES.get(norm, ("-", "o"))
        ax.errorbar([g["lr"] for g in hit], [g["steps_to"][t]["mean"] for g in hit], linestyle=line,
                    yerr=[g["steps_to"][t]["std"] or 0 for g in hit], marker=marker, color=color, capsize=3,
                    label=f"{norm} (mean +- std of seeds that reached it)")
        missed = [(g["lr"], g["steps_to"][t]["n"] - g["steps_to"][t]["reached"]) for g in mine
                  if g["steps_to"][t]["reached"] < g["steps_to"][t]["n"]]
        for lr, k in missed:
            ax.scatter([lr], [top], marker="x", s=60, color=color)
            ax.annotate(f"{norm}: {k} not reached", (lr, top), textcoords="offset points", ha="center",
                        xytext=(0, 6 + 8 * (norm != "none")), fontsize="x-small", color=color)
    ax.axhline(max(summary["budgets"]), color="gray", linestyle=":", label="budget (train.steps)")
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"steps to test acc >= {t:g}",
           title=f"Steps to test accuracy {t:g} ('x' at the top: seeds that never reached it)", ylim=(0, top * 1.1))
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=100)
    return path


def write_figures(runs: list[Run], summary: dict, out_dir: Path, prefix: str = "") -> dict[str, str]:
    """Write the PNGs into out_dir (names start with prefix); returns file name -> caption."""
    out = {}
    name = lambda stem: f"{prefix}{stem}.png"
    if plot_test_acc(runs, out_dir / name("test_acc")):
        out[name("test_acc")] = ("Test accuracy vs step per norm: line = mean, band = min..max over seeds; "
                                 "one column per lr, the bottom row zoomed into 90-100%.")
    acts = plot_activations(runs, out_dir / name("activations"))
    if acts:
        out[name("activations")] = (f"15/50/85th percentiles of the input to the last hidden layer's nonlinearity "
                                    f"(Ioffe & Szegedy 2015, Fig. 1b,c) at {acts[1]}.")
    plot_steps_to_target(summary, out_dir / name("steps_to_target"))
    out[name("steps_to_target")] = (f"Mean steps to test accuracy {summary['target']:g} vs lr per norm; "
                                    "'x' at the top marks seeds that never reached it.")
    return out


def write_report(sweep_dir, target: float = 0.95, out_dir=None, prefix: str = "") -> tuple[Path, list[Path]]:
    """Read the sweep, write report.md and the figures (into the sweep dir unless out_dir is
    given; file names start with prefix); returns (report path, figure paths)."""
    root = Path(sweep_dir)
    runs = load_runs(root)
    summary = summarize(runs, target, dirs_without_summary(root))
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, summary, out, prefix)
    report = out / f"{prefix}report.md"
    report.write_text(render_markdown(summary, root, figures))
    write_exports(runs, root, out, prefix)  # runs.csv, curves.csv (bnexp/export.py)
    write_aggregates(runs, root, out, prefix)  # seed aggregates for TensorBoard (bnexp/aggregate.py)
    return report, [out / name for name in figures]
