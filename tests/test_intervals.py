"""The report's uncertainty (bnexp/report/intervals.py): ERT, P(beats), bootstrap intervals, verdicts."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from bnexp.report import intervals as iv


def test_outcomes_and_ert_count_misses_as_steps_spent():
    o = iv.outcomes([300, None, 500], [300, 4000, 500])
    assert o.tolist() == [300, -4001, 500]
    assert float(iv.ert(o)) == (300 + 4000 + 500) / 2
    assert float(iv.ert(iv.outcomes([None, None], [4000, 1200]))) == math.inf
    assert float(iv.ert(iv.outcomes([0, 100], [0, 100]))) == 50  # a hit at step 0 is a hit


def test_p_beats_is_the_share_of_pairs_won_with_ties_half_and_misses_slowest():
    variant = iv.outcomes([100, 200, None], [100, 200, 1000])
    base = iv.outcomes([200, 300], [200, 300])
    # 100 beats both; 200 ties 200 and beats 300; the miss loses both
    assert float(iv.p_beats_statistic(variant, base)) == pytest.approx((2 + 1.5 + 0) / 6)
    misses = iv.outcomes([None, None], [1000, 1000])
    assert float(iv.p_beats_statistic(misses, misses)) == 0.5


def test_speedup_interval_is_paired_by_seed_and_contains_the_estimate():
    base = iv.outcomes([400, 500, 600, 450, 550], [0] * 5)
    variant = iv.outcomes([200, 260, 290, 230, 270], [0] * 5)
    ci = iv.bootstrap(iv.speedup_statistic, base, variant, paired=True)
    assert ci.estimate == pytest.approx(2500 / 1250) and ci.paired and ci.n == 5
    assert 1.9 < ci.low <= ci.estimate <= ci.high < 2.1  # every seed's own ratio is 1.9-2.1
    assert iv.verdict_ratio(ci) == "faster"
    assert iv.bootstrap(iv.speedup_statistic, base, variant, paired=True) == ci  # reproducible


def test_pairing_removes_what_the_seed_alone_decides():
    """Two sides that differ by a constant per seed, with a large spread between seeds: paired, the
    difference is certain; unpaired, the spread hides it."""
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.05, 10)
    base, variant = 0.9 + seed_effect, 0.905 + seed_effect
    paired = iv.bootstrap(iv.mean_difference, variant, base, paired=True)
    unpaired = iv.bootstrap(iv.mean_difference, variant, base, paired=False)
    assert paired.low == pytest.approx(0.005) and paired.high == pytest.approx(0.005)
    assert unpaired.low < 0 < unpaired.high
    assert iv.verdict_difference(paired) == "higher" and iv.verdict_difference(unpaired) == "no clear difference"


def test_the_interval_of_a_mean_difference_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 400)
    ci = iv.bootstrap(iv.mean_difference, a, b, paired=False)
    half = 1.96 * math.sqrt(2 / 400)  # two independent samples of sd 1
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    assert ci.includes(1.0) and not ci.includes(0.0)


def test_an_interval_is_open_ended_where_resamples_lose_every_hit():
    base = iv.outcomes([None, None, None, 3000, None], [4000] * 5)
    variant = iv.outcomes([300, 280, 350, 320, 260], [0] * 5)
    ci = iv.bootstrap(iv.speedup_statistic, base, variant, paired=True)
    assert ci.high == math.inf and 1 < ci.low < ci.estimate
    assert iv.fmt_interval(ci, ".2f", "x").endswith(", inf]")


def test_too_few_runs_give_no_interval():
    assert iv.bootstrap(iv.mean_difference, np.array([1.0]), np.array([1.0, 2.0]), paired=False) is None
    assert iv.verdict_ratio(None) == "too few runs to tell"
    assert iv.fmt_interval(None, ".2f") == "n/a"


def test_pair_by_seed_pairs_only_the_same_seeds():
    runs = lambda seeds: [SimpleNamespace(seed=s) for s in seeds]
    b, v, paired = iv.pair_by_seed(runs([2, 0, 1]), runs([1, 2, 0]))
    assert paired and [r.seed for r in b] == [r.seed for r in v] == [0, 1, 2]
    assert iv.pair_by_seed(runs([0, 1]), runs([0, 2]))[2] is False
    assert iv.pair_by_seed(runs([0, 0]), runs([0, 0]))[2] is False  # a seed twice: no pairing
