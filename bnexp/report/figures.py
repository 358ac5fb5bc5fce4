"""The report's figures: validation accuracy per lr, Ioffe 2015 Fig. 1(b,c), steps to the target vs lr;
for the why studies (bnexp/report/studies.py): a study's numbers vs its value, Santurkar's landscape
probes (Fig. 4) and internal covariate shift per layer, each as mean and band over seeds.

Each figure is drawn on its own matplotlib `Figure` and saved with the Agg renderer: no pyplot
global state, so figures can be made from tests and threads without a display.

Curves are validation curves (`val/acc`): the test set is evaluated once, at the end of a run, so
its accuracy appears only as a number per norm at its chosen lr (the study figure), never as a curve.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnexp.nn.registry import NORMS
from bnexp.nn.registry import order as norm_order
from bnexp.report.intervals import bootstrap_one, ert
from bnexp.report.stats import SweepStats, best_group, group_runs
from bnexp.report.studies import STUDY_COLUMN, STUDY_KEYS, ics_names, label, split_by
from bnexp.report.runs import Run

# Each norm's colour, line and marker come from its registry entry (bnexp/nn/registry.py)
COLORS = {name: v.color for name, v in NORMS.items()}
STYLES = {name: (v.line, v.marker) for name, v in NORMS.items()}
ACC_CURVE = "val/acc"  # the accuracy curve figures draw (test/acc has one point per run)
MAX_COLUMNS = 3  # panels per row: at most 2 rows of 3 at a size readable at page width
# custom is drawn wide and under the others, so that native (dashed, thin) drawn on top of an
# identical custom curve leaves custom visible on both sides of it
WIDTHS = {"custom": 3.0}
WIDTH = 1.4
MIN_ACC_SPAN = 0.05  # accuracy axes are at least 5 points tall: a half-point gap is not blown up to fill a panel


def _style(norm: str) -> dict:
    """Matplotlib keywords of a norm's curve: its colour and line from the registry, its width and layer."""
    line, _ = STYLES.get(norm, ("-", "o"))
    return {"color": COLORS.get(norm), "linestyle": line, "linewidth": WIDTHS.get(norm, WIDTH),
            "zorder": 2 if norm == "custom" else 3}


def _grid(n: int, width: float = 4.2, height: float = 3.3):
    """A figure with n panels in rows of at most MAX_COLUMNS; returns (figure, flat list of the n axes)."""
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _band_words(n: int) -> str:
    return "one seed: no band" if n == 1 else f"band = min..max over {n} seeds"


def write_figures(runs: list[Run], stats: SweepStats, out_dir: Path, prefix: str = "",
                  study=None) -> dict[str, str]:
    """Write the PNGs into out_dir (names start with prefix); returns file name -> caption.

    A study sweep (bnexp.report.studies.Study) gets its study figure instead of the per-lr figures,
    which would pool the study's values; probe and ICS figures come wherever runs have them.
    """
    out = {}
    name = lambda stem: f"{prefix}{stem}.png"
    if study is None:
        out.update(_convergence_figures(runs, stats, out_dir, name))
    else:
        plot_study(study, out_dir / name("study"))
        out[name("study")] = (f"{study.name}: each norm at its best lr per {STUDY_COLUMN.get(study.name, study.key)} "
                              "(chosen on validation; the lr beside each point): the expected running time to "
                              f"validation accuracy {stats.target:g} with its 95% bootstrap interval ('k/n': k of n "
                              "seeds reached it; 'x' at the top: none did), the final test accuracy (mean, bars "
                              "min..max over seeds; 'k div': runs that diverged; the axis at least 5 points tall)"
                              + (", and the train/eval accuracy gap at that lr (mean +- std)" if study.gaps else "") + ".")
    key = None if study is None else study.key
    if plot_probes(runs, key, out_dir / name("probes")):
        out[name("probes")] = ("Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4): the range of "
                               "L(w - eta g) over the step sizes and the effective beta-smoothness vs step, one column "
                               "per lr (line = mean, band = min..max over seeds; the same y-axis along a row). The "
                               "gradient change is in the report's landscape table.")
    if plot_ics(runs, key, out_dir / name("ics")):
        out[name("ics")] = ("Internal covariate shift (Santurkar Def. 2.1) per layer: ||G - G'|| and cos(G, G') "
                            "averaged over the hidden layers vs step (line = mean, band = min..max over seeds; per layer: the ICS table).")
    return out


def _convergence_figures(runs: list[Run], stats: SweepStats, out_dir: Path, name) -> dict[str, str]:
    out = {}
    if plot_val_acc(runs, out_dir / name("val_acc")):
        seeds = sorted({len(rs) for rs in group_runs(runs).values()})
        band = "no band (one seed)" if seeds == [1] else f"band = min..max over the seeds (n in the legend)"
        out[name("val_acc")] = ("Validation error (1 - accuracy, log scale) vs step (log scale) per norm, one panel "
                                f"per lr: line = mean, {band}. custom is the wide line under native's dashes.")
    acts = plot_activations(runs, out_dir / name("activations"))
    if acts:
        out[name("activations")] = (f"15/50/85th percentiles of the input to the last hidden layer's nonlinearity "
                                    f"(Ioffe & Szegedy 2015, Fig. 1b,c) at {acts[1]}.")
    plot_steps_to_target(stats, out_dir / name("steps_to_target"))
    out[name("steps_to_target")] = (f"Expected running time (ERT: steps spent by all runs / runs that reached it) to "
                                    f"validation accuracy {stats.target:g} vs lr per norm, with its 95% bootstrap "
                                    "interval over seeds; 'k/n' beside a point: only k of n seeds reached it; 'x' at "
                                    "the top: none did (ERT infinite).")
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


def plot_val_acc(runs: list[Run], path: Path) -> Path | None:
    """val_acc_figure saved to path; None when no run has a validation curve."""
    fig = val_acc_figure(runs)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    return path


def val_acc_figure(runs: list[Run]) -> Figure | None:
    """Validation error vs step, both on log scales, one panel per lr, a line (mean) and a min..max
    band per norm over seeds (no band for one seed). Log error shows the early fall and the late
    differences of a few tenths of a point on one axis, without a zoomed second row."""
    groups = {k: rs for k, rs in group_runs(runs).items() if any(ACC_CURVE in r.curves for r in rs)}
    if not groups:
        return None
    lrs = sorted({lr for _, lr in groups})
    fig, axes = _grid(len(lrs), width=4.2 if len(lrs) > 1 else 7.0)  # one panel: wide enough for the title
    for (norm, lr), rs in groups.items():
        steps, mean, lo, hi = _pool_curves(rs, ACC_CURVE)
        keep = steps > 0  # step 0 has no place on a log axis
        ax, style = axes[lrs.index(lr)], _style(norm)
        ax.plot(steps[keep], 1 - mean[keep], label=f"{norm} (n={len(rs)})", **style)
        if len(rs) > 1:
            ax.fill_between(steps[keep], 1 - lo[keep], 1 - hi[keep], color=style["color"], alpha=0.15, linewidth=0)
    for ax, lr in zip(axes, lrs):
        ax.set(title=f"lr {lr:g}", xscale="log", yscale="log", xlabel="step", ylim=(0.01, 1))
        ax.set_ylabel("validation error (1 - accuracy)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    n = sorted({len(rs) for rs in groups.values()})
    fig.suptitle("Validation error per norm: line = mean, " + (_band_words(n[0]) if len(n) == 1 else
                                                               "band = min..max over the seeds"), fontsize="medium")
    return fig


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


def _ert_interval(steps) -> tuple[float, float, float]:
    """(ERT, low, high) of a group's steps to a target over its seeds (bnexp.report.intervals)."""
    ci = bootstrap_one(ert, steps.outcomes)
    return (steps.ert, steps.ert, steps.ert) if ci is None else (ci.estimate, ci.low, ci.high)


def plot_steps_to_target(stats: SweepStats, path: Path) -> Path:
    """ERT to the target vs lr (log x, log y) per norm with 95% intervals; 'k/n' where some seeds
    missed it, an 'x' at the top where all did."""
    t, groups = stats.target, stats.groups
    budget = max(stats.budgets)
    finite = [g.steps_to[t].ert for g in groups if g.steps_to[t].reached]
    top = max([budget * 3, *(2 * e for e in finite)])  # where an infinite ERT is drawn: above every finite one
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    norms = list(dict.fromkeys(g.norm for g in groups))
    for i, norm in enumerate(norms):
        mine = [g for g in groups if g.norm == norm]
        style, marker = _style(norm), STYLES.get(norm, ("-", "o"))[1]
        shift = 1 + 0.04 * (i - (len(norms) - 1) / 2)  # a few percent apart on the log lr axis
        hit = [(g, *_ert_interval(g.steps_to[t])) for g in mine if g.steps_to[t].reached]
        ax.errorbar([g.lr * shift for g, *_ in hit], [e for _, e, _, _ in hit],
                    yerr=[[max(0.0, e - lo) for _, e, lo, _ in hit], [max(0.0, min(hi, top) - e) for _, e, _, hi in hit]],
                    marker=marker, capsize=3, label=norm, **style)
        for g, e, _, _ in hit:
            s = g.steps_to[t]
            if not s.all_reached:
                ax.annotate(f"{s.reached}/{s.n}", (g.lr * shift, e), textcoords="offset points", xytext=(5, 2 + 9 * i),
                            fontsize="x-small", color=style["color"])
        missed = [g for g in mine if not g.steps_to[t].reached]
        ax.scatter([g.lr * shift for g in missed], [top] * len(missed), marker="x", s=50, color=style["color"])
    ax.axhline(budget, color="gray", linestyle=":", label="budget (train.steps)")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"ERT to val acc >= {t:g} (steps)",
           title=f"Expected running time to validation accuracy {t:g}: 95% interval over seeds; "
                 "'k/n': k of n seeds reached it; 'x' at the top: none did", ylim=(None, top * 1.5))
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- the why studies

def _row_keys(runs: list[Run], key: str | None) -> dict[tuple[str, float], list[Run]]:
    """Runs by (study value label, lr) in study order, then lr: one figure row each."""
    parts = split_by(runs, key) if key else {None: runs}
    rows: dict[tuple[str, float], list[Run]] = {}
    for value, part in parts.items():
        for run in sorted(part, key=lambda r: r.lr):
            rows.setdefault(("" if key is None else label(key, value), run.lr), []).append(run)
    return rows


def _row_title(key: tuple[str, float], column: str | None) -> str:
    where, lr = key
    prefix = f"{column} {where}, " if where else ""
    return f"{prefix}lr {lr:g}"


def _acc_limits(ax) -> None:
    """Make an accuracy axis at least MIN_ACC_SPAN tall, within 0..1, around what it shows."""
    lo, hi = ax.get_ylim()
    if hi - lo < MIN_ACC_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_ACC_SPAN / 2, mid + MIN_ACC_SPAN / 2
        shift = max(0.0, hi - 1.0)
        ax.set_ylim(lo - shift, hi - shift)


def plot_study(study, path: Path) -> Path:
    """Each norm at its best lr per study value (chosen on validation: bnexp.report.stats.best_group):
    its ERT to the validation target with a 95% interval, its final test accuracy (mean, min..max
    over seeds) and, with training-mode accuracy, the train/eval gap. Every point names its lr;
    seeds that missed the target ('k/n'), never reached it ('x' at the top) or diverged ('k div')
    are drawn, not dropped."""
    labels = [v.label for v in study.values]
    target = study.values[0].stats.target
    budget = max(b for v in study.values for b in v.stats.budgets)
    finite = [g.steps_to[target].ert for v in study.values for g in v.stats.groups if g.steps_to[target].reached]
    top = max([budget * 3, *(2 * e for e in finite)])  # where an infinite ERT is drawn: above every finite one
    fig, axes = _grid(3 if study.gaps else 2, width=5.2, height=4.2)
    norms = list(dict.fromkeys(g.norm for v in study.values for g in v.stats.groups))
    chosen = {}
    for i, norm in enumerate(norms):
        style, marker = _style(norm), STYLES.get(norm, ("-", "o"))[1]
        shift = (i - (len(norms) - 1) / 2) * 0.1  # norms side by side at each value
        best = [(j, best_group(v.stats.groups, norm, target)) for j, v in enumerate(study.values)]
        best = [(j, g) for j, g in best if g is not None]
        chosen.update({(labels[j], norm): g.lr for j, g in best})
        hit = [(j, g, *_ert_interval(g.steps_to[target])) for j, g in best if g.steps_to[target].reached]
        axes[0].errorbar([j + shift for j, *_ in hit], [e for _, _, e, _, _ in hit],
                         yerr=[[max(0.0, e - lo) for *_, e, lo, _ in hit],
                               [max(0.0, min(hi, top) - e) for *_, e, _, hi in hit]],
                         marker=marker, capsize=3, label=norm, **style)
        missed = [(j, g) for j, g in best if not g.steps_to[target].reached]
        axes[0].scatter([j + shift for j, _ in missed], [top] * len(missed), marker="x", color=style["color"])
        for j, g in best:
            s = g.steps_to[target]
            if not s.reached:  # no seed at any lr: the 'x' says it; a best lr means nothing there
                continue
            y = s.ert
            note = f"lr {g.lr:.2g}" + ("" if s.all_reached else f", {s.reached}/{s.n}")
            axes[0].annotate(note, (j + shift, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                             color=style["color"])
        accs = [(j, g) for j, g in best if g.final_test_acc.mean is not None]
        values = [[r.final_test_acc for r in g.members if np.isfinite(r.final_test_acc)] for _, g in accs]
        means = [g.final_test_acc.mean for _, g in accs]
        axes[1].errorbar([j + shift for j, _ in accs], means,
                         yerr=[[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]],
                         marker=marker, capsize=3, label=norm, **style)
        for j, g in best:
            if g.diverged:
                axes[1].annotate(f"{g.diverged} div", (j + shift, g.final_test_acc.mean or 0.1),
                                 textcoords="offset points", xytext=(3, 3), fontsize=6, color=style["color"])
    if study.gaps:
        _plot_gaps(axes[2], study, labels, chosen)
    budgets = [max(v.stats.budgets) for v in study.values]
    if len(set(budgets)) == 1:
        axes[0].axhline(budget, color="gray", linestyle=":", label="budget")
    else:  # a budget per value (equal data: fewer steps for larger batches)
        axes[0].scatter(range(len(labels)), budgets, marker="_", s=400, color="gray", label="budget (train.steps)")
    axes[0].set(ylabel=f"ERT to val acc >= {target:g} (steps, log)", yscale="log", ylim=(None, top * 1.6),
                title=f"ERT to val acc {target:g}, 95% interval ('x' at the top: no seed reached it)")
    axes[1].set(ylabel="final test accuracy (eval mode)", title="test accuracy of the chosen lr: mean, min..max")
    _acc_limits(axes[1])
    column = STUDY_COLUMN.get(study.name, study.key)
    for ax in axes:
        ax.set_xticks(np.arange(len(labels)), labels)
        ax.set_xlabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        ax.title.set_fontsize("small")
    name = study.values[0].stats.experiment
    fig.suptitle(f"{name}: each norm at its best lr per {column} (chosen on validation; the lr beside each point)")
    fig.savefig(path, dpi=100)
    return path


def _plot_gaps(ax, study, labels: list[str], chosen: dict) -> None:
    """Training-mode minus eval-mode final test accuracy per norm at its chosen lr (mean +- std over seeds)."""
    norms = list(dict.fromkeys(g.norm for g in study.gaps))
    for i, norm in enumerate(norms):
        mine = [g for g in study.gaps if g.norm == norm and g.gap[0] is not None
                and chosen.get((g.label, norm)) == g.lr]
        shift = (i - (len(norms) - 1) / 2) * 0.1
        style = _style(norm)
        ax.errorbar([labels.index(g.label) + shift for g in mine], [g.gap[0] for g in mine],
                    yerr=[g.gap[1] or 0 for g in mine], marker="o", capsize=3, label=norm, **style)
    ax.axhline(0, color="gray", linestyle=":")
    ax.set(ylabel="test acc: train mode - eval mode", title="train/eval gap at the chosen lr (mean +- std)")


def _pool_series(series: list[tuple[np.ndarray, np.ndarray]]):
    """Steps and per-step mean/min/max over several (steps, values) series."""
    by_step: dict[int, list[float]] = {}
    for steps, values in series:
        for st, v in zip(steps, values):
            if np.isfinite(v):
                by_step.setdefault(int(st), []).append(float(v))
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[st]) for st in steps]
    return steps, *(np.array([f(v) for v in vals]) for f in (np.mean, np.min, np.max))


def plot_probes(runs: list[Run], key: str | None, path: Path) -> Path | None:
    """Santurkar Fig. 4, two rows: the loss range along -g (max - min of L(w - eta g)) and the
    effective beta-smoothness vs step, one column per (study value, lr); mean line and min..max band
    over seeds per norm, the same y-axis along a row so that columns compare."""
    probed = [r for r in runs if "probe/beta" in r.curves]
    if not probed:
        return None
    rows = _row_keys(probed, key)
    cols = len(rows)
    fig = Figure(figsize=(4.4 * cols, 7), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharey="row")
    for col, (where, rs) in enumerate(rows.items()):
        for norm in sorted({r.norm for r in rs}, key=norm_order):
            mine = [r for r in rs if r.norm == norm]
            style = _style(norm)
            ranges = [(r.curves["probe/loss_max"][0], r.curves["probe/loss_max"][1] - r.curves["probe/loss_min"][1])
                      for r in mine if "probe/loss_max" in r.curves and "probe/loss_min" in r.curves
                      and np.array_equal(r.curves["probe/loss_max"][0], r.curves["probe/loss_min"][0])]
            for row, series in ((0, ranges), (1, [r.curves["probe/beta"] for r in mine])):
                steps, mean, low, high = _pool_series(series)
                axes[row, col].plot(steps, mean, label=f"{norm} (n={len(mine)})", **style)
                if len(mine) > 1:
                    axes[row, col].fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
        title = _row_title(where, _column(key))
        axes[0, col].set(title=f"loss range along -grad ({title})", yscale="log")
        axes[1, col].set(title=f"effective beta-smoothness ({title})", yscale="log", xlabel="step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="x-small")
            ax.title.set_fontsize("small")
    axes[0, 0].set_ylabel("max - min of L(w - eta g)")
    axes[1, 0].set_ylabel("max ||g - g(w - eta g)|| / ||eta g||")
    fig.suptitle("Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4):\n"
                 "line = mean, band = min..max over seeds; smaller = smoother", fontsize="medium")
    fig.savefig(path, dpi=100)
    return path


def _column(key: str | None) -> str | None:
    """What a study's value is called in titles ("batch size"), None outside a study."""
    return STUDY_COLUMN.get(STUDY_KEYS.get(key)) if key else None


def _layer_mean(run: Run, names: list[str], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's ICS metric averaged over its hidden layers (not the head) at each probe step."""
    curves = [run.curves[f"ics/{n}/{metric}"] for n in names if n != "head" and f"ics/{n}/{metric}" in run.curves]
    if not curves or any(not np.array_equal(c[0], curves[0][0]) for c in curves):
        return None
    return curves[0][0], np.mean([c[1] for c in curves], axis=0)


def plot_ics(runs: list[Run], key: str | None, path: Path) -> Path | None:
    """Santurkar Def. 2.1, two rows: ||G - G'|| and cos(G, G') averaged over the hidden layers vs
    step, one column per (study value, lr), mean line and min..max band over seeds per norm; the
    same y-axis along a row. Per-layer numbers are in the report's ICS table."""
    probed = [r for r in runs if any(t.startswith("ics/") for t in r.curves)]
    if not probed:
        return None
    names, rows = ics_names(probed), _row_keys(probed, key)
    cols = len(rows)
    fig = Figure(figsize=(4.4 * cols, 7), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharey="row")
    for col, (where, rs) in enumerate(rows.items()):
        for norm in sorted({r.norm for r in rs}, key=norm_order):
            mine = [r for r in rs if r.norm == norm]
            style = _style(norm)
            for row, metric in enumerate(("l2", "cos")):
                series = [c for r in mine if (c := _layer_mean(r, names, metric)) is not None]
                if not series:
                    continue
                steps, mean, low, high = _pool_series(series)
                axes[row, col].plot(steps, mean, label=f"{norm} (n={len(series)})", **style)
                if len(series) > 1:
                    axes[row, col].fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
        title = _row_title(where, _column(key))
        axes[0, col].set(title=f"||G - G'||, mean over hidden layers ({title})", yscale="log")
        axes[1, col].set(title=f"cos(G, G'), mean over hidden layers ({title})", xlabel="step", ylim=(-1.05, 1.05))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
            ax.title.set_fontsize("small")
    axes[0, 0].set_ylabel("||G - G'|| (log)")
    axes[1, 0].set_ylabel("cos(G, G') (1 = no shift)")
    fig.suptitle("Internal covariate shift (Santurkar Def. 2.1): a layer's weight gradient G, and G' after the\n"
                 "layers below took this step's update; line = mean, band = min..max over seeds", fontsize="medium")
    fig.savefig(path, dpi=100)
    return path
