"""report.md's tables: the report's numbers as text, one function per section of tables.

`bnexp.report.write` puts these sections in order and adds the conclusions written from the numbers:

- the header (run counts, budgets, pooled config keys);
- per (norm, lr): steps to 90/95/97% validation accuracy (bnexp.report.stats.TABLE_TARGETS) and to the
  target (mean +- std, k/n seeds), final test acc (the test set's one evaluation at the end of a run);
- the speed-up over none, at each lr and at each variant's best lr (chosen on validation), with the
  test accuracy of the chosen lr; custom vs native agreement;
- a study sweep's tables per study value, BN's advantage per value (each norm at its best lr, chosen on
  validation, with its test accuracy), the train/eval gap;
- the landscape and ICS numbers per variant (runs with probes).
"""
from __future__ import annotations

from pathlib import Path

from bnexp.report.intervals import CONFIDENCE, N_RESAMPLES, fmt_interval, verdict_difference, verdict_ratio
from bnexp.report.stats import N_LOSS_COMPARE, AccStats, Agreement, Speedup, StepStats, SweepStats, best_group
from bnexp.report.studies import STUDY_COLUMN, ProbeRatio, ProbeRow, Study

# how bnexp.report.stats.best_group chooses, as report.md says it
BEST_LR_RULE = ("chosen on validation (most seeds reaching the target, then fewest mean steps, then highest "
                "final validation accuracy)")

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
    early = f", {s.at_first_eval} at the 1st eval" if s.at_first_eval else ""
    return f"{s.mean:.0f}{std} ({s.reached}/{s.n}{early})"


def fmt_ert(s: StepStats) -> str:
    """The expected running time: '640', 'inf (0/5)' when no run reached the target."""
    return f"inf (0/{s.n})" if s.reached == 0 else f"{s.ert:.0f}"


def fmt_lr_edge(lr: float, edge: bool) -> str:
    """The lr, flagged when it is the best and at the edge of its grid."""
    return fmt_lr(lr) + (" (grid edge)" if edge else "")


def fmt_speedup(s: Speedup) -> str:
    """'1.57x [1.21, 2.05]', or the bound when one side never reached the target."""
    if s.kind != "=" or s.ci is None:  # a bound: one side never reached the target, so no finite interval
        return fmt_ratio(s.ratio, s.kind)
    # runs that reached the target at their first evaluation may have reached it sooner: a bound
    return (f"{s.resolution} " if s.resolution else "") + fmt_interval(s.ci, ".2f", "x")


def speedup_verdict(s: Speedup) -> str:
    """What the interval allows one to say: faster / slower than none, or no clear difference."""
    if s.ratio is None:
        return "neither reached the target"
    return verdict_ratio(s.ci, "faster than none", "slower than none")


def acc_verdict(s: Speedup) -> str:
    return verdict_difference(s.acc_diff, "higher than none", "lower than none")


def fmt_acc(acc: AccStats, runs: int) -> str:
    if acc.mean is None:
        return f"n/a (0/{runs} finite)"
    std = "" if acc.std is None else f" +- {acc.std:.4f}"
    extra = f" ({acc.n}/{runs} finite)" if acc.n < runs else ""
    return f"{acc.mean:.4f}{std}{extra}"


def fmt_or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_mean_std(mean_std: tuple[float | None, float | None], spec: str) -> str:
    """'0.123 +- 0.004', '0.123' for one value, 'n/a' for none."""
    mean, std = mean_std
    if mean is None:
        return "n/a"
    return format(mean, spec) + ("" if std is None else f" +- {format(std, spec.lstrip('+'))}")


# ----------------------------------------------------------------------------- the convergence sections

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def header_lines(stats: SweepStats, sweep_dir: Path, study: Study | None = None) -> list[str]:
    """The title and what the sweep holds: run counts by status, dirs without summary.json, budgets, pooled keys."""
    c = stats.counts
    lines = [f"# Sweep report: {stats.experiment}", "", f"Sweep dir: `{sweep_dir}`", "",
             f"- Runs with summary.json: {c.runs} ({c.completed} completed, {c.diverged} diverged, "
             f"{c.interrupted} interrupted).",
             f"- Run dirs without summary.json (not counted below): {len(c.without_summary)}"
             + "".join(f"\n  - `{p}`" for p in c.without_summary),
             f"- Budget (train.steps): {', '.join(map(str, stats.budgets))}; validation accuracy evaluated "
             f"{'; '.join(stats.schedules)}; the test set once, at the end of each run. Steps to a target are "
             "the first evaluation at or above it, so they are as fine as that spacing.",
             "- Choose on validation, report on test: steps to a target, speed-ups and each norm's best lr "
             "use the validation accuracy; the test accuracy is reported, never chosen on."]
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


def steps_header(t: float) -> str:
    return f"steps to {t * 100:g}% val acc"


def group_lines(stats: SweepStats) -> list[str]:
    """Per (norm, lr): status counts, steps to each validation threshold of `stats.thresholds`, final test accuracy."""
    ts = stats.thresholds
    header = (["norm", "lr", "runs", "diverged", "interrupted"] + [steps_header(t) for t in ts]
              + [f"ERT to {stats.target:g}", "mean val err", "final test acc"])
    rows = [[g.norm, fmt_lr(g.lr), str(g.runs), str(g.diverged), str(g.interrupted)]
            + [fmt_steps(g.steps_to[t]) for t in ts]
            + [fmt_ert(g.steps_to[stats.target]), fmt_mean_std((g.mean_val_err.mean, g.mean_val_err.std), ".4f"),
               fmt_acc(g.final_test_acc, g.runs)]
            for g in stats.groups]
    intro = ("Steps to a validation accuracy: mean +- sample std (ddof=1) over the seeds that reached it, then "
             "(k/n seeds reached); n counts every run, diverged and interrupted included. '> B (0/n)': no seed "
             "reached it; B is the mean over seeds of the budget (steps_done for an interrupted run). 'k at the 1st "
             "eval': k runs reached it at their first evaluation, so they may have reached it sooner (their steps "
             "are upper bounds, and a speed-up built on them is marked '>=' or '<='). "
             "ERT (expected running time): the steps spent by all runs (a miss counts its budget, or where it "
             "diverged or stopped) over the runs that reached the target. Mean val err: the average validation "
             "error over the run (area under the error curve / budget), lower = converged sooner. "
             "Final test acc: the test set's one evaluation at the end of each run (reported, not chosen on), "
             "mean +- std over runs with a finite value (a run interrupted before its end has none).")
    return ["## Per (norm, lr)", "", intro, "", *_table(header, rows), ""]


INTERVAL_WORDS = (f"[a, b]: {CONFIDENCE:.0%} bootstrap interval over seeds ({N_RESAMPLES} resamples; paired by seed "
                  "where both sides ran the same seeds). A comparison whose interval includes no difference (1 for "
                  "a speed-up, 0 for an accuracy difference) is 'no clear difference'.")
SPEEDUP_WORDS = ("Speed-up = ERT of none / ERT of the variant, ERT = steps spent by all runs / runs that reached the "
                 "target (a miss counts its budget, or where it diverged or stopped). '>= x [a, b]' / '<= x [a, b]': "
                 "runs of the variant / of none reached the target at their first evaluation, so the true speed-up "
                 "is at least / at most this. '> x' (none never reached it) "
                 "and '< x' (the variant never did) are bounds from mean steps with misses at their budget. "
                 "P(beats none): the chance that a run of the variant reaches the target in fewer steps than a run "
                 "of none (a miss is slower than any hit, ties count half).")


def comparison_row(s: Speedup) -> list[str]:
    """The columns every comparison with none shows."""
    return [fmt_speedup(s), fmt_interval(s.p_beats, ".2f"), speedup_verdict(s),
            fmt_interval(s.acc_diff, "+.4f"), acc_verdict(s)]


COMPARISON_HEADER = ["speed-up over none [95% CI]", "P(beats none) [95% CI]", "speed-up says",
                     "final test acc - none's [95% CI]", "accuracy says"]


def speedup_lines(stats: SweepStats) -> list[str]:
    """The speed-up over none at the target: at each shared lr, and at each variant's own best lr."""
    t, sp = stats.target, stats.speedup
    lines = [f"## Speed-up over none (target {t:g})", "", SPEEDUP_WORDS + " " + INTERVAL_WORDS, ""]
    if sp.none_best_lr is None:
        return lines + ["No `none` runs in this sweep: no speed-up to compute.", ""]
    steps = {(g.norm, g.lr): fmt_steps(g.steps_to[t]) for g in stats.groups}
    rows = [[s.norm, fmt_lr(s.lr), steps[("none", s.lr)], steps[(s.norm, s.lr)], *comparison_row(s)] for s in sp.by_lr]
    lines += ["At each lr:", "", *_table(["norm", "lr", "none steps", "its steps", *COMPARISON_HEADER], rows), ""]
    test = {(g.norm, g.lr): fmt_acc(g.final_test_acc, g.runs) for g in stats.groups}
    rows = [["none", fmt_lr_edge(sp.none_best_lr, sp.none_best_edge), steps[("none", sp.none_best_lr)],
             test[("none", sp.none_best_lr)], "reference", "", "", "", ""]]
    rows += [[b.norm, fmt_lr_edge(b.lr, b.edge), steps[(b.norm, b.lr)], test[(b.norm, b.lr)], *comparison_row(b)]
             for b in sp.best]
    edge = any(b.edge for b in sp.best) or sp.none_best_edge
    lines += [f"At each variant's own best lr, {BEST_LR_RULE}; then the test accuracy of the chosen lr"
              + ("; '(grid edge)': the best lr is the smallest or largest that variant ran, so its optimum may lie "
                 "outside the grid and this best-vs-best comparison is not settled" if edge else "") + ":", "",
              *_table(["norm", "best lr", "steps", "test acc of the chosen lr", *COMPARISON_HEADER], rows), ""]
    return lines


def agreement_lines(ag: Agreement) -> list[str]:
    """custom vs native: the largest differences over their shared (lr, seed) pairs, overall and per lr."""
    lines = ["## custom vs native agreement", ""]
    if ag.pairs == 0:
        return lines + ["No (lr, seed) has both a custom and a native run.", ""]
    pair = lambda p: "" if p is None else f" (lr {fmt_lr(p[0])}, seed {p[1]})"
    acc = "n/a" if ag.max_acc_diff is None else f"{ag.max_acc_diff:.4g}{pair(ag.max_acc_pair)}"
    loss = "n/a" if ag.max_loss_diff is None else f"{ag.max_loss_diff:.3g}{pair(ag.max_loss_pair)}"
    rows = [[fmt_lr(r.lr), str(r.pairs), fmt_or_na(r.max_acc_diff, ".4g"), fmt_or_na(r.max_step1_diff, ".3g"),
             fmt_or_na(r.max_loss_diff, ".3g")] for r in ag.by_lr]
    table = _table(["lr", "pairs", "max |diff| final test acc", "max |diff| loss at step 1",
                    f"max |diff| first {N_LOSS_COMPARE} losses"], rows)
    return lines + [f"- Matching (lr, seed) pairs: {ag.pairs}",
                    f"- Max |diff| of final test accuracy over {ag.acc_pairs} pairs: {acc}",
                    f"- Max |diff| of the first {N_LOSS_COMPARE} train/loss values over {ag.loss_pairs} "
                    f"pairs: {loss}", "", *table, ""]


# ----------------------------------------------------------------------------- the why studies' sections

def study_lines(study: Study) -> list[str]:
    """The study's table per value, BN's advantage per value and the train/eval gap."""
    column = STUDY_COLUMN.get(study.name, study.key)
    first = study.values[0].stats
    t, ts = first.target, first.thresholds
    header = ([column, "norm", "lr", "runs", "diverged"] + [steps_header(x) for x in ts]
              + [f"ERT to {t:g}", "mean val err", "final test acc"])
    rows = [[v.label, g.norm, fmt_lr(g.lr), str(g.runs), str(g.diverged)]
            + [fmt_steps(g.steps_to[x]) for x in ts]
            + [fmt_ert(g.steps_to[t]), fmt_mean_std((g.mean_val_err.mean, g.mean_val_err.std), ".4f"),
               fmt_acc(g.final_test_acc, g.runs)]
            for v in study.values for g in v.stats.groups]
    lines = [f"## Study: {study.name} (`{study.key}`)", "",
             f"Per {column}, norm and lr over seeds; steps to a validation accuracy and the final test accuracy "
             "as in the convergence report (mean +- sample std over the seeds that reached it, (k/n) how many "
             "did; ERT: steps spent by all runs over the runs that reached it; mean val err: the average "
             "validation error over the run; the test set evaluated once, at the end of each run).", "", *_table(header, rows), ""]
    lines += _advantage_lines(study, column, t)
    if study.gaps:
        lines += _gap_lines(study, column)
    return lines


def _advantage_lines(study: Study, column: str, target: float) -> list[str]:
    header = [column, "norm", "best lr", f"steps to {target:g} val acc", f"ERT to {target:g}",
              "test acc of the chosen lr", *COMPARISON_HEADER]
    rows = []
    for v in study.values:
        sp = v.stats.speedup
        for norm in dict.fromkeys(g.norm for g in v.stats.groups):
            g = best_group(v.stats.groups, norm, target)
            best = next((b for b in sp.best if b.norm == norm), None)
            edge = sp.none_best_edge if norm == "none" else best is not None and best.edge
            lead = [v.label, norm, fmt_lr_edge(g.lr, edge), fmt_steps(g.steps_to[target]), fmt_ert(g.steps_to[target]),
                    fmt_acc(g.final_test_acc, g.runs)]
            if norm == "none" or best is None or sp.none_best_lr is None:
                rows.append(lead + ["reference" if norm == "none" else "n/a", "", "", "", ""])
            else:
                rows.append(lead + comparison_row(best))
    intro = (f"Each norm at its own best lr per {column}, {BEST_LR_RULE} (target validation accuracy {target:g}), "
             "against none at its best lr there; '(grid edge)': the best lr is the smallest or largest that norm ran "
             "at this value, so its optimum may lie outside the grid. " + SPEEDUP_WORDS + " " + INTERVAL_WORDS)
    lines = [f"### Each norm at its best lr per {column} (target {target:g})", "", intro, "", *_table(header, rows), ""]
    rows = []
    for v in study.values:
        for s in v.stats.speedup.by_lr:
            rows.append([v.label, s.norm, fmt_lr(s.lr), *comparison_row(s)])
    if rows:
        lines += [f"### Against none at the same lr, per {column}", "",
                  *_table([column, "norm", "lr", *COMPARISON_HEADER], rows), ""]
    return lines


def _gap_lines(study: Study, column: str) -> list[str]:
    header = [column, "norm", "lr", "runs", "final test acc, eval mode", "training mode", "gap (train - eval)"]
    rows = [[g.label, g.norm, fmt_lr(g.lr), str(g.n), fmt_mean_std(g.eval_acc, ".4f"), fmt_mean_std(g.train_acc, ".4f"),
             fmt_mean_std(g.gap, "+.4f")] for g in study.gaps]
    intro = ("Test accuracy in eval mode (running statistics, what `test/acc` reports) and in training mode "
             "(`test/acc_train_mode`: the test set in consecutive batches of train.batch_size, each normalized "
             "by its own statistics), mean +- std over seeds; the gap is taken per run.")
    return ["### Training-mode vs eval-mode accuracy", "", intro, "", *_table(header, rows), ""]


PROBE_INTRO = (
    "Per run, each quantity is averaged over its probe steps (non-finite values left out); shown is the mean +- "
    "std of those averages over seeds. Landscape (Santurkar et al. 2018, §3.1): at each probe step, along the "
    "gradient g at the step's batch, for eta = lr x probe.multiples: loss range = max - min of L(w - eta g); "
    "grad change = max ||g - grad L(w - eta g)||; beta = max of that over ||eta g||. Smaller = smoother. "
    "ICS (Santurkar Def. 2.1): G = a layer's weight gradient, G' the same after the layers below it took "
    "this step's update; ||G - G'|| (its scale follows the gradient's) and cos(G, G') (1 = no shift).")


def probe_ratio_lines(ratios: list[ProbeRatio], quantities: list[str], study: Study | None) -> list[str]:
    """Each probe quantity of each norm as a multiple of none's at the same lr, with its interval."""
    if not ratios:
        return []
    lead = [] if study is None else [STUDY_COLUMN.get(study.name, study.key)]
    rows = [([r.label] if lead else []) + [r.norm, fmt_lr(r.lr)]
            + [fmt_interval(r.ratios[q], ".3g", "x") for q in quantities] for r in ratios]
    names = [q.removeprefix("ics/") for q in quantities]
    return ["### As multiples of none's at the same lr", "",
            "mean over seeds of the norm's per-run means / the same for none; " + INTERVAL_WORDS, "",
            *_table(lead + ["norm", "lr"] + names, rows), ""]


def probe_lines(rows: list[ProbeRow], quantities: list[str], study: Study | None) -> list[str]:
    """The landscape table and the ICS table per layer (per study value too in a study sweep)."""
    lead = [] if study is None else [STUDY_COLUMN.get(study.name, study.key)]
    landscape = [q for q in quantities if not q.startswith("ics/")]
    ics = [q for q in quantities if q.startswith("ics/")]
    table = lambda qs, names: _table(
        lead + ["norm", "lr", "runs"] + names,
        [([r.label] if lead else []) + [r.norm, fmt_lr(r.lr), str(r.runs)]
         + [fmt_mean_std(r.values[q], ".3g") for q in qs] for r in rows])
    lines = ["## Why: loss landscape and internal covariate shift", "", PROBE_INTRO, "",
             "### Landscape", "", *table(landscape, landscape), ""]
    if ics:
        lines += ["### Internal covariate shift per layer", "",
                  *table(ics, [q.removeprefix("ics/") for q in ics]), ""]
    return lines
