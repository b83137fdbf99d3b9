"""Bootstrap intervals, the exact McNemar test and per-group accuracy, against hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from finemed_cli.eval.stats import (
    Interval,
    accuracy_ci,
    group_accuracy,
    mcnemar_exact,
    paired_difference_ci,
    paired_outcomes,
)


def _pairs(a_only: int, b_only: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """Correctness lists of two models with the given 2×2 table."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


# --- McNemar ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (1, 6, 2 * (1 + 7) / 128),  # P(X<=1), X~Bin(7, 1/2) = (C(7,0)+C(7,1))/2^7
        (6, 1, 0.125),  # symmetric
        (0, 5, 2 / 32),  # P(X<=0), X~Bin(5, 1/2) = 1/32
        (3, 3, 1.0),  # 2 * 42/64 > 1, capped
        (0, 0, 1.0),  # no discordant pairs
        (0, 1, 1.0),  # 2 * 1/2
    ],
)
def test_mcnemar_hand_computed(a_only: int, b_only: int, expected: float) -> None:
    a, b = _pairs(a_only, b_only, both=4, neither=2)
    result = mcnemar_exact(a, b, n_boot=200)
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert (result.a_only, result.b_only, result.both, result.neither) == (a_only, b_only, 4, 2)


def test_mcnemar_table_and_difference() -> None:
    a, b = _pairs(a_only=1, b_only=6, both=10, neither=3)  # 20 items: acc(a) = 11/20, acc(b) = 16/20
    result = mcnemar_exact(a, b, n_boot=2000)
    assert result.difference == pytest.approx(11 / 20 - 16 / 20)
    ci = result.difference_ci
    assert ci.n == 20 and ci.estimate == result.difference
    assert -1.0 <= ci.low <= ci.estimate <= ci.high <= 1.0


@pytest.mark.parametrize(("k", "m"), [(0, 1), (1, 6), (2, 9), (5, 10), (7, 40), (30, 101), (120, 300)])
def test_mcnemar_agrees_with_scipy_binomtest(k: int, m: int) -> None:
    a, b = _pairs(a_only=k, b_only=m - k)
    expected = binomtest(min(k, m - k), m, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(a, b, n_boot=10).p_value == pytest.approx(expected, rel=1e-9)


def test_mcnemar_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match=r"a has 3 items but b has 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"a has 1 items but b has 4"):
        paired_difference_ci([True], [True, False, True, True])


def test_paired_difference_of_identical_models_is_zero() -> None:
    a = [True, False, True, True, False]
    assert paired_difference_ci(a, a, n_boot=500) == Interval(0.0, 0.0, 0.0, 5)


def test_paired_outcomes_lists_ids_in_order() -> None:
    ids = ["q1", "q2", "q3", "q4", "q5"]
    a = [True, False, True, False, True]
    b = [True, True, False, False, False]
    assert paired_outcomes(ids, a, b) == {"only_a": ["q3", "q5"], "only_b": ["q2"]}
    with pytest.raises(ValueError, match=r"ids has 2 items but a and b have 5"):
        paired_outcomes(ids[:2], a, b)


# --- bootstrap -------------------------------------------------------------------------------------------


def test_all_correct_and_all_wrong_are_degenerate() -> None:
    assert accuracy_ci([True] * 50) == Interval(1.0, 1.0, 1.0, 50)
    assert accuracy_ci([False] * 50) == Interval(0.0, 0.0, 0.0, 50)


def test_empty_input_is_nan() -> None:
    ci = accuracy_ci([])
    assert ci.n == 0 and math.isnan(ci.estimate) and math.isnan(ci.low) and math.isnan(ci.high)


def test_two_items_cover_the_whole_range() -> None:
    # Resampled means of [1, 0] are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # percentiles of many resamples are exactly 0 and 1.
    assert accuracy_ci([True, False], n_boot=4000) == Interval(0.5, 0.0, 1.0, 2)


def test_interval_contains_estimate_within_unit_range() -> None:
    correct = [True] * 7 + [False] * 3
    ci = accuracy_ci(correct)
    assert ci.estimate == 0.7 and ci.n == 10
    assert 0.0 <= ci.low < 0.7 < ci.high <= 1.0


def test_same_seed_same_interval() -> None:
    correct = np.random.default_rng(1).random(300) < 0.6
    assert accuracy_ci(correct, seed=3) == accuracy_ci(correct, seed=3)
    # Percentiles of 10,000 resamples sit on the 1/300 lattice and often coincide across seeds; with few
    # resamples the seed shows.
    assert accuracy_ci(correct, n_boot=50, seed=3) != accuracy_ci(correct, n_boot=50, seed=4)


def test_width_shrinks_as_n_grows() -> None:
    widths = []
    for n in (25, 100, 400, 1600):
        ci = accuracy_ci([i % 2 == 0 for i in range(n)])  # accuracy exactly 1/2
        widths.append(ci.high - ci.low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # width ~ 1/sqrt(n): 64x the items, ~8x narrower


def test_matches_normal_approximation() -> None:
    ci = accuracy_ci([i % 2 == 0 for i in range(400)])
    half = 1.96 * math.sqrt(0.25 / 400)  # 0.049
    assert ci.estimate == 0.5
    assert ci.low == pytest.approx(0.5 - half, abs=0.01)
    assert ci.high == pytest.approx(0.5 + half, abs=0.01)


def test_level_and_n_boot_are_validated() -> None:
    with pytest.raises(ValueError, match="level"):
        accuracy_ci([True, False], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        accuracy_ci([True, False], n_boot=0)


def test_narrower_level_gives_narrower_interval() -> None:
    correct = [i % 3 != 0 for i in range(200)]
    wide, narrow = accuracy_ci(correct, level=0.95), accuracy_ci(correct, level=0.5)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_thousand_items_ten_thousand_resamples_is_fast() -> None:
    correct = np.random.default_rng(0).random(1000) < 0.7
    start = time.perf_counter()
    accuracy_ci(correct, n_boot=10000)
    assert time.perf_counter() - start < 2.0


# --- groups ----------------------------------------------------------------------------------------------


def test_group_accuracy_sorted_with_unknown() -> None:
    correct = [True, False, True, True, False, True]
    groups = ["surgery", None, "cardiology", "surgery", "cardiology", None]
    result = group_accuracy(correct, groups, n_boot=500, seed=1)
    assert list(result) == ["cardiology", "surgery", "unknown"]
    assert {k: (v.estimate, v.n) for k, v in result.items()} == {
        "cardiology": (0.5, 2),
        "surgery": (1.0, 2),
        "unknown": (0.5, 2),
    }
    assert result["surgery"] == Interval(1.0, 1.0, 1.0, 2)


def test_group_accuracy_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match=r"correct has 2 items but groups has 1"):
        group_accuracy([True, False], ["x"])
