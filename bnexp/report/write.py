"""Sweep dir -> report.md and figures: does batch norm make training converge faster?

`write_report` is what scripts/report.py calls: it loads the sweep (bnexp.report.runs), computes its
numbers (bnexp.report.stats), draws the figures (bnexp.report.figures) and writes report.md from this module:

- per-group steps to 90/95/97% test accuracy (mean +- std and how many seeds got there) and
  final test accuracy;
- the speed-up of custom/native over none, at each lr and at each variant's best lr;
- custom-vs-native agreement, and a conclusion written from those numbers;
- for a study sweep (bnexp.report.studies: model.widths, train.batch_size or norm.position varies),
  those tables per study value instead, BN's advantage per value and the train/eval gap;
- where runs have probes (probe.every > 0), the landscape and ICS numbers per variant.

Runs that diverged or were interrupted are counted and shown, never dropped.
"""
from __future__ import annotations

from pathlib import Path

from bnexp.report.aggregate import write_aggregates
from bnexp.report.export import write_exports
from bnexp.report.figures import write_figures
from bnexp.report.stats import (AGREE_ACC_TOL, AGREE_LOSS_TOL, N_LOSS_COMPARE, AccStats, Agreement, Group,
                         StepStats, SweepStats, best_group, summarize)
from bnexp.report.studies import STUDY_COLUMN, ProbeRow, Study, probe_quantities, probe_stats, study_stats
from bnexp.report.runs import dirs_without_summary, load_runs


def write_report(sweep_dir, target: float = 0.95, out_dir=None, prefix: str = "") -> tuple[Path, list[Path]]:
    """Read the sweep, write report.md and the figures (into the sweep dir unless out_dir is
    given; file names start with prefix); returns (report path, figure paths)."""
    root = Path(sweep_dir)
    runs = load_runs(root)
    stats = summarize(runs, target, dirs_without_summary(root))
    study = study_stats(runs, target)
    probes = probe_stats(runs, None if study is None else study.key)
    quantities = probe_quantities([r for r in runs if "probe/beta" in r.curves]) if probes else []
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, stats, out, prefix, study)
    report = out / f"{prefix}report.md"
    report.write_text(render_markdown(stats, root, figures, study, probes, quantities))
    write_exports(runs, root, out, prefix)  # runs.csv, curves.csv (bnexp/report/export.py)
    write_aggregates(runs, root, out, prefix)  # seed aggregates for TensorBoard (bnexp/report/aggregate.py)
    return report, [out / name for name in figures]


def render_markdown(stats: SweepStats, sweep_dir: Path, figures: dict[str, str], study: Study | None = None,
                    probes: list[ProbeRow] = (), quantities: list[str] = ()) -> str:
    """report.md text; `figures` maps each written PNG's file name to a caption.

    A study sweep gets its study section instead of the pooled per-(norm, lr) sections; runs with
    probes add the landscape and ICS section.
    """
    if study is None:
        lines = _header_lines(stats, sweep_dir) + _group_lines(stats) + _speedup_lines(stats)
        lines += _agreement_lines(stats.agreement) + ["## Conclusion", "", conclusion(stats), ""]
    else:
        lines = _header_lines(stats, sweep_dir, study) + _study_lines(study)
    if probes:
        lines += _probe_lines(probes, quantities, study)
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


def _header_lines(stats: SweepStats, sweep_dir: Path, study: Study | None = None) -> list[str]:
    c = stats.counts
    lines = [f"# Sweep report: {stats.experiment}", "", f"Sweep dir: `{sweep_dir}`", "",
             f"- Runs with summary.json: {c.runs} ({c.completed} completed, {c.diverged} diverged, "
             f"{c.interrupted} interrupted).",
             f"- Run dirs without summary.json (not counted below): {len(c.without_summary)}"
             + "".join(f"\n  - `{p}`" for p in c.without_summary),
             f"- Budget (train.steps): {', '.join(map(str, stats.budgets))}; test accuracy evaluated every "
             f"{', '.join(map(str, stats.eval_every))} steps."]
    if study is not None:
        lines.append(f"- Study: {study.name}, runs split by `{study.key}` "
                     f"({', '.join(v.label for v in study.values)}); nothing is pooled across its values.")
        if study.pooled_keys:
            lines.append(f"- Warning: other config keys differ too and are pooled within each ({study.key}, norm, "
                         f"lr): {', '.join(study.pooled_keys)}.")
    elif stats.varying_keys:
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


# ----------------------------------------------------------------------------- the why studies

def _pm(mean_std: tuple[float | None, float | None], spec: str) -> str:
    """'0.123 +- 0.004', '0.123' for one value, 'n/a' for none."""
    mean, std = mean_std
    if mean is None:
        return "n/a"
    return format(mean, spec) + ("" if std is None else f" +- {format(std, spec.lstrip('+'))}")


def _study_lines(study: Study) -> list[str]:
    """The study's table per value, BN's advantage per value, the train/eval gap, and what they say."""
    column = STUDY_COLUMN.get(study.name, study.key)
    first = study.values[0].stats
    t, ts = first.target, first.thresholds
    header = [column, "norm", "lr", "runs", "diverged"] + [f"steps to {x * 100:g}%" for x in ts] + ["final test acc"]
    rows = [[v.label, g.norm, fmt_lr(g.lr), str(g.runs), str(g.diverged)]
            + [fmt_steps(g.steps_to[x]) for x in ts] + [fmt_acc(g.final_test_acc, g.runs)]
            for v in study.values for g in v.stats.groups]
    lines = [f"## Study: {study.name} (`{study.key}`)", "",
             f"Per {column}, norm and lr over seeds; steps and accuracies as in the convergence report "
             "(mean +- sample std over the seeds that reached it, (k/n) how many did).", "", *_table(header, rows), ""]
    lines += _advantage_lines(study, column, t)
    if study.gaps:
        lines += _gap_lines(study, column)
    return lines + ["### What the study says", "", study_conclusion(study), ""]


def _advantage_lines(study: Study, column: str, target: float) -> list[str]:
    header = [column, "norm", "best lr", f"steps to {target:g}", "speed-up over none at their best lrs",
              "speed-up at each shared lr"]
    rows = []
    for v in study.values:
        sp = v.stats.speedup
        by_lr = {}
        for s in sp.by_lr:
            by_lr.setdefault(s.norm, []).append(f"{fmt_lr(s.lr)}: {fmt_ratio(s.ratio, s.kind)}")
        for norm in dict.fromkeys(g.norm for g in v.stats.groups):
            g = best_group(v.stats.groups, norm, target)
            best = next((b for b in sp.best if b.norm == norm), None)
            ratio = "1 (reference)" if norm == "none" else ("n/a" if best is None else fmt_ratio(best.ratio, best.kind))
            rows.append([v.label, norm, fmt_lr(g.lr), fmt_steps(g.steps_to[target]), ratio,
                         "; ".join(by_lr.get(norm, [])) or "-"])
    intro = (f"BN's advantage per {column}: each norm at its own best lr (most seeds reaching test accuracy "
             f"{target:g}, then fewest mean steps), and the speed-up over none at every lr both ran "
             "('>' lower bound: none missed the target; '<' upper bound: the variant missed it).")
    return [f"### Speed-up over none per {column} (target {target:g})", "", intro, "", *_table(header, rows), ""]


def _gap_lines(study: Study, column: str) -> list[str]:
    header = [column, "norm", "lr", "runs", "final test acc, eval mode", "training mode", "gap (train - eval)"]
    rows = [[g.label, g.norm, fmt_lr(g.lr), str(g.n), _pm(g.eval_acc, ".4f"), _pm(g.train_acc, ".4f"),
             _pm(g.gap, "+.4f")] for g in study.gaps]
    intro = ("Test accuracy in eval mode (running statistics, what `test/acc` reports) and in training mode "
             "(`test/acc_train_mode`: the test set in consecutive batches of train.batch_size, each normalized "
             "by its own statistics), mean +- std over seeds; the gap is taken per run.")
    return ["### Training-mode vs eval-mode accuracy", "", intro, "", *_table(header, rows), ""]


def study_conclusion(study: Study) -> str:
    """BN's best-lr speed-up per study value, and where the train/eval gap is largest, from the numbers."""
    column = STUDY_COLUMN.get(study.name, study.key)
    target = study.values[0].stats.target
    sentences = []
    norms = list(dict.fromkeys(b.norm for v in study.values for b in v.stats.speedup.best))
    for norm in norms:
        parts = []
        for v in study.values:
            best = next((b for b in v.stats.speedup.best if b.norm == norm), None)
            if best is not None and v.stats.speedup.none_best_lr is not None:
                parts.append(f"{v.label}: {fmt_ratio(best.ratio, best.kind)}")
        if parts:
            sentences.append(f"Speed-up of {norm} over none to test accuracy {target:g}, each at its best lr, by "
                             f"{column}: " + ", ".join(parts) + ".")
    parts = []
    for norm in dict.fromkeys(g.norm for v in study.values for g in v.stats.groups):
        accs = []
        for v in study.values:
            g = best_group(v.stats.groups, norm, target)
            if g is not None and g.final_test_acc.mean is not None:
                accs.append(f"{v.label}: {g.final_test_acc.mean:.4f}")
        if accs:
            parts.append(f"{norm} " + ", ".join(accs))
    if parts:
        sentences.append("Final test accuracy at each norm's best lr: " + "; ".join(parts) + ".")
    if not any(v.stats.speedup.none_best_lr is not None for v in study.values):
        sentences.append("No `none` runs: no speed-up to compute.")
    for norm in dict.fromkeys(g.norm for g in study.gaps if g.norm != "none"):  # none: 0 by construction
        mine = [g for g in study.gaps if g.norm == norm and g.gap[0] is not None]
        if mine:
            worst = max(mine, key=lambda g: abs(g.gap[0]))
            sentences.append(f"The train/eval gap of {norm} is largest at {column} {worst.label}: "
                             f"{_pm(worst.gap, '+.4f')} (eval mode {_pm(worst.eval_acc, '.4f')}, "
                             f"training mode {_pm(worst.train_acc, '.4f')}).")
    return " ".join(sentences)


PROBE_INTRO = (
    "Per run, each quantity is averaged over its probe steps (non-finite values left out); shown is the mean +- "
    "std of those averages over seeds. Landscape (Santurkar et al. 2018, §3.1): at each probe step, along the "
    "gradient g at the step's batch, for eta = lr x probe.multiples: loss range = max - min of L(w - eta g); "
    "grad change = max ||g - grad L(w - eta g)||; beta = max of that over ||eta g||. Smaller = smoother. "
    "ICS (Santurkar Def. 2.1): G = a layer's weight gradient, G' the same after the layers below it took "
    "this step's update; ||G - G'|| (its scale follows the gradient's) and cos(G, G') (1 = no shift).")


def _probe_lines(rows: list[ProbeRow], quantities: list[str], study: Study | None) -> list[str]:
    lead = [] if study is None else [STUDY_COLUMN.get(study.name, study.key)]
    landscape = [q for q in quantities if not q.startswith("ics/")]
    ics = [q for q in quantities if q.startswith("ics/")]
    table = lambda qs, names: _table(
        lead + ["norm", "lr", "runs"] + names,
        [([r.label] if lead else []) + [r.norm, fmt_lr(r.lr), str(r.runs)] + [_pm(r.values[q], ".3g") for q in qs]
         for r in rows])
    lines = ["## Why: loss landscape and internal covariate shift", "", PROBE_INTRO, "",
             "### Landscape", "", *table(landscape, landscape), ""]
    if ics:
        lines += ["### Internal covariate shift per layer", "",
                  *table(ics, [q.removeprefix("ics/") for q in ics]), ""]
    return lines + ["### What the probes say", "", probe_conclusion(rows, quantities), ""]


def _mean_over_layers(row: ProbeRow, metric: str) -> float | None:
    values = [v[0] for q, v in row.values.items() if q.startswith("ics/") and q.endswith(f"/{metric}")
              and v[0] is not None]
    return sum(values) / len(values) if values else None


def probe_conclusion(rows: list[ProbeRow], quantities: list[str]) -> str:
    """Each BN variant's landscape quantities as multiples of none's, and the ICS cosines, per (value, lr)."""
    sentences = []
    for (where, lr) in dict.fromkeys((r.label, r.lr) for r in rows):
        here = {r.norm: r for r in rows if (r.label, r.lr) == (where, lr)}
        at = f"{where + ', ' if where else ''}lr {fmt_lr(lr)}"
        base = here.get("none")
        parts = []
        for norm, r in here.items():
            if norm == "none" or base is None:
                continue
            ratios = [f"{q} {r.values[q][0] / base.values[q][0]:.2g}x"
                      for q in ("loss range", "grad change", "beta")
                      if r.values[q][0] is not None and base.values[q][0]]
            if ratios:
                parts.append(f"{norm} has " + ", ".join(ratios) + " none's")
        cos = [f"{n} {c:.3f}" for n, r in here.items() if (c := _mean_over_layers(r, "cos")) is not None]
        text = f"At {at}: " + ("; ".join(parts) if parts else "no none run to compare with")
        if cos:
            text += f"; mean cos(G, G') over layers: {', '.join(cos)}"
        sentences.append(text + ".")
    return " ".join(sentences)
