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
from bnexp.report.stats import SweepStats, best_group, group_runs
from bnexp.report.studies import STUDY_COLUMN, STUDY_KEYS, ics_names, label, split_by
from bnexp.report.runs import Run

# Each norm's colour, line and marker come from its registry entry (bnexp/nn/registry.py)
COLORS = {name: v.color for name, v in NORMS.items()}
STYLES = {name: (v.line, v.marker) for name, v in NORMS.items()}
ZOOM = (0.9, 1.0)  # the lower panels of the validation-accuracy figure: where the variants' final accuracies differ
ACC_CURVE = "val/acc"  # the accuracy curve figures draw (test/acc has one point per run)


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
        out[name("study")] = (f"{study.name}: steps to validation accuracy {stats.target:g} and the final test "
                              f"accuracy vs {STUDY_COLUMN.get(study.name, study.key)}, each norm at its best lr there "
                              "(chosen on validation; mean +- std over seeds)"
                              + (", and the train/eval accuracy gap" if study.gaps else "") + ".")
    key = None if study is None else study.key
    if plot_probes(runs, key, out_dir / name("probes")):
        out[name("probes")] = ("Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4): range of "
                               "L(w - eta g) (band between the seeds' mean min and mean max), gradient change and "
                               "effective beta-smoothness (line = mean, band = min..max over seeds) vs step.")
    if plot_ics(runs, key, out_dir / name("ics")):
        out[name("ics")] = ("Internal covariate shift (Santurkar Def. 2.1) per layer: ||G - G'|| and cos(G, G') "
                            "vs step (line = mean, band = min..max over seeds).")
    return out


def _convergence_figures(runs: list[Run], stats: SweepStats, out_dir: Path, name) -> dict[str, str]:
    out = {}
    if plot_val_acc(runs, out_dir / name("val_acc")):
        out[name("val_acc")] = ("Validation accuracy vs step per norm: line = mean, band = min..max over seeds; "
                                "one column per lr, the bottom row zoomed into 90-100%.")
    acts = plot_activations(runs, out_dir / name("activations"))
    if acts:
        out[name("activations")] = (f"15/50/85th percentiles of the input to the last hidden layer's nonlinearity "
                                    f"(Ioffe & Szegedy 2015, Fig. 1b,c) at {acts[1]}.")
    plot_steps_to_target(stats, out_dir / name("steps_to_target"))
    out[name("steps_to_target")] = (f"Mean steps to validation accuracy {stats.target:g} vs lr per norm; "
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


def plot_val_acc(runs: list[Run], path: Path) -> Path | None:
    """Validation accuracy vs step, one column per lr, a line (mean) and min..max band per norm over
    seeds; the top row shows 0..1, the bottom row zooms into 90..100%."""
    groups = {k: rs for k, rs in group_runs(runs).items() if any(ACC_CURVE in r.curves for r in rs)}
    if not groups:
        return None
    lrs = sorted({lr for _, lr in groups})
    fig = Figure(figsize=(max(7, 4 * len(lrs)), 6.5), layout="constrained")
    axes = fig.subplots(2, len(lrs), squeeze=False, sharey="row")
    for (norm, lr), rs in groups.items():
        steps, mean, lo, hi = _pool_curves(rs, ACC_CURVE)
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
    axes[0, 0].set_ylabel("validation accuracy")
    axes[1, 0].set_ylabel(f"validation accuracy (zoom {ZOOM[0]:g}-{ZOOM[1]:g})")
    fig.suptitle("Validation accuracy per norm: line = mean, band = min..max over seeds")
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
    ax.set(xscale="log", xlabel="learning rate", ylabel=f"steps to val acc >= {t:g}",
           title=f"Steps to validation accuracy {t:g} ('x' at the top: seeds that never reached it)",
           ylim=(0, top * 1.1))
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
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


def plot_study(study, path: Path) -> Path:
    """Steps to the validation target and final test accuracy vs the study value, each norm at its best lr
    there (chosen on validation: bnexp.report.stats.best_group)."""
    labels = [v.label for v in study.values]
    x = np.arange(len(labels))
    target = study.values[0].stats.target
    budget = max(b for v in study.values for b in v.stats.budgets)
    panels = 3 if study.gaps else 2
    fig = Figure(figsize=(4.6 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    norms = list(dict.fromkeys(g.norm for v in study.values for g in v.stats.groups))
    for i, norm in enumerate(norms):
        color, (line, marker) = COLORS.get(norm), STYLES.get(norm, ("-", "o"))
        best = [best_group(v.stats.groups, norm, target) for v in study.values]
        shift = (i - (len(norms) - 1) / 2) * 0.06  # keep overlapping error bars apart
        steps = [(j, g.steps_to[target]) for j, g in enumerate(best) if g is not None]
        hit = [(j, s) for j, s in steps if s.reached]
        axes[0].errorbar([j + shift for j, _ in hit], [s.mean for _, s in hit], yerr=[s.std or 0 for _, s in hit],
                         linestyle=line, marker=marker, color=color, capsize=3, label=norm)
        missed = [j for j, s in steps if not s.all_reached]
        axes[0].scatter([j + shift for j in missed], [budget * 1.05] * len(missed), marker="x", color=color)
        accs = [(j, g.final_test_acc) for j, g in enumerate(best) if g is not None and g.final_test_acc.mean is not None]
        axes[1].errorbar([j + shift for j, _ in accs], [a.mean for _, a in accs], yerr=[a.std or 0 for _, a in accs],
                         linestyle=line, marker=marker, color=color, capsize=3, label=norm)
    if study.gaps:
        _plot_gaps(axes[2], study, labels)
    axes[0].axhline(budget, color="gray", linestyle=":")
    axes[0].set(ylabel=f"steps to val acc >= {target:g}", ylim=(0, budget * 1.12),
                title=f"steps to val acc {target:g} (best lr; 'x': not every seed)")
    axes[1].set(ylabel="final test accuracy (eval mode)", title="test accuracy of the chosen lr (chosen on val)")
    column = STUDY_COLUMN.get(study.name, study.key)
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.title.set_fontsize("small")
    fig.suptitle(f"{study.name}: mean +- std over seeds, each norm at its best lr per {column}")
    fig.savefig(path, dpi=100)
    return path


def _plot_gaps(ax, study, labels: list[str]) -> None:
    """Training-mode minus eval-mode final test accuracy per norm (mean +- std over seeds)."""
    norms = list(dict.fromkeys(g.norm for g in study.gaps))
    for norm in norms:
        mine = [g for g in study.gaps if g.norm == norm and g.gap[0] is not None]
        xs = [labels.index(g.label) for g in mine]
        ax.errorbar(xs, [g.gap[0] for g in mine], yerr=[g.gap[1] or 0 for g in mine], color=COLORS.get(norm),
                    linestyle=STYLES.get(norm, ("-",))[0], marker="o", capsize=3, label=norm)
    ax.axhline(0, color="gray", linestyle=":")
    ax.set(ylabel="test acc: train mode - eval mode", title="train/eval gap (every lr)")


def plot_probes(runs: list[Run], key: str | None, path: Path) -> Path | None:
    """Santurkar Fig. 4: loss range along -g (band between mean min and mean max over seeds),
    gradient change and effective beta (mean line, min..max band over seeds) vs step, per norm."""
    probed = [r for r in runs if "probe/beta" in r.curves]
    if not probed:
        return None
    rows = _row_keys(probed, key)
    fig = Figure(figsize=(14, 3.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, (where, rs) in enumerate(rows.items()):
        for norm in dict.fromkeys(r.norm for r in rs):
            mine = [r for r in rs if r.norm == norm]
            color, line = COLORS.get(norm), STYLES.get(norm, ("-",))[0]
            steps, lo, _, _ = _pool_curves(mine, "probe/loss_min")
            steps_hi, hi, _, _ = _pool_curves(mine, "probe/loss_max")
            if len(steps) and np.array_equal(steps, steps_hi):
                axes[row, 0].fill_between(steps, lo, hi, color=color, alpha=0.3, label=f"{norm} (n={len(mine)})")
            for col, tag in ((1, "probe/grad_change"), (2, "probe/beta")):
                steps, mean, low, high = _pool_curves(mine, tag)
                axes[row, col].plot(steps, mean, line, color=color, label=norm)
                axes[row, col].fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        title = _row_title(where, _column(key))
        axes[row, 0].set(title=f"loss along -grad, eta = lr x multiples ({title})", ylabel="loss", yscale="log")
        axes[row, 1].set(title=f"gradient predictiveness ({title})", ylabel="max ||g - g(w - eta g)||",
                         yscale="log")
        axes[row, 2].set(title=f"effective beta-smoothness ({title})", ylabel="max ||dg|| / ||eta g||",
                         yscale="log")
        for ax in axes[row]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="x-small")
            ax.title.set_fontsize("small")
    fig.suptitle("Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4): band/line = over seeds")
    fig.savefig(path, dpi=100)
    return path


def _column(key: str | None) -> str | None:
    """What a study's value is called in titles ("batch size"), None outside a study."""
    return STUDY_COLUMN.get(STUDY_KEYS.get(key)) if key else None


def plot_ics(runs: list[Run], key: str | None, path: Path) -> Path | None:
    """Santurkar Def. 2.1: ||G - G'|| and cos(G, G') per layer vs step, mean line and min..max band over seeds."""
    probed = [r for r in runs if any(t.startswith("ics/") for t in r.curves)]
    if not probed:
        return None
    names, rows = ics_names(probed), _row_keys(probed, key)
    fig = Figure(figsize=(4.2 * 2 * len(rows), 2.8 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 2 * len(rows), squeeze=False)
    for col, (where, rs) in enumerate(rows.items()):
        title = _row_title(where, _column(key))
        for i, name in enumerate(names):
            for j, metric in enumerate(("l2", "cos")):
                ax = axes[i, 2 * col + j]
                for norm in dict.fromkeys(r.norm for r in rs):
                    mine = [r for r in rs if r.norm == norm]
                    steps, mean, low, high = _pool_curves(mine, f"ics/{name}/{metric}")
                    color = COLORS.get(norm)
                    ax.plot(steps, mean, STYLES.get(norm, ("-",))[0], color=color, label=norm)
                    ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
                what = "||G - G'||" if metric == "l2" else "cos(G, G')"
                ax.set(title=f"{name}: {what} ({title})",
                       xlabel="step", yscale="log" if metric == "l2" else "linear")
                ax.title.set_fontsize("small")
                ax.grid(alpha=0.3)
                ax.legend(fontsize="x-small")
    fig.suptitle("Internal covariate shift (Santurkar Def. 2.1): G vs G' after the layers below took their step",
                 fontsize="medium" if len(rows) > 1 else "small")
    fig.savefig(path, dpi=100)
    return path
