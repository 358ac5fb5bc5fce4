"""Sweep dir -> report.md and figures: does batch norm make training converge faster?

`write_report` is what scripts/report.py calls: it loads the sweep (bnexp.sweep), computes its
numbers (bnexp.stats), draws the figures (bnexp.figures) and writes report.md from this module:

- per-group steps to 90/95/97% test accuracy (mean +- std and how many seeds got there) and
  final test accuracy;
- the speed-up of custom/native over none, at each lr and at each variant's best lr;
- custom-vs-native agreement, and a conclusion written from those numbers.

Runs that diverged or were interrupted are counted and shown, never dropped.
"""
from __future__ import annotations

from pathlib import Path

from bnexp.aggregate import write_aggregates
from bnexp.export import write_exports
from bnexp.figures import write_figures
from bnexp.stats import (AGREE_ACC_TOL, AGREE_LOSS_TOL, N_LOSS_COMPARE, AccStats, Agreement, Group,
                         StepStats, SweepStats, summarize)
from bnexp.sweep import dirs_without_summary, load_runs


def write_report(sweep_dir, target: float = 0.95, out_dir=None, prefix: str = "") -> tuple[Path, list[Path]]:
    """Read the sweep, write report.md and the figures (into the sweep dir unless out_dir is
    given; file names start with prefix); returns (report path, figure paths)."""
    root = Path(sweep_dir)
    runs = load_runs(root)
    stats = summarize(runs, target, dirs_without_summary(root))
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, stats, out, prefix)
    report = out / f"{prefix}report.md"
    report.write_text(render_markdown(stats, root, figures))
    write_exports(runs, root, out, prefix)  # runs.csv, curves.csv (bnexp/export.py)
    write_aggregates(runs, root, out, prefix)  # seed aggregates for TensorBoard (bnexp/aggregate.py)
    return report, [out / name for name in figures]


def render_markdown(stats: SweepStats, sweep_dir: Path, figures: dict[str, str]) -> str:
    """report.md text; `figures` maps each written PNG's file name to a caption."""
    lines = _header_lines(stats, sweep_dir) + _group_lines(stats) + _speedup_lines(stats)
    lines += _agreement_lines(stats.agreement) + ["## Conclusion", "", conclusion(stats), ""]
    lines += ["## Figures", ""]
    lines += [f"![{name}]({name})\n\n{caption}\n" for name, caption in figures.items()] or ["No figures (no curves)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- numbers as text

def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def fmt_ratio(ratio: float | None, kind: str) -> str:
    """'2.50x', '> 2.00x' (lower bound), '< 0.50x' (upper bound) or 'n/a'."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}x" if kind == "=" else f"{kind} {ratio:.2f}x"


def fmt_steps(s: StepStats) -> str:
    """'1500 +- 100 (3/3)'; '> 3000 (0/3)' when no seed reached it (3000 = the censored mean)."""
    if s.reached == 0:
        return f"> {s.censored_mean:.0f} (0/{s.n})"
    std = "" if s.std is None else f" +- {s.std:.0f}"
    return f"{s.mean:.0f}{std} ({s.reached}/{s.n})"


def fmt_acc(acc: AccStats, runs: int) -> str:
    if acc.mean is None:
        return f"n/a (0/{runs} finite)"
    std = "" if acc.std is None else f" +- {acc.std:.4f}"
    extra = f" ({acc.n}/{runs} finite)" if acc.n < runs else ""
    return f"{acc.mean:.4f}{std}{extra}"


# ----------------------------------------------------------------------------- report.md sections

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _header_lines(stats: SweepStats, sweep_dir: Path) -> list[str]:
    c = stats.counts
    lines = [f"# Sweep report: {stats.experiment}", "", f"Sweep dir: `{sweep_dir}`", "",
             f"- Runs with summary.json: {c.runs} ({c.completed} completed, {c.diverged} diverged, "
             f"{c.interrupted} interrupted).",
             f"- Run dirs without summary.json (not counted below): {len(c.without_summary)}"
             + "".join(f"\n  - `{p}`" for p in c.without_summary),
             f"- Budget (train.steps): {', '.join(map(str, stats.budgets))}; test accuracy evaluated every "
             f"{', '.join(map(str, stats.eval_every))} steps."]
    if stats.varying_keys:
        lines.append(f"- Warning: config keys other than norm, optim.lr and seed differ between runs and are "
                     f"pooled within each (norm, lr): {', '.join(stats.varying_keys)}.")
    return lines + [""]


def _group_lines(stats: SweepStats) -> list[str]:
    ts = stats.thresholds
    header = ["norm", "lr", "runs", "diverged", "interrupted"] + [f"steps to {t * 100:g}%" for t in ts] + ["final test acc"]
    rows = [[g.norm, fmt_lr(g.lr), str(g.runs), str(g.diverged), str(g.interrupted)]
            + [fmt_steps(g.steps_to[t]) for t in ts] + [fmt_acc(g.final_test_acc, g.runs)]
            for g in stats.groups]
    intro = ("Steps to a test accuracy: mean +- sample std (ddof=1) over the seeds that reached it, then "
             "(k/n seeds reached); n counts every run, diverged and interrupted included. '> B (0/n)': no seed "
             "reached it; B is the mean over seeds of the budget (steps_done for an interrupted run). "
             "Final test acc: mean +- std over runs with a finite value.")
    return ["## Per (norm, lr)", "", intro, "", *_table(header, rows), ""]


def _speedup_lines(stats: SweepStats) -> list[str]:
    t, sp = stats.target, stats.speedup
    intro = (f"Speed-up = (mean steps for none to reach test acc >= {t:g}) / (mean steps for the variant), "
             "means over seeds. A seed that never reached the target counts at its budget (steps_done if "
             "interrupted), which makes that mean a bound: '> x' is a lower bound (none missed the target), "
             "'< x' an upper bound (the variant missed it), 'n/a' when both missed it.")
    lines = [f"## Speed-up over none (target {t:g})", "", intro, ""]
    if sp.none_best_lr is None:
        return lines + ["No `none` runs in this sweep: no speed-up to compute.", ""]
    steps = {(g.norm, g.lr): fmt_steps(g.steps_to[t]) for g in stats.groups}
    rows = [[s.norm, fmt_lr(s.lr), steps[("none", s.lr)], steps[(s.norm, s.lr)], fmt_ratio(s.ratio, s.kind)]
            for s in sp.by_lr]
    lines += ["At each lr:", "", *_table(["norm", "lr", "none steps", "its steps", "speed-up"], rows), ""]
    rows = [["none", fmt_lr(sp.none_best_lr), steps[("none", sp.none_best_lr)], "1 (reference)"]]
    rows += [[b.norm, fmt_lr(b.lr), steps[(b.norm, b.lr)], fmt_ratio(b.ratio, b.kind)] for b in sp.best]
    lines += ["At each variant's own best lr (most seeds reaching the target, then fewest mean steps):", "",
              *_table(["norm", "best lr", "steps", "speed-up over none at its best lr"], rows), ""]
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _agreement_lines(ag: Agreement) -> list[str]:
    lines = ["## custom vs native agreement", ""]
    if ag.pairs == 0:
        return lines + ["No (lr, seed) has both a custom and a native run.", ""]
    pair = lambda p: "" if p is None else f" (lr {fmt_lr(p[0])}, seed {p[1]})"
    acc = "n/a" if ag.max_acc_diff is None else f"{ag.max_acc_diff:.4g}{pair(ag.max_acc_pair)}"
    loss = "n/a" if ag.max_loss_diff is None else f"{ag.max_loss_diff:.3g}{pair(ag.max_loss_pair)}"
    rows = [[fmt_lr(r.lr), str(r.pairs), _fmt(r.max_acc_diff, ".4g"), _fmt(r.max_step1_diff, ".3g"),
             _fmt(r.max_loss_diff, ".3g")] for r in ag.by_lr]
    table = _table(["lr", "pairs", "max |diff| final test acc", "max |diff| loss at step 1",
                    f"max |diff| first {N_LOSS_COMPARE} losses"], rows)
    return lines + [f"- Matching (lr, seed) pairs: {ag.pairs}",
                    f"- Max |diff| of final test accuracy over {ag.acc_pairs} pairs: {acc}",
                    f"- Max |diff| of the first {N_LOSS_COMPARE} train/loss values over {ag.loss_pairs} "
                    f"pairs: {loss}", "", *table, ""]


# ----------------------------------------------------------------------------- the conclusion

def conclusion(stats: SweepStats) -> str:
    """One paragraph written from the sweep's numbers."""
    sentences = [_reach_sentence(stats), *_gap_sentences(stats), _best_sentence(stats),
                 _status_sentence(stats), _agreement_sentence(stats.agreement)]
    return " ".join(s for s in sentences if s)


def _lrs(groups: list[Group], norm: str, target: float, full: bool) -> list[str]:
    """The lrs at which `norm` reached the target with every seed (full) or with some (not full)."""
    out = []
    for g in groups:
        s = g.steps_to[target]
        if g.norm == norm and s.reached > 0 and s.all_reached == full:
            out.append(fmt_lr(g.lr) + ("" if full else f" ({s.reached}/{s.n} seeds)"))
    return out


def _reach_sentence(stats: SweepStats) -> str:
    groups, t = stats.groups, stats.target
    budget = "/".join(str(b) for b in stats.budgets)
    parts = []
    for norm in dict.fromkeys(g.norm for g in groups):
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


def _gap_sentences(stats: SweepStats) -> list[str]:
    out = []
    by_lr = stats.speedup.by_lr
    for norm in dict.fromkeys(s.norm for s in by_lr):
        rows = [s for s in by_lr if s.norm == norm and s.ratio is not None]
        if not rows:
            out.append(f"The speed-up of {norm} over none is undefined at every shared lr (neither reached the target).")
            continue
        lo, hi = min(rows, key=lambda s: s.ratio), max(rows, key=lambda s: s.ratio)
        describe = lambda s: f"{fmt_ratio(s.ratio, s.kind)} at lr {fmt_lr(s.lr)} ({_gap_word(s.ratio)})"
        if lo is hi:
            out.append(f"The speed-up of {norm} over none is {describe(lo)}.")
        else:
            out.append(f"The speed-up of {norm} over none ranges from {describe(lo)} to {describe(hi)}.")
    return out


def _best_sentence(stats: SweepStats) -> str | None:
    sp = stats.speedup
    if sp.none_best_lr is None or not sp.best:
        return None
    parts = [f"{b.norm} (lr {fmt_lr(b.lr)}) {fmt_ratio(b.ratio, b.kind)}" for b in sp.best]
    return f"Each at its own best lr, against none at lr {fmt_lr(sp.none_best_lr)}: " + ", ".join(parts) + "."


def _status_sentence(stats: SweepStats) -> str:
    hit = [g for g in stats.groups if g.diverged or g.interrupted]
    if not hit:
        return "No run diverged or was interrupted."
    parts = []
    for g in hit:
        words = [f"{count}/{g.runs} {word}" for word, count in (("diverged", g.diverged), ("interrupted", g.interrupted))
                 if count]
        parts.append(f"{g.norm} at lr {fmt_lr(g.lr)}: {', '.join(words)}")
    return "Runs that did not complete: " + "; ".join(parts) + "."


def _agreement_sentence(ag: Agreement) -> str:
    if ag.pairs == 0:
        return "custom and native cannot be compared: no (lr, seed) has a run of both."
    if ag.matches is None:
        return f"custom and native share {ag.pairs} (lr, seed) pairs but no finite accuracy or loss to compare."
    verdict = "custom matches native" if ag.matches else "custom does NOT match native"
    text = (f"{verdict}: over {ag.pairs} (lr, seed) pairs the final test accuracy differs by at most "
            f"{_fmt(ag.max_acc_diff, '.4g')} (allowed {AGREE_ACC_TOL}) and the first training loss by at most "
            f"{_fmt(ag.max_step1_diff, '.3g')} (allowed {AGREE_LOSS_TOL:g}).")
    compared = [r for r in ag.by_lr if r.max_loss_diff is not None]
    close = [r for r in compared if r.max_loss_diff <= AGREE_LOSS_TOL]
    drift = [r for r in compared if r.max_loss_diff > AGREE_LOSS_TOL]
    if close:
        text += (f" The first {N_LOSS_COMPARE} losses agree within {max(r.max_loss_diff for r in close):.3g} "
                 f"at lr {', '.join(fmt_lr(r.lr) for r in close)}.")
    if drift:
        text += (" At lr " + ", ".join(f"{fmt_lr(r.lr)} (up to {r.max_loss_diff:.3g})" for r in drift)
                 + f" they drift apart within the first {N_LOSS_COMPARE} steps from a first-step difference of "
                 f"at most {max(r.max_step1_diff for r in drift):.3g}: rounding amplified by the training "
                 "dynamics at that learning rate.")
    return text
