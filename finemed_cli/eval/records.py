"""The scores eval hands to its callers: typed records, one per result, instead of nested dicts (STYLE.md rule
12). `pipeline/` reads their attributes; report.json gets each one's `to_json()`, whose keys, their order and
values are the file's format: a record changes the Python side only, never a byte of the report.

- `score.score` → `Scores`: per variant a `VariantScore` (its `Accuracy`, per source and department, the
  neighbours' `RelevanceSummary`), each pair a `Comparison` (McNemar, Newcombe's paired interval).
- `perplexity.score_perplexity` → `PerplexityScores`: `BitsPerToken` per variant, `PerplexityComparison` per pair.
- `transfer.transfer_report` → `TransferReport`: per variant a `VariantTransfer` (`Band`s of similarity, the
  `LeakRise`, the gated count); `transfer.leak` → `LeakRate`.
- `contamination.decontaminate` → `ContaminationReport` of `FlaggedItem`s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% Wilson interval on `n` items (all nan with n == 0)."""

    accuracy: float
    ci95: tuple[float, float]
    n: int

    def to_json(self) -> Json:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n}


@dataclass(frozen=True)
class RelevanceSummary:
    """The retrieval scores of a variant's neighbours: every neighbour of every item, and each item's best one;
    `histogram` holds `edges` and `counts`."""

    neighbours: int
    items: int
    mean: float
    median: float
    min: float
    max: float
    top1_mean: float
    top1_median: float
    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def to_json(self) -> Json:
        return {"neighbours": self.neighbours, "items": self.items, "mean": self.mean, "median": self.median,
                "min": self.min, "max": self.max, "top1_mean": self.top1_mean, "top1_median": self.top1_median,
                "histogram": {"edges": list(self.edges), "counts": list(self.counts)}}


@dataclass(frozen=True)
class VariantScore:
    """One variant on the common items: its accuracy, how many it left unanswered and how many responses named
    one option by letter and another by text, per source and per department, and its neighbours' scores."""

    accuracy: float
    ci95: tuple[float, float]
    n: int
    unanswered: int
    disagreements: int
    by_source: dict[str, Accuracy]
    by_department: dict[str, Accuracy]
    relevance: RelevanceSummary | None = None  # None: the variant retrieved nothing

    def groups(self, key: str) -> dict[str, Accuracy]:
        """`by_source` or `by_department`, by that name."""
        return {"by_source": self.by_source, "by_department": self.by_department}[key]

    def to_json(self) -> Json:
        out = {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n, "unanswered": self.unanswered,
               "disagreements": self.disagreements,
               "by_source": {k: v.to_json() for k, v in self.by_source.items()},
               "by_department": {k: v.to_json() for k, v in self.by_department.items()}}
        if self.relevance is not None:
            out["relevance"] = self.relevance.to_json()
        return out


@dataclass(frozen=True)
class Comparison:
    """Variants `a` and `b` on the same items: accuracy(a) − accuracy(b) with Newcombe's paired interval,
    the exact McNemar p, the 2×2 table and the ids each alone got right."""

    a: str
    b: str
    difference: float
    ci95: tuple[float, float]
    p_value: float
    a_only: int
    b_only: int
    both: int
    neither: int
    a_only_ids: tuple[str, ...]
    b_only_ids: tuple[str, ...]

    def to_json(self) -> Json:
        return {"a": self.a, "b": self.b, "difference": self.difference, "ci95": list(self.ci95),
                "p_value": self.p_value, "a_only": self.a_only, "b_only": self.b_only, "both": self.both,
                "neither": self.neither, "a_only_ids": list(self.a_only_ids), "b_only_ids": list(self.b_only_ids)}


@dataclass(frozen=True)
class Scores:
    """Every variant scored on the items all of them have (`items`; `left_out`: per variant, the items only it
    had), the chance level (None unless every item's option count is known), how each interval is made, and the
    compared pairs: the `results`/`comparisons` part of report.json."""

    items: int
    left_out: dict[str, int]
    chance: float | None
    intervals: dict[str, Any]
    results: dict[str, VariantScore]
    comparisons: tuple[Comparison, ...]

    def to_json(self) -> Json:
        return {"items": self.items, "left_out": dict(self.left_out), "chance": self.chance,
                "intervals": dict(self.intervals), "results": {k: v.to_json() for k, v in self.results.items()},
                "comparisons": [c.to_json() for c in self.comparisons]}


@dataclass(frozen=True)
class BitsPerToken:
    """A variant's held-out bits per token (token-weighted over `n` records) with its bootstrap interval."""

    bits_per_token: float
    n: int
    ci95: tuple[float, float]

    def to_json(self) -> Json:
        return {"bits_per_token": self.bits_per_token, "n": self.n, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class PerplexityComparison:
    """bits(a) − bits(b) on the same `n` records with its paired interval, and on how many a was lower."""

    a: str
    b: str
    difference: float
    n: int
    ci95: tuple[float, float]
    a_lower: int

    def to_json(self) -> Json:
        return {"a": self.a, "b": self.b, "difference": self.difference, "n": self.n, "ci95": list(self.ci95),
                "a_lower": self.a_lower}


@dataclass(frozen=True)
class PerplexityScores:
    """`finemed eval --mode perplexity`'s scores on the records every variant has: report.json's `perplexity`."""

    items: int
    comparisons: tuple[PerplexityComparison, ...]
    variants: dict[str, BitsPerToken]

    def to_json(self) -> Json:
        return {"items": self.items, "comparisons": [c.to_json() for c in self.comparisons],
                "variants": {k: v.to_json() for k, v in self.variants.items()}}


@dataclass(frozen=True)
class Band:
    """One band of best-neighbour similarity (`similarity`: its lowest and highest): accuracy with TTT and
    without, their difference (positive: TTT helped), and the items TTT alone got right (`helped`) or wrong."""

    band: int
    similarity: tuple[float, float]
    n: int
    with_ttt: float  # report.json's "with"
    without: float
    difference: float
    helped: int
    hurt: int

    def to_json(self) -> Json:
        return {"band": self.band, "similarity": list(self.similarity), "n": self.n, "with": self.with_ttt,
                "without": self.without, "difference": self.difference, "helped": self.helped, "hurt": self.hurt}


@dataclass(frozen=True)
class LeakRate:
    """How often a prediction repeats its neighbour's own (wrong) gold letter, over `items` where it could."""

    items: int
    repeats: int
    rate: float

    def to_json(self) -> Json:
        return {"items": self.items, "repeats": self.repeats, "rate": self.rate}


@dataclass(frozen=True)
class LeakRise:
    """One variant's leak rate minus another's on the same `items`, with its paired 95% interval and McNemar p."""

    items: int
    rise: float
    ci95: tuple[float, float]
    p_value: float

    def to_json(self) -> Json:
        return {"items": self.items, "rise": self.rise, "ci95": list(self.ci95), "p_value": self.p_value}


@dataclass(frozen=True)
class VariantTransfer:
    """What one variant's neighbours carried against the baseline: its effect by similarity band, its letter-leak
    rise (None: no item's neighbour names a wrong letter) and how many items the relevance gate skipped."""

    by_similarity: tuple[Band, ...]
    leak: LeakRise | None
    gated: int

    def to_json(self) -> Json:
        return {"by_similarity": [b.to_json() for b in self.by_similarity],
                "leak": None if self.leak is None else self.leak.to_json(), "gated": self.gated}


@dataclass(frozen=True)
class TransferReport:
    """report.json's `transfer`: each variant with neighbours against `baseline`."""

    baseline: str
    variants: dict[str, VariantTransfer]

    def to_json(self) -> Json:
        return {"baseline": self.baseline, "variants": {k: v.to_json() for k, v in self.variants.items()}}


@dataclass(frozen=True)
class FlaggedItem:
    """A benchmark item whose n-grams overlap a reference text: the overlap (rounded to 3 places) and the
    reference's id."""

    id: str
    overlap: float
    matched: str | None  # None: nothing shared (a threshold of 0 flags every item)

    def to_json(self) -> Json:
        return {"id": self.id, "overlap": self.overlap, "matched": self.matched}


@dataclass(frozen=True)
class ContaminationReport:
    """The decontamination of a run's items against `references` texts (`n`-grams, flagged at `threshold`):
    the items flagged and whether they were dropped; report.json's `contamination`."""

    n: int
    threshold: float
    references: int
    dropped: bool
    items: tuple[FlaggedItem, ...]

    @property
    def flagged(self) -> int:
        return len(self.items)

    def among(self, ids: set[str]) -> ContaminationReport:
        """The report over the items in `ids` only (the ones a limited run looked at)."""
        return replace(self, items=tuple(c for c in self.items if c.id in ids))

    def to_json(self) -> Json:
        return {"n": self.n, "threshold": self.threshold, "references": self.references, "flagged": self.flagged,
                "dropped": self.dropped, "items": [c.to_json() for c in self.items]}
