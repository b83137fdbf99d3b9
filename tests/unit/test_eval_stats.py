"""Wilson and paired bootstrap intervals, the exact McNemar test and per-group accuracy, against hand-computed
values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from finemed_cli.eval.stats import (
    accuracy_ci,
    group_accuracy,
    mcnemar_exact,
    newcombe_interval,
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
    result = mcnemar_exact(a, b)
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert (result.a_only, result.b_only, result.both, result.neither) == (a_only, b_only, 4, 2)


def test_mcnemar_table_and_difference() -> None:
    a, b = _pairs(a_only=1, b_only=6, both=10, neither=3)  # 20 items: acc(a) = 11/20, acc(b) = 16/20
    result = mcnemar_exact(a, b)
    assert result.difference == pytest.approx(11 / 20 - 16 / 20)
    ci = result.difference_ci
    assert ci.n == 20 and ci.estimate == result.difference
    assert -1.0 <= ci.low <= ci.estimate <= ci.high <= 1.0


@pytest.mark.parametrize(("k", "m"), [(0, 1), (1, 6), (2, 9), (5, 10), (7, 40), (30, 101), (120, 300)])
def test_mcnemar_agrees_with_scipy_binomtest(k: int, m: int) -> None:
    a, b = _pairs(a_only=k, b_only=m - k)
    expected = binomtest(min(k, m - k), m, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(a, b).p_value == pytest.approx(expected, rel=1e-9)


def test_mcnemar_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match=r"a has 3 items but b has 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"a has 1 items but b has 4"):
        paired_difference_ci([True], [True, False, True, True])


def test_paired_difference_of_identical_models_is_zero_with_a_width() -> None:
    a = [True, False, True, True, False]
    ci = paired_difference_ci(a, a)  # 5 items agreeing prove no equality: not [0, 0]
    assert ci.estimate == 0.0 and ci.n == 5 and ci.low < -0.1 and ci.high > 0.1


def test_paired_outcomes_lists_ids_in_order() -> None:
    ids = ["q1", "q2", "q3", "q4", "q5"]
    a = [True, False, True, False, True]
    b = [True, True, False, False, False]
    assert paired_outcomes(ids, a, b) == {"only_a": ["q3", "q5"], "only_b": ["q2"]}
    with pytest.raises(ValueError, match=r"ids has 2 items but a and b have 5"):
        paired_outcomes(ids[:2], a, b)


# --- Wilson intervals of accuracies --------------------------------------------------------------------


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval from its textbook formula (z for 95%)."""
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 5), (5, 5), (7, 10), (1, 3), (36, 100), (0, 1), (499, 1000)])
def test_accuracy_interval_is_wilson(k: int, n: int) -> None:
    ci = accuracy_ci([True] * k + [False] * (n - k))
    low, high = _wilson_by_hand(k, n)
    assert (ci.estimate, ci.n) == (k / n, n)
    assert ci.low == pytest.approx(low, abs=1e-12) and ci.high == pytest.approx(high, abs=1e-12)


def test_none_right_of_five_is_not_certain() -> None:
    # a percentile bootstrap of 0/5 gives [0, 0]; five questions cannot rule out 40% accuracy
    ci = accuracy_ci([False] * 5)
    assert ci.estimate == 0.0 and ci.low == 0.0 and ci.high > 0.4
    assert ci.high == pytest.approx(1.959963984540054**2 / (5 + 1.959963984540054**2))  # z²/(n+z²): 0.434
    full = accuracy_ci([True] * 50)
    assert full.high == 1.0 and 0.9 < full.low < 1.0


def test_empty_input_is_nan() -> None:
    ci = accuracy_ci([])
    assert ci.n == 0 and math.isnan(ci.estimate) and math.isnan(ci.low) and math.isnan(ci.high)


def test_width_shrinks_as_n_grows() -> None:
    widths = []
    for n in (25, 100, 400, 1600):
        ci = accuracy_ci([i % 2 == 0 for i in range(n)])  # accuracy about 1/2
        widths.append(ci.high - ci.low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # width ~ 1/sqrt(n): 64x the items, ~8x narrower


def test_matches_normal_approximation_at_large_n() -> None:
    ci = accuracy_ci([i % 2 == 0 for i in range(400)])
    half = 1.96 * math.sqrt(0.25 / 400)  # 0.049
    assert ci.estimate == 0.5
    assert ci.low == pytest.approx(0.5 - half, abs=0.002)
    assert ci.high == pytest.approx(0.5 + half, abs=0.002)


def test_level_is_validated() -> None:
    with pytest.raises(ValueError, match="level"):
        accuracy_ci([True, False], level=1.0)
    with pytest.raises(ValueError, match="level"):
        group_accuracy([True, False], ["a", "b"], level=0.0)


def test_narrower_level_gives_narrower_interval() -> None:
    correct = [i % 3 != 0 for i in range(200)]
    wide, narrow = accuracy_ci(correct, level=0.95), accuracy_ci(correct, level=0.5)
    assert wide.low < narrow.low < narrow.high < wide.high


# --- Newcombe's paired interval of a difference ---------------------------------------------------------


def test_paired_difference_is_newcombes_interval_of_the_2x2_table() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.6, rng.random(300) < 0.5
    table = (int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b)), int(np.sum(~a & ~b)))
    assert paired_difference_ci(a, b) == newcombe_interval(*table)
    ci = paired_difference_ci(a, b)
    assert ci.estimate == pytest.approx(a.mean() - b.mean()) and ci.low < ci.estimate < ci.high


def test_newcombe_interval_covers_the_true_difference_about_95_percent() -> None:
    # 2,000 draws of 40 paired items with a known difference of 0.1: coverage near the nominal 95%
    rng = np.random.default_rng(0)
    probs = [0.45, 0.25, 0.15, 0.15]  # both, a only, b only, neither: difference 0.25 - 0.15 = 0.1
    hits = 0
    for table in rng.multinomial(40, probs, size=2000):
        ci = newcombe_interval(*map(int, table))
        hits += ci.low <= 0.1 <= ci.high
    assert 0.93 <= hits / 2000 <= 0.98


def test_paired_difference_validates_level() -> None:
    with pytest.raises(ValueError, match="level"):
        paired_difference_ci([True, False], [False, True], level=1.0)


# --- groups ----------------------------------------------------------------------------------------------


def test_group_accuracy_sorted_with_unknown() -> None:
    correct = [True, False, True, True, False, True]
    groups = ["surgery", None, "cardiology", "surgery", "cardiology", None]
    result = group_accuracy(correct, groups)
    assert list(result) == ["cardiology", "surgery", "unknown"]
    assert {k: (v.estimate, v.n) for k, v in result.items()} == {
        "cardiology": (0.5, 2),
        "surgery": (1.0, 2),
        "unknown": (0.5, 2),
    }
    assert result["surgery"] == accuracy_ci([True, True])  # Wilson within each group


def test_group_accuracy_rejects_different_lengths() -> None:
    with pytest.raises(ValueError, match=r"correct has 2 items but groups has 1"):
        group_accuracy([True, False], ["x"])


@pytest.mark.parametrize(("table", "expected"), [
    # Newcombe (1998), Statistics in Medicine 17:2635, worked examples (both, a only, b only, neither)
    ((36, 12, 2, 0), (0.0569, 0.3404)),
    ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)),
    ((0, 30, 0, 0), (0.8395, 1.0)),
])
def test_newcombe_interval_reproduces_the_papers_examples(table, expected) -> None:
    ci = newcombe_interval(*table)
    both, a_only, b_only, neither = table
    assert ci.estimate == pytest.approx((a_only - b_only) / sum(table))
    assert (ci.low, ci.high) == pytest.approx(expected, abs=1e-4)


def test_no_discordant_pair_is_not_a_zero_width_interval() -> None:
    ci = newcombe_interval(9, 0, 0, 21)  # 30 items, the two agree on every one
    assert ci.estimate == 0 and ci.low < -0.05 and ci.high > 0.05
