"""The report's figures: test accuracy per lr, Ioffe 2015 Fig. 1(b,c), steps to the target vs lr.

Each figure is drawn on its own matplotlib `Figure` and saved with the Agg renderer: no pyplot
global state, so figures can be made from tests and threads without a display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnexp.stats import SweepStats, group_runs
from bnexp.sweep import Run

COLORS = {"none": "tab:red", "custom": "tab:blue", "native": "tab:green"}
# custom and native should overlap exactly: different dashes and markers keep both visible
STYLES = {"none": ("-", "o"), "custom": ("-", "o"), "native": ("--", "s")}
ZOOM = (0.9, 1.0)  # the lower panels of the test-accuracy figure: where the variants' final accuracies differ


def write_figures(runs: list[Run], stats: SweepStats, out_dir: Path, prefix: str = "") -> dict[str, str]:
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
    plot_steps_to_target(stats, out_dir / name("steps_to_target"))
    out[name("steps_to_target")] = (f"Mean steps to test accuracy {stats.target:g} vs lr per norm; "
                                    "'x' at the top marks seeds that never reached it.")
    return out


def _pool_curves(runs: list[Run], tag: str):
    """Steps and per-step mean/min/max over the runs that logged that step (diverged runs stop early)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for s, v in zip(*run.curves.get(tag, ((), ()))):
            by_step.setdefault(int(s), []).append(v)
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    return steps, *(np.array([f(v) for v in vals]) for f in (np.mean, np.min, np.max))


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
        top.set(title=f"lr {lr:g}", ylim=(0, 1))
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
    where = f"lr {run.lr:g}, seed {run.seed}, last hidden layer {layer}"
    fig.suptitle(f"Input to the last hidden layer's nonlinearity: {where}")
    fig.savefig(path, dpi=100)
    return path, where


def plot_steps_to_target(stats: SweepStats, path: Path) -> Path:
    """Mean steps to the target vs lr (log x) per norm; seeds that never reached it as 'x' at the top."""
    t, groups = stats.target, stats.groups
    top = max(stats.budgets) * 1.08
    fig = Figure(figsize=(8.5, 4), layout="constrained")
    ax = fig.subplots()
    for norm in dict.fromkeys(g.norm for g in groups):
        mine = [g for g in groups if g.norm == norm]
        color = COLORS.get(norm)
        hit = [g for g in mine if g.steps_to[t].reached]
        line, marker = STYLES.get(norm, ("-", "o"))
        ax.errorbar([g.lr for g in hit], [g.steps_to[t].mean for g in hit], linestyle=line,
                    yerr=[g.steps_to[t].std or 0 for g in hit], marker=marker, color=color, capsize=3,
                    label=f"{norm} (mean +- std of seeds that reached it)")
        missed = [(g.lr, g.steps_to[t].n - g.steps_to[t].reached) for g in mine if not g.steps_to[t].all_reached]
        for lr, k in missed:
            ax.scatter([lr], [top], marker="x", s=60, color=color)
            ax.annotate(f"{norm}: {k} not reached", (lr, top), textcoords="offset points", ha="center",
                        xytext=(0, 6 + 8 * (norm != "none")), fontsize="x-small", color=color)
    ax.axhline(max(stats.budgets), color="gray", linestyle=":", label="budget (train.steps)")
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"steps to test acc >= {t:g}",
           title=f"Steps to test accuracy {t:g} ('x' at the top: seeds that never reached it)", ylim=(0, top * 1.1))
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=100)
    return path
