"""Sweep dir -> report.md and figures: does batch norm make training converge faster?

`write_report` is what scripts/report.py calls: it loads the sweep (bnexp.report.runs), computes its
numbers (bnexp.report.stats, bnexp.report.studies), draws the figures (bnexp.report.figures), writes
report.md, the CSVs (bnexp.report.export) and the seed aggregates (bnexp.report.aggregate).

report.md (`render_markdown`) is its sections in order, their tables from bnexp.report.tables, and the
conclusions this module writes from the numbers:

- `conclusion`: which variants reached the validation target at which lr, the speed-up of
  custom/native over none, the test accuracy of each norm's chosen lr, runs that did not complete,
  and whether custom matches native;
- `study_conclusion` (a study sweep: model.widths, train.batch_size or norm.position varies):
  BN's speed-up and the test accuracy of the chosen lr per study value, where the train/eval gap is largest;
- `probe_conclusion` (runs with probe.every > 0): the landscape numbers as multiples of none's, the ICS cosines.

Choose on validation, report on test: every step count, speed-up and best lr is on the validation
accuracy (bnexp.report.stats); the test accuracy appears only as what the chosen runs reached.

Runs that diverged or were interrupted are counted and shown, never dropped.
"""
from __future__ import annotations

from pathlib import Path

from bnexp.report.aggregate import write_aggregates
from bnexp.report.export import write_exports
from bnexp.report.figures import write_figures
from bnexp.report.runs import dirs_without_summary, load_runs
from bnexp.report.stats import (AGREE_ACC_TOL, AGREE_LOSS_TOL, N_LOSS_COMPARE, Agreement, Group, SweepStats, best_group,
                                summarize)
from bnexp.report.intervals import fmt_interval, verdict_ratio
from bnexp.report.studies import (STUDY_COLUMN, ProbeRatio, ProbeRow, Study, probe_quantities, probe_ratios, probe_stats,
                                  study_stats)
from bnexp.report.tables import (agreement_lines, fmt_acc, fmt_lr, fmt_mean_std, fmt_or_na, fmt_speedup,
                                 group_lines, header_lines, probe_lines, probe_ratio_lines, speedup_lines, speedup_verdict,
                                 study_lines)


def write_report(sweep_dir, target: float = 0.95, out_dir=None, prefix: str = "") -> tuple[Path, list[Path]]:
    """Read the sweep, write report.md and the figures (into the sweep dir unless out_dir is
    given; file names start with prefix); returns (report path, figure paths)."""
    root = Path(sweep_dir)
    runs = load_runs(root)
    stats = summarize(runs, target, dirs_without_summary(root))
    study = study_stats(runs, target)
    probes = probe_stats(runs, None if study is None else study.key)
    quantities = probe_quantities([r for r in runs if "probe/beta" in r.curves]) if probes else []
    ratios = probe_ratios(runs, None if study is None else study.key) if probes else []
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, stats, out, prefix, study)
    report = out / f"{prefix}report.md"
    report.write_text(render_markdown(stats, root, figures, study, probes, quantities, ratios))
    write_exports(runs, root, out, prefix)  # runs.csv, curves.csv (bnexp/report/export.py)
    write_aggregates(runs, root, out, prefix)  # seed aggregates for TensorBoard (bnexp/report/aggregate.py)
    return report, [out / name for name in figures]


def render_markdown(stats: SweepStats, sweep_dir: Path, figures: dict[str, str], study: Study | None = None,
                    probes: list[ProbeRow] = (), quantities: list[str] = (), ratios: list[ProbeRatio] = ()) -> str:
    """report.md text; `figures` maps each written PNG's file name to a caption.

    A study sweep gets its study section instead of the pooled per-(norm, lr) sections; runs with
    probes add the landscape and ICS section.
    """
    if study is None:
        lines = header_lines(stats, sweep_dir) + group_lines(stats) + speedup_lines(stats)
        lines += agreement_lines(stats.agreement) + ["## Conclusion", "", conclusion(stats), ""]
    else:
        lines = header_lines(stats, sweep_dir, study) + study_lines(study)
        lines += ["### What the study says", "", study_conclusion(study), ""]
    if probes:
        lines += probe_lines(probes, quantities, study) + probe_ratio_lines(list(ratios), list(quantities), study)
        lines += ["### What the probes say", "", probe_conclusion(probes, quantities, list(ratios)), ""]
    lines += ["## Figures", ""]
    lines += [f"![{name}]({name})\n\n{caption}\n" for name, caption in figures.items()] or ["No figures (no curves)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the conclusion

def conclusion(stats: SweepStats) -> str:
    """One paragraph written from the sweep's numbers."""
    sentences = [_reach_sentence(stats), *_gap_sentences(stats), _best_sentence(stats), _chosen_test_sentence(stats),
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
    return f"Within {budget} steps, validation accuracy {t:g} was reached by " + "; ".join(parts) + "."


def _gap_sentences(stats: SweepStats) -> list[str]:
    """Per variant, where it is faster than none, slower, or not clearly different, by the intervals."""
    out = []
    by_lr = stats.speedup.by_lr
    for norm in dict.fromkeys(s.norm for s in by_lr):
        rows = [s for s in by_lr if s.norm == norm and s.ratio is not None]
        if not rows:
            out.append(f"The speed-up of {norm} over none is undefined at every shared lr (neither reached the target).")
            continue
        verdicts: dict[str, list[str]] = {}
        for s in rows:
            verdicts.setdefault(speedup_verdict(s), []).append(f"lr {fmt_lr(s.lr)} ({fmt_speedup(s)})")
        out.append(f"Against none at the same lr, {norm}: " + "; ".join(
            f"{verdict} at {', '.join(where)}" for verdict, where in verdicts.items()) + ".")
    return out


def _best_sentence(stats: SweepStats) -> str | None:
    sp = stats.speedup
    if sp.none_best_lr is None or not sp.best:
        return None
    parts = [f"{b.norm} at lr {fmt_lr(b.lr)}{', the edge of its grid,' if b.edge else ''} {fmt_speedup(b)}, "
             f"{speedup_verdict(b)}" for b in sp.best]
    edge = " (the edge of its grid)" if sp.none_best_edge else ""
    return (f"Each at its own best lr (chosen on validation), against none at lr {fmt_lr(sp.none_best_lr)}{edge}: "
            + "; ".join(parts) + ".")


def _chosen_test_sentence(stats: SweepStats) -> str | None:
    """The test accuracy of each norm's chosen lr: reported, after the choice was made on validation."""
    parts = []
    for norm in dict.fromkeys(g.norm for g in stats.groups):
        g = best_group(stats.groups, norm, stats.target)
        parts.append(f"{norm} (lr {fmt_lr(g.lr)}) {fmt_acc(g.final_test_acc, g.runs)}")
    if not parts:
        return None
    return ("Test accuracy of the chosen lrs (the test set's one evaluation at the end of each run; "
            "not used to choose): " + ", ".join(parts) + ".")


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
            f"{fmt_or_na(ag.max_acc_diff, '.4g')} (allowed {AGREE_ACC_TOL}) and the first training loss by at most "
            f"{fmt_or_na(ag.max_step1_diff, '.3g')} (allowed {AGREE_LOSS_TOL:g}).")
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


# ----------------------------------------------------------------------------- the why studies' conclusions

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
                parts.append(f"{v.label}: {fmt_speedup(best)} ({speedup_verdict(best)})")
        if parts:
            sentences.append(f"Speed-up of {norm} over none to validation accuracy {target:g}, each at its best lr, "
                             f"by {column}: " + ", ".join(parts) + ".")
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
        sentences.append("Test accuracy of each norm at its best lr (chosen on validation; the test set's one "
                         "evaluation at the end of each run): " + "; ".join(parts) + ".")
    if not any(v.stats.speedup.none_best_lr is not None for v in study.values):
        sentences.append("No `none` runs: no speed-up to compute.")
    for norm in dict.fromkeys(g.norm for g in study.gaps if g.norm != "none"):  # none: 0 by construction
        mine = [g for g in study.gaps if g.norm == norm and g.gap[0] is not None]
        if mine:
            worst = max(mine, key=lambda g: abs(g.gap[0]))
            sentences.append(f"The train/eval gap of {norm} is largest at {column} {worst.label}: "
                             f"{fmt_mean_std(worst.gap, '+.4f')} (eval mode {fmt_mean_std(worst.eval_acc, '.4f')}, "
                             f"training mode {fmt_mean_std(worst.train_acc, '.4f')}).")
    return " ".join(sentences)


def _mean_over_layers(row: ProbeRow, metric: str) -> float | None:
    values = [v[0] for q, v in row.values.items() if q.startswith("ics/") and q.endswith(f"/{metric}")
              and v[0] is not None]
    return sum(values) / len(values) if values else None


def probe_conclusion(rows: list[ProbeRow], quantities: list[str], ratios: list[ProbeRatio] = ()) -> str:
    """Each variant's landscape and ICS-distance numbers as multiples of none's, with what their
    intervals allow one to say, and the ICS cosines, per (study value, lr)."""
    sentences = []
    for (where, lr) in dict.fromkeys((r.label, r.lr) for r in rows):
        here = {r.norm: r for r in rows if (r.label, r.lr) == (where, lr)}
        at = f"{where + ', ' if where else ''}lr {fmt_lr(lr)}"
        parts = []
        for ratio in (x for x in ratios if (x.label, x.lr) == (where, lr)):
            said = [f"{q.removeprefix('ics/')} {fmt_interval(ci, '.2g', 'x')} "
                    f"({verdict_ratio(ci, 'larger', 'smaller')})" for q, ci in ratio.ratios.items()
                    if ci is not None and (q in ("loss range", "beta") or q.endswith("/l2"))]
            if said:
                parts.append(f"{ratio.norm} vs none: " + ", ".join(said))
        cos = [f"{n} {c:.3f}" for n, r in here.items() if (c := _mean_over_layers(r, "cos")) is not None]
        text = f"At {at}: " + ("; ".join(parts) if parts else "no none run to compare with")
        if cos:
            text += f"; mean cos(G, G') over layers: {', '.join(cos)}"
        sentences.append(text + ".")
    return " ".join(sentences)
