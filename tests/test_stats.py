"""harness.stats against scipy on synthetic data (unequal sample counts, missing problems)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness.stats import (
    bootstrap_ci,
    paired_difference,
    pass1_estimate,
    proportion_estimate,
    seed_std,
    verdicts_by_doc,
)


def _synthetic(seed: int, n_docs: int, lo: int = 1, hi: int = 12, skill: float = 0.4) -> dict[str, list[bool]]:
    rng = random.Random(seed)
    out = {}
    for d in range(n_docs):
        p = min(1.0, max(0.0, rng.gauss(skill, 0.3)))
        out[f"d{d}"] = [rng.random() < p for _ in range(rng.randint(lo, hi))]
    return out


def test_pass1_matches_scipy_with_unequal_counts():
    per_doc = _synthetic(0, 40)
    acc = np.array([np.mean(v) for v in per_doc.values()])
    est = pass1_estimate(per_doc)
    assert est.n == 40 and est.p_value is None
    assert est.mean == pytest.approx(acc.mean())
    assert est.se == pytest.approx(scipy_stats.sem(acc))
    low, high = scipy_stats.t.interval(0.95, len(acc) - 1, loc=acc.mean(), scale=scipy_stats.sem(acc))
    assert (est.ci_low, est.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_paired_difference_matches_scipy_on_shared_problems_only():
    a, b = _synthetic(1, 50, skill=0.6), _synthetic(2, 50, skill=0.4)
    del a["d3"], b["d7"]  # each side misses a problem: the pair uses the 48 shared ones
    shared = sorted(set(a) & set(b))
    acc_a = np.array([np.mean(a[d]) for d in shared])
    acc_b = np.array([np.mean(b[d]) for d in shared])
    est = paired_difference(a, b)
    ref = scipy_stats.ttest_rel(acc_a, acc_b)
    assert est.n == 48
    assert est.mean == pytest.approx((acc_a - acc_b).mean())
    assert est.p_value == pytest.approx(ref.pvalue)
    assert est.se == pytest.approx(scipy_stats.sem(acc_a - acc_b))
    low, high = scipy_stats.t.interval(0.95, 47, loc=est.mean, scale=est.se)
    assert (est.ci_low, est.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert est.significant == (ref.pvalue < 0.05)


def test_degenerate_differences():
    same = {"a": [True, False], "b": [True]}
    assert paired_difference(same, same).p_value == 1.0
    shifted = {"a": [True, True], "b": [True]}
    lower = {"a": [False, True], "b": [True, False]}  # every problem differs by exactly 0.5
    est = paired_difference(shifted, lower)
    assert (est.mean, est.se, est.p_value) == (0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="share no problem"):
        paired_difference({"x": [True]}, {"y": [True]})
    single = pass1_estimate({"only": [True, False]})
    assert single.n == 1 and single.mean == 0.5 and math.isnan(single.ci_low) and single.anecdotal


def test_bootstrap_brackets_the_mean_and_is_close_to_t():
    per_doc = _synthetic(3, 60)
    est = pass1_estimate(per_doc)
    low, high = bootstrap_ci(per_doc, resamples=4000)
    assert low < est.mean < high
    assert abs((high - low) - (est.ci_high - est.ci_low)) < 0.35 * (est.ci_high - est.ci_low)


def test_seed_std_is_the_population_std_and_rows_group_by_doc():
    assert seed_std([0.2, 0.4]) == pytest.approx(np.std([0.2, 0.4]))
    rows = [{"doc_id": 1, "correct": True}, {"doc_id": "1", "correct": False}, {"doc_id": 2, "correct": True}]
    assert verdicts_by_doc(rows) == {"1": [True, False], "2": [True]}


def test_proportion_estimate_is_wilson_with_a_sign_test():
    """21 of 24 prompts: Wilson 95% interval by its formula, exact binomial p against 1/2."""
    est = proportion_estimate(21, 24)
    z, n, share = 1.959963984540054, 24, 21 / 24
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert est.mean == share and est.n == 24
    assert est.ci_low == pytest.approx(centre - half) and est.ci_high == pytest.approx(centre + half)
    assert (round(est.ci_low, 3), round(est.ci_high, 3)) == (0.69, 0.957)
    # P(X >= 21) + P(X <= 3) for X ~ Binomial(24, 1/2), summed by hand
    tail = sum(math.comb(24, k) for k in range(21, 25)) / 2**24
    assert est.p_value == pytest.approx(2 * tail) and est.significant
    chance = proportion_estimate(12, 24)
    assert chance.p_value == pytest.approx(1.0) and chance.ci_low < 0.5 < chance.ci_high
    assert proportion_estimate(24, 24).ci_high == pytest.approx(1.0) and proportion_estimate(0, 0).n == 0
