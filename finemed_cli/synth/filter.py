"""`synth filter`: the paper's rule cascade over scored (and classified) questions.

1. A case-specific question (it refers to a patient or text the reader cannot see) is rejected.
2. Below the minimum quality or relevance: rejected.
3. Of the questions made from the same text (`source_id`), only the one with the highest summed score
   (quality + complexity + relevance) is kept; ties go to the earlier record.
4. The rest are tiered: complexity above `complex_above` is `complex` (answered in o1 style by the reasoner),
   otherwise `common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finemed_cli.synth.stage import Reject

SCORE_KEYS = ("quality", "complexity", "relevance", "case_specific")


@dataclass(frozen=True)
class FilterRules:
    complex_above: int = 8
    min_quality: int = 1
    min_relevance: int = 1
    reject_case_specific: bool = True


def decide(records: list[dict[str, Any]], rules: FilterRules) -> dict[str, str | None]:
    """Per id: None (kept) or the reason it is rejected."""
    out: dict[str, str | None] = {}
    best: dict[str, tuple[int, str]] = {}  # source_id -> (summed score, id)
    for r in records:
        missing = [k for k in SCORE_KEYS if k not in r]
        if missing:
            out[r["id"]] = f"not scored ({', '.join(missing)} missing); run `finemed synth score` first"
        elif bad := _bad_scores(r):
            out[r["id"]] = f"{bad}; score it again with `finemed synth score`"
        elif rules.reject_case_specific and r["case_specific"]:
            out[r["id"]] = "case-specific: refers to a case or text the question does not include"
        elif r["quality"] < rules.min_quality:
            out[r["id"]] = f"quality {r['quality']} < {rules.min_quality}"
        elif r["relevance"] < rules.min_relevance:
            out[r["id"]] = f"relevance {r['relevance']} < {rules.min_relevance}"
        else:
            out[r["id"]] = None
            source = r.get("source_id")
            if source is not None:
                total = r["quality"] + r["complexity"] + r["relevance"]
                if source not in best or total > best[source][0]:
                    best[source] = (total, r["id"])
    for r in records:
        source = r.get("source_id")
        if out[r["id"]] is None and source is not None and best[source][1] != r["id"]:
            out[r["id"]] = f"a question from the same text scored higher ({best[source][1]})"
    return out


def _bad_scores(r: dict[str, Any]) -> str | None:
    """What is wrong with a record's scores (an edited or foreign file), or None."""
    for key in ("quality", "complexity", "relevance"):
        value = r[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
            return f"{key} is {value!r}, not an integer from 1 to 10"
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
