"""Uncertainty for benchmark accuracies: Wilson score intervals for each accuracy, the exact McNemar test and
Newcombe's paired interval for two models on the same items, and per-group breakdowns. A few hundred questions
leave accuracies a few points wide, so every number a report compares should carry its interval.

Accuracies take the Wilson interval, not a percentile bootstrap: resampling 0 of 5 right gives [0, 0], as if
five questions proved the model never right, where Wilson gives [0, 43%]. The difference of two accuracies on
the same items takes Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10: the two
Wilson intervals combined with the pair's correlation), for the same reason: a paired bootstrap over 30 items
where the two never disagree gives [0, 0], as if 30 items proved them equal; Newcombe's stays a few points
wide."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval (Wilson for an accuracy, Newcombe's for a paired difference); all nan
    when there were no items (n == 0)."""

    estimate: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class McNemar:
    """Two models scored on the same items: the 2×2 table, the exact test and the accuracy difference."""

    b_only: int  # a wrong, b right
    a_only: int  # a right, b wrong
    both: int
    neither: int
    p_value: float  # exact two-sided binomial test on the discordant pairs
    difference: float  # accuracy(a) - accuracy(b)
    difference_ci: Interval  # Newcombe's (1998) paired interval of the difference, 95%


def _as_bool(values: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=bool)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of booleans, got shape {arr.shape}")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, a_name: str = "a", b_name: str = "b") -> None:
    if len(a) != len(b):
        raise ValueError(
            f"{a_name} has {len(a)} items but {b_name} has {len(b)}; score both on the same items"
        )


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _wilson(flags: np.ndarray, level: float) -> Interval:
    _check_level(level)
    n = len(flags)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    k = int(np.count_nonzero(flags))
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), n)


def accuracy_ci(correct: Sequence[bool], level: float = 0.95) -> Interval:
    """Accuracy with its Wilson score interval (scipy's `binomtest(...).proportion_ci(method="wilson")`).

    Args:
        correct: One flag per item, True where the answer was right.
        level: Coverage of the interval, e.g. 0.95.

    Returns:
        The accuracy and its interval; all nan with n == 0 for no items.
    """
    return _wilson(_as_bool(correct, "correct"), level)


def paired_difference_ci(a: Sequence[bool], b: Sequence[bool], level: float = 0.95) -> Interval:
    """accuracy(a) - accuracy(b) on the same items with Newcombe's paired interval (`newcombe_interval`).

    The pair's correlation narrows it (much narrower than two independent intervals would suggest when the
    models mostly agree), and it keeps a width where they never disagree.

    Raises:
        ValueError: If `a` and `b` differ in length.
    """
    x, y = _as_bool(a, "a"), _as_bool(b, "b")
    _check_same_length(x, y)
    return newcombe_interval(int(np.count_nonzero(x & y)), int(np.count_nonzero(x & ~y)),
                             int(np.count_nonzero(~x & y)), int(np.count_nonzero(~x & ~y)), level)


def newcombe_interval(both: int, a_only: int, b_only: int, neither: int, level: float = 0.95) -> Interval:
    """accuracy(a) - accuracy(b) = (a_only - b_only) / n with Newcombe's (1998) method-10 interval: each
    accuracy's Wilson interval, their distances from the estimates combined with phi, the correlation of the
    2x2 table (its numerator moved n/2 toward zero when positive, floored at 0; phi is 0 when a margin is
    empty). Reproduces the paper's worked examples (tests/unit/test_eval_stats.py)."""
    _check_level(level)
    n = both + a_only + b_only + neither
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    cross = both * neither - a_only * b_only
    phi = 0.0 if margins == 0 else (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    pa, pb = (both + a_only) / n, (both + b_only) / n
    wa = binomtest(both + a_only, n).proportion_ci(confidence_level=level, method="wilson")
    wb = binomtest(both + b_only, n).proportion_ci(confidence_level=level, method="wilson")
    da_low, da_high, db_low, db_high = pa - wa.low, wa.high - pa, pb - wb.low, wb.high - pb
    d = pa - pb
    low = d - math.sqrt(max(da_low ** 2 - 2 * phi * da_low * db_high + db_high ** 2, 0.0))
    high = d + math.sqrt(max(da_high ** 2 - 2 * phi * da_high * db_low + db_low ** 2, 0.0))
    return Interval(d, max(low, -1.0), min(high, 1.0), n)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact McNemar test of whether two models scored on the same items differ in accuracy.

    Only the discordant items carry information: under the null each is equally likely to favour either
    model, so p is scipy's exact two-sided binomial test of min(b_only, a_only) successes in b_only + a_only
    trials at 1/2 (= min(1, 2 P(X <= min))), and 1.0 when the models never disagree.

    Args:
        a: Correctness of model a, one flag per item.
        b: Correctness of model b on the same items, in the same order.

    Raises:
        ValueError: If `a` and `b` differ in length.
    """
    x, y = _as_bool(a, "a"), _as_bool(b, "b")
    _check_same_length(x, y)
    b_only = int(np.count_nonzero(~x & y))
    a_only = int(np.count_nonzero(x & ~y))
    discordant = b_only + a_only
    p_value = 1.0 if discordant == 0 else float(binomtest(min(b_only, a_only), discordant, 0.5).pvalue)
    ci = paired_difference_ci(x, y, level=0.95)
    return McNemar(
        b_only=b_only,
        a_only=a_only,
        both=int(np.count_nonzero(x & y)),
        neither=int(np.count_nonzero(~x & ~y)),
        p_value=p_value,
        difference=ci.estimate,
        difference_ci=ci,
    )


def paired_outcomes(ids: Sequence[str], a: Sequence[bool], b: Sequence[bool]) -> dict[str, list[str]]:
    """The items the two models disagree on, for reading the questions behind a McNemar count.

    Returns:
        {"only_a": ids a got right and b wrong, "only_b": ids b got right and a wrong}, in input order.

    Raises:
        ValueError: If `ids`, `a` and `b` differ in length.
    """
    x, y = _as_bool(a, "a"), _as_bool(b, "b")
    _check_same_length(x, y)
    if len(ids) != len(x):
        raise ValueError(f"ids has {len(ids)} items but a and b have {len(x)}; give one id per item")
    return {
        "only_a": [i for i, ra, rb in zip(ids, x, y, strict=True) if ra and not rb],
        "only_b": [i for i, ra, rb in zip(ids, x, y, strict=True) if rb and not ra],
    }


def group_accuracy(correct: Sequence[bool], groups: Sequence[str | None], *, level: float = 0.95) -> dict[str, Interval]:
    """Accuracy with its Wilson interval per group (e.g. department), sorted by label.

    Items without a label (None) are pooled under "unknown", so they stay visible rather than vanishing.

    Raises:
        ValueError: If `correct` and `groups` differ in length.
    """
    flags = _as_bool(correct, "correct")
    if len(groups) != len(flags):
        raise ValueError(
            f"correct has {len(flags)} items but groups has {len(groups)}; give one label per item"
        )
    members: dict[str, list[int]] = {}
    for i, label in enumerate(groups):
        members.setdefault("unknown" if label is None else label, []).append(i)
    return {label: _wilson(flags[members[label]], level) for label in sorted(members)}


def ratio_intervals(nums: dict[str, np.ndarray], dens: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Sum-ratio estimates (e.g. nats over tokens) per variant with percentile bootstrap intervals over items,
    and every pair's paired difference, all resampled with the same item draws (paired by construction).

    Returns ({name: Interval}, {(a, b): Interval of a - b}); the arrays are per item, in one item order.
    """
    names = list(nums)
    n = len(nums[names[0]]) if names else 0
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    if n == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"), 0)
        return {k: nan for k in names}, {(a, b): nan for i, a in enumerate(names) for b in names[i + 1:]}
    picks = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    est = {k: nums[k].sum() / dens[k].sum() for k in names}
    boot = {k: nums[k][picks].sum(1) / dens[k][picks].sum(1) for k in names}
    single = {k: Interval(float(est[k]), float(np.percentile(boot[k], lo)), float(np.percentile(boot[k], hi)), n)
              for k in names}
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = boot[a] - boot[b]
            pairs[(a, b)] = Interval(float(est[a] - est[b]), float(np.percentile(d, lo)), float(np.percentile(d, hi)), n)
    return single, pairs
