"""The numbers of a sweep: steps to a validation accuracy per (norm, lr), speed-ups over none, custom vs native.

Choose on validation, report on test: steps to a target count on the validation set
(summary.json's steps_to_val_acc, the val/acc curve), and so does every choice made here (a
norm's best lr, ties broken by final validation accuracy); the final test accuracy, from the
test set's one evaluation at the end of a run, is reported per group and compared between
custom and native (a measurement), never chosen on.

Runs are grouped by (norm, optim.lr) over seeds. A run that never reached a target counts the
steps it spent (its budget, or steps_done if it diverged or was interrupted): speed-ups are
ratios of expected running times (bnexp/report/intervals.py: all steps spent over the runs that
reached the target), each with a 95% bootstrap interval over seeds (paired where both sides ran
the same seeds), the probability that a variant's run beats none's, and the difference of final
test accuracy with its interval. Diverged and interrupted runs are counted, never dropped.

A best lr at the edge of its norm's grid (the smallest or largest rate that norm ran) is
flagged: the optimum may lie outside the grid, so "best vs best" is then not known.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from bnexp.config import TrainConfig
from bnexp.nn.registry import order as norm_order
from bnexp.run.schedule import resolution
from bnexp.report.intervals import (Interval, bootstrap, mean_difference, outcomes, p_beats_statistic,
                                    pair_by_seed, speedup_statistic)
from bnexp.report.runs import ReportError, Run
from bnexp.run.summary import STATUSES, STEPS_TO_VAL_ACC_KEYS

# the validation accuracies the per-(norm, lr) table always shows, besides the target: 0.90, 0.95, 0.97,
# the steps_to_val_acc keys of summary.json but 0.98 (so their steps come from summary.json, not the curves)
TABLE_TARGETS = tuple(float(k) for k in STEPS_TO_VAL_ACC_KEYS if k != "0.98")
N_LOSS_COMPARE = 100  # custom vs native: compare this many first train/loss values
AGREE_LOSS_TOL = 1e-3  # float rounding alone stays far below this after 100 steps
AGREE_ACC_TOL = 0.005  # 50 of the 10,000 test images; rounding can flip a few late in training


@dataclass(frozen=True)
class StepStats:
    """Steps to one validation accuracy over a group's seeds."""

    n: int  # runs in the group, diverged and interrupted ones included
    reached: int  # how many of them reached the target
    mean: float | None  # mean steps of those that reached it; None if none did
    std: float | None  # their sample std (ddof=1); None below two
    censored_mean: float  # mean over all n, a miss counted at its censor step
    steps: list[int | None]  # per run (in seed order), None where not reached
    spent: list[int] = field(default_factory=list)  # per run: steps to the target, else its censor step
    at_first_eval: int = 0  # runs that reached it at their first evaluation: their steps are upper bounds

    @property
    def all_reached(self) -> bool:
        return self.reached == self.n

    @property
    def outcomes(self):
        """One number per run for resampling (bnexp.report.intervals.outcomes)."""
        return outcomes(self.steps, self.spent)

    @property
    def ert(self) -> float:
        """Expected running time: steps spent by all runs / runs that reached the target (inf if none)."""
        return math.inf if self.reached == 0 else sum(self.spent) / self.reached


@dataclass(frozen=True)
class AccStats:
    """A final accuracy (test or validation) over the runs of a group that have a finite one."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Group:
    """One (norm, lr) over its seeds."""

    norm: str
    lr: float
    seeds: list
    runs: int
    diverged: int
    interrupted: int
    steps_to: dict[float, StepStats]  # by target validation accuracy
    final_test_acc: AccStats  # the test set's one evaluation at the end: reported, never chosen on
    final_val_acc: AccStats  # the last validation accuracy: breaks ties between lrs (best_group)
    mean_val_err: AccStats = AccStats(None, None, 0)  # the average validation error over the run (an AUC)
    members: list = field(default_factory=list, repr=False, compare=False)  # its Runs, in seed order


@dataclass(frozen=True)
class Speedup:
    """ERT of none / ERT of `norm` at the target (bnexp/report/intervals.py), with its uncertainty.

    kind '=': both reached the target at least once (an estimate); '>' a lower bound (none never
    did: the ratio of censored mean steps); '<' an upper bound (the variant never did); 'n/a' neither.
    """

    norm: str
    lr: float  # the variant's lr
    ratio: float | None
    kind: str
    ci: Interval | None = None  # 95% bootstrap interval of the ERT ratio
    p_beats: Interval | None = None  # P(a run of `norm` reaches the target in fewer steps than none's)
    acc_diff: Interval | None = None  # final test accuracy, norm - none
    paired: bool = False  # resampled by seed pairs
    base_lr: float | None = None  # none's lr it is compared with
    resolution: str = ""  # '>=' / '<=': runs of the variant / of none reached the target at their first evaluation
    edge: bool = False  # the variant's lr is its best and sits at the edge of its grid


@dataclass(frozen=True)
class Speedups:
    """Speed-ups over none at each shared lr, and at each norm's own best lr against none's best."""

    none_best_lr: float | None  # None: the sweep has no `none` runs
    by_lr: list[Speedup]
    best: list[Speedup]
    none_best_edge: bool = False  # none's best lr sits at the edge of its grid


@dataclass(frozen=True)
class LrAgreement:
    """custom vs native at one lr: the largest differences over its (lr, seed) pairs."""

    lr: float
    pairs: int
    max_acc_diff: float | None
    max_loss_diff: float | None
    max_step1_diff: float | None


@dataclass(frozen=True)
class Agreement:
    """custom vs native over every (lr, seed) that has both; None where nothing was comparable."""

    pairs: int
    acc_pairs: int
    max_acc_diff: float | None
    max_acc_pair: tuple | None  # (lr, seed) of the largest difference
    loss_pairs: int
    max_loss_diff: float | None
    max_loss_pair: tuple | None
    max_step1_diff: float | None
    by_lr: list[LrAgreement]
    matches: bool | None  # final acc within AGREE_ACC_TOL and first losses within AGREE_LOSS_TOL


@dataclass(frozen=True)
class Counts:
    """How many runs ended how, and the run dirs that never wrote a summary.json."""

    runs: int
    completed: int
    diverged: int
    interrupted: int
    without_summary: list[str]


@dataclass(frozen=True)
class SweepStats:
    """Everything the report says about a sweep, as numbers."""

    experiment: str
    target: float  # the validation accuracy speed-ups are measured at
    thresholds: list[float]  # TABLE_TARGETS and the target, ascending
    counts: Counts
    budgets: list[int]
    eval_every: list
    schedules: list[str]  # how each budget's evaluations are spaced, in words (the resolution of steps-to)
    varying_keys: list[str]
    groups: list[Group]
    speedup: Speedups
    agreement: Agreement


def summarize(runs: list[Run], target: float = 0.95, without_summary=()) -> SweepStats:
    """Per-group statistics, speed-ups at `target` and custom-vs-native agreement of a sweep's runs."""
    if not 0 < target <= 1:
        raise ReportError(f"target {target} is not a validation accuracy in (0, 1]")
    thresholds = sorted(set(TABLE_TARGETS) | {target}, key=float)
    groups = [group_stats(norm, lr, rs, thresholds) for (norm, lr), rs in group_runs(runs).items()]
    return SweepStats(
        experiment=runs[0].experiment,
        target=target,
        thresholds=thresholds,
        counts=_counts(runs, without_summary),
        budgets=sorted({r.budget for r in runs}),
        eval_every=sorted({r.config.get("train.eval_every") for r in runs}, key=str),
        schedules=sorted({schedule_words(r) for r in runs}),
        varying_keys=varying_keys(runs),
        groups=groups,
        speedup=speedups(groups, target),
        agreement=agreement(runs),
    )


def schedule_words(run: Run) -> str:
    """The run's evaluation schedule as the report states its resolution (bnexp/run/schedule.py)."""
    c = run.config
    t = TrainConfig(steps=int(c["train.steps"]), eval_every=int(c.get("train.eval_every", 1)),
                    eval_schedule=c.get("train.eval_schedule", "linear"), test_every=int(c.get("train.test_every", 0)))
    return resolution(t)


def _norm_key(norm: str):
    return norm_order(norm)


def group_runs(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    """Runs by (norm, lr), norms in registry order (bnexp/nn/registry.py) then by name, lrs ascending, seeds ascending in each."""
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.norm, run.lr), []).append(run)
    order = sorted(groups, key=lambda k: (_norm_key(k[0]), k[1]))
    return {k: sorted(groups[k], key=lambda r: str(r.seed)) for k in order}


def _counts(runs: list[Run], without_summary) -> Counts:
    by_status = {s: sum(r.status == s for r in runs) for s in STATUSES}
    return Counts(runs=len(runs), **by_status, without_summary=[str(p) for p in without_summary])


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of a list; None where undefined (no values / one value)."""
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def steps_stats(runs: list[Run], target: float) -> StepStats:
    """Steps to `target` over seeds: mean/std of those that reached it, k/n, and the censored mean."""
    steps = [r.steps_to(target) for r in runs]
    reached = [s for s in steps if s is not None]
    censored = [s if s is not None else r.censor_step() for r, s in zip(runs, steps)]
    mean, std = mean_std(reached)
    first = sum(1 for r, s in zip(runs, steps) if s is not None and s == r.first_eval)
    return StepStats(n=len(runs), reached=len(reached), mean=mean, std=std,
                     censored_mean=float(np.mean(censored)), steps=steps, spent=censored, at_first_eval=first)


def acc_stats(values) -> AccStats:
    """Mean +- std over the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    mean, std = mean_std(finite)
    return AccStats(mean=mean, std=std, n=len(finite))


def group_stats(norm: str, lr: float, runs: list[Run], thresholds) -> Group:
    """One (norm, lr): its status counts, steps to each validation threshold, final test and validation accuracy."""
    return Group(
        norm=norm, lr=lr, seeds=[r.seed for r in runs], runs=len(runs),
        diverged=sum(r.status == "diverged" for r in runs),
        interrupted=sum(r.status == "interrupted" for r in runs),
        steps_to={t: steps_stats(runs, t) for t in thresholds},
        final_test_acc=acc_stats([r.final_test_acc for r in runs]),
        final_val_acc=acc_stats([r.final_val_acc for r in runs]),
        mean_val_err=acc_stats([r.mean_val_err for r in runs]),
        members=list(runs),
    )


def speedup_ratio(base: StepStats, variant: StepStats) -> tuple[float | None, str]:
    """(speed-up, kind): ERT(base) / ERT(variant) '=' when both reached the target at least once;
    else the ratio of censored mean steps, a lower bound '>' (the base never reached it: its true
    steps are above its censor steps) or an upper bound '<' (the variant never did); 'n/a' if neither did."""
    if base.reached and variant.reached:
        return base.ert / variant.ert, "="
    if not (base.reached or variant.reached) or variant.censored_mean == 0:
        return None, "n/a"
    return base.censored_mean / variant.censored_mean, (">" if variant.reached else "<")


def _sides(base: Group, variant: Group, value) -> tuple[np.ndarray, np.ndarray, bool]:
    """value(run) for each side's runs, paired by seed when both ran the same seeds."""
    b, v, paired = pair_by_seed(base.members, variant.members)
    return np.array([value(r) for r in b], dtype=np.float64), np.array([value(r) for r in v], dtype=np.float64), paired


def compare(base: Group, variant: Group, target: float, edge: bool = False) -> Speedup:
    """`variant` against `base` (none) at `target`: the speed-up, its interval, P(beats), the test accuracy difference."""
    ratio, kind = speedup_ratio(base.steps_to[target], variant.steps_to[target])
    b, v, paired = pair_by_seed(list(zip(base.members, base.steps_to[target].outcomes)),
                                list(zip(variant.members, variant.steps_to[target].outcomes)), key=lambda x: x[0].seed)
    ob, ov = np.array([o for _, o in b]), np.array([o for _, o in v])
    ci = bootstrap(speedup_statistic, ob, ov, paired) if ratio is not None else None
    p = bootstrap(p_beats_statistic, ov, ob, paired=False)
    ab, av = np.array([r.final_test_acc for r, _ in b]), np.array([r.final_test_acc for r, _ in v])
    keep = np.isfinite(ab) & np.isfinite(av) if paired else None
    acc = (bootstrap(mean_difference, av[keep], ab[keep], True) if paired
           else bootstrap(mean_difference, av[np.isfinite(av)], ab[np.isfinite(ab)], False))
    early_v, early_b = variant.steps_to[target].at_first_eval, base.steps_to[target].at_first_eval
    resolution = "" if bool(early_v) == bool(early_b) else (">=" if early_v else "<=")
    return Speedup(variant.norm, variant.lr, ratio, kind, ci=ci, p_beats=p, acc_diff=acc, paired=paired,
                   base_lr=base.lr, edge=edge, resolution=resolution)


def at_grid_edge(groups: list[Group], norm: str, lr: float) -> bool:
    """Whether `lr` is the smallest or largest of the rates `norm` ran (with at least two of them)."""
    lrs = sorted({g.lr for g in groups if g.norm == norm})
    return len(lrs) > 1 and lr in (lrs[0], lrs[-1])


def best_group(groups: list[Group], norm: str, target: float) -> Group | None:
    """The norm's best lr, chosen on validation only: most seeds reaching the validation target, then
    fewest (censored) mean steps, then highest mean final validation accuracy (none counts lowest),
    then lowest lr. The test accuracy never enters."""
    mine = [g for g in groups if g.norm == norm]
    if not mine:
        return None

    def rank(g: Group):
        s, val = g.steps_to[target], g.final_val_acc.mean
        return (-s.reached / s.n, s.censored_mean, math.inf if val is None else -val, g.lr)

    return min(mine, key=rank)


def speedups(groups: list[Group], target: float) -> Speedups:
    """Every non-`none` norm against none at each shared lr, and at each norm's own best lr against none's best."""
    base = {g.lr: g for g in groups if g.norm == "none"}
    by_lr = [compare(base[g.lr], g, target) for g in groups if g.norm != "none" and g.lr in base]
    none_best = best_group(groups, "none", target)
    best = []
    for norm in dict.fromkeys(g.norm for g in groups if g.norm != "none"):
        g = best_group(groups, norm, target)
        edge = at_grid_edge(groups, norm, g.lr)
        best.append(Speedup(norm, g.lr, None, "n/a", edge=edge) if none_best is None
                    else compare(none_best, g, target, edge=edge))
    return Speedups(none_best_lr=None if none_best is None else none_best.lr, by_lr=by_lr, best=best,
                    none_best_edge=none_best is not None and at_grid_edge(groups, "none", none_best.lr))


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


def _pair_numbers(c: Run, n: Run) -> dict:
    """One (lr, seed) pair: |diff| of final test acc, max |diff| of the first losses, |diff| at step 1."""
    d = _loss_diffs(c, n)
    acc = abs(c.final_test_acc - n.final_test_acc)
    return {"acc": acc if math.isfinite(acc) else None,
            "loss": None if d is None else float(d.max()),
            "step1": None if d is None else float(d[0])}


def _max_with_pair(items):
    items = [(v, k) for k, v in items if v is not None]
    return max(items, key=lambda x: x[0]) if items else (None, None)


def _max_of(numbers: list[dict], key: str) -> float | None:
    values = [x[key] for x in numbers if x[key] is not None]
    return max(values) if values else None


def agreement(runs: list[Run]) -> Agreement:
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
        by_lr.append(LrAgreement(lr=lr, pairs=len(at), max_acc_diff=_max_of(at, "acc"),
                                 max_loss_diff=_max_of(at, "loss"), max_step1_diff=_max_of(at, "step1")))
    return Agreement(pairs=len(pairs), acc_pairs=sum(v["acc"] is not None for v in numbers.values()),
                     max_acc_diff=acc_max, max_acc_pair=acc_pair,
                     loss_pairs=sum(v["loss"] is not None for v in numbers.values()),
                     max_loss_diff=loss_max, max_loss_pair=loss_pair, max_step1_diff=step1_max,
                     by_lr=by_lr, matches=matches)


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
