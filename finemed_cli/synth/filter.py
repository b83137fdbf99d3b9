"""`synth filter`: the reference's selection over scored questions, then the tiers.

1. A case-specific question (it relies on a case or text the reader cannot see) is rejected; of a text's
   two questions the other one is then kept, and a text whose questions are both case-specific gives none.
2. Below `min_quality` or `min_relevance`: rejected (finemed's option; off at the defaults of 1, as in the
   reference, which has no minimum).
3. Of the questions made from the same text (`source_id`), one is kept: the highest summed score (quality +
   complexity + relevance), then the highest quality + complexity, then the highest quality, and when all
   three tie, a draw seeded by `seed` and the text's id (the same choice on every run, resume or subset).
4. Tiers: complexity above `complex_above` (8, the reference's) is `complex` — answered at length in o1 style
   by the reasoner — and the rest `common`, answered by the instruction model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from finemed_cli.synth.stage import Reject

SCORE_KEYS = ("quality", "complexity", "relevance", "case_specific")
RANGES = {"quality": 10, "complexity": 10, "relevance": 6}
TIE_BREAKS = ("summed score", "quality + complexity", "quality")


@dataclass(frozen=True)
class FilterRules:
    complex_above: int = 8
    min_quality: int = 1
    min_relevance: int = 1
    reject_case_specific: bool = True
    seed: int = 0


def _alone(r: dict[str, Any], rules: FilterRules) -> str | None:
    """Why a record is rejected on its own, or None."""
    missing = [k for k in SCORE_KEYS if k not in r]
    if missing:
        return f"not scored ({', '.join(missing)} missing); run `finemed synth score` first"
    if bad := _bad_scores(r):
        return f"{bad}; score it again with `finemed synth score`"
    if rules.reject_case_specific and r["case_specific"]:
        return "case-specific: refers to a case or text the question does not include"
    if r["quality"] < rules.min_quality:
        return f"quality {r['quality']} < {rules.min_quality}"
    if r["relevance"] < rules.min_relevance:
        return f"relevance {r['relevance']} < {rules.min_relevance}"
    return None


def _keys(r: dict[str, Any]) -> tuple[int, int, int]:
    q, c = r["quality"], r["complexity"]
    return q + c + r["relevance"], q + c, q


def pick(candidates: list[dict[str, Any]], source: str, seed: int) -> tuple[dict[str, Any], str]:
    """The reference's choice among one text's questions and what decided it."""
    best = list(candidates)
    for level, name in enumerate(TIE_BREAKS):
        top = max(_keys(r)[level] for r in best)
        narrowed = [r for r in best if _keys(r)[level] == top]
        if len(narrowed) == 1:
            return narrowed[0], f"a higher {name}"
        best = narrowed
    ordered = sorted(best, key=lambda r: r["id"])  # the draw must not depend on the file's order
    return random.Random(f"{seed}:{source}").choice(ordered), f"a draw after equal scores (seed {seed})"


def decide(records: list[dict[str, Any]], rules: FilterRules) -> dict[str, str | None]:
    """Per id: None (kept) or the reason it is rejected."""
    out = {r["id"]: _alone(r, rules) for r in records}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if out[r["id"]] is None and r.get("source_id") is not None:
            groups.setdefault(r["source_id"], []).append(r)
    for source, group in groups.items():
        if len(group) > 1:
            winner, why = pick(group, source, rules.seed)
            for r in group:
                if r is not winner:
                    out[r["id"]] = f"a question from the same text was kept ({winner['id']}): {why}"
    return out


def _bad_scores(r: dict[str, Any]) -> str | None:
    """What is wrong with a record's scores (an edited or foreign file), or None."""
    for key, high in RANGES.items():
        value = r[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            return f"{key} is {value!r}, not an integer from 1 to {high}"
    if not isinstance(r["case_specific"], bool):
        return f"case_specific is {r['case_specific']!r}, not true or false"
    return None


def filterer(records: list[dict[str, Any]], rules: FilterRules) -> Any:
    decisions = decide(records, rules)

    def apply(rec: dict[str, Any]) -> dict[str, Any]:
        reason = decisions[rec["id"]]
        if reason:
            raise Reject(reason)
        return {**rec, "tier": "complex" if rec["complexity"] > rules.complex_above else "common"}

    return apply
