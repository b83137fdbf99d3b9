"""What TTT carries into an answer, measured three ways beside accuracy:

- **the oracle ceiling**: TTT on the item's own gold question and answer (under another id), so a setting
  shows how much it *can* transfer beside how much it *does* with real neighbours (`oracle-ttt` variants);
- **relevance gating**: TTT skipped for an item whose best neighbour is less similar than `min_sim`
  (`gated`), and TTT's effect reported by similarity band: does it help near and hurt far?
- **the letter leak**: how often the prediction is the neighbour's own gold letter, with TTT and without it;
  a rise means TTT learnt the neighbour's answer ("the answer is (C)") rather than its reasoning.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Sequence
from typing import Any

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.eval.records import Band, LeakRate, LeakRise, TransferReport, VariantTransfer
from finemed_cli.eval.stats import mcnemar_exact
from finemed_cli.generate.extract import extract_choice

ORACLE_PREFIX = "oracle:"  # the oracle record's id: never the item's own, so nothing can match it by id
BANDS = 3  # similarity bands (tertiles of the items' best-neighbour similarity)


def oracle_record(item: QuestionRecord | CorpusRecord) -> CorpusRecord | None:
    """The record TTT trains on in an oracle variant: a corpus record is itself (its reasoning and answer); a
    multiple-choice question with gold is its question, options and gold option as the answer; None without
    gold (the item is not scored, and has nothing to transfer)."""
    if isinstance(item, CorpusRecord):
        return dataclasses.replace(item, id=ORACLE_PREFIX + item.id)
    if item.answer is None or not item.options or item.answer not in item.options:
        return None
    text = item.options[item.answer]
    return CorpusRecord(id=ORACLE_PREFIX + item.id, question=item.question, options=dict(item.options),
                        reasoning=f"The correct option is ({item.answer}): {text}.",
                        answer=f"The answer is ({item.answer}) {text}.")


# An answer that opens with its option ("C. Dental plaque", "(C) ...") or says "the answer is (C)": corpora
# whose options live inside the question text (the vlievin CoTs) still name their letter this way.
_LEADING_LETTER = re.compile(r"\s*\(?([A-J])[.):]\s")
_STATED_LETTER = re.compile(r"\banswer is:?\s*\(?([A-J])\b", re.IGNORECASE)


def neighbour_letter(record: CorpusRecord) -> str | None:
    """The gold letter a multiple-choice neighbour's answer names (what TTT could learn to repeat), or None:
    read against its options when it has them, else from an answer that opens with or states a letter."""
    if record.options:
        return extract_choice(f"## Summarization\n{record.answer}", record.options)
    found = _LEADING_LETTER.match(record.answer) or _STATED_LETTER.search(record.answer)
    return found.group(1) if found else None


def leak(predictions: dict[str, str | None], letters: dict[str, str | None], gold: dict[str, str | None],
         ids: Sequence[str]) -> LeakRate | None:
    """How often a prediction is the neighbour's own letter, over the items whose neighbour names a letter
    other than the item's gold one (where repeating it is always wrong); None when no item has one."""
    pool = [i for i in ids if letters.get(i) is not None and letters[i] != gold.get(i)]
    if not pool:
        return None
    hits = sum(predictions.get(i) == letters[i] for i in pool)
    return LeakRate(len(pool), hits, hits / len(pool))


def leak_rise(a: dict[str, str | None], b: dict[str, str | None], letters: dict[str, str | None],
              gold: dict[str, str | None], ids: Sequence[str]) -> LeakRise | None:
    """Variant `a`'s leak rate minus `b`'s on the same items, with its paired 95% interval and exact McNemar
    p (a leak shows as a rise with TTT)."""
    pool = [i for i in ids if letters.get(i) is not None and letters[i] != gold.get(i)]
    if not pool:
        return None
    ra = [a.get(i) == letters[i] for i in pool]
    rb = [b.get(i) == letters[i] for i in pool]
    m = mcnemar_exact(ra, rb)
    return LeakRise(len(pool), m.difference, (m.difference_ci.low, m.difference_ci.high), m.p_value)


def by_band(a: Sequence[bool], b: Sequence[bool], similarity: Sequence[float | None],
            bands: int = BANDS) -> list[Band]:
    """Accuracy of `a` (with TTT) and `b` (without) per band of best-neighbour similarity: equal-count bands
    by rank, each with its range, size and the difference (positive: TTT helped)."""
    rows = sorted((s, x, y) for s, x, y in zip(similarity, a, b, strict=True) if s is not None)
    if len(rows) < bands:
        return []
    out = []
    for k in range(bands):
        part = rows[k * len(rows) // bands:(k + 1) * len(rows) // bands]
        acc_a = statistics.fmean(x for _, x, _ in part)
        acc_b = statistics.fmean(y for _, _, y in part)
        out.append(Band(k + 1, (part[0][0], part[-1][0]), len(part), acc_a, acc_b, acc_a - acc_b,
                        helped=sum(x and not y for _, x, y in part), hurt=sum(y and not x for _, x, y in part)))
    return out


# The fewest items on which an exact two-sided sign test (McNemar) can reach p < 0.05, even when every item
# moves the same way: 2 * 0.5**6 = 0.031 (5 items: 0.0625). A choice from fewer is noise.
MIN_ITEMS_TO_CHOOSE = 6


def transfer_report(outcomes: dict[str, dict[str, Any]], gold: dict[str, str | None],
                    baseline: str = "no-ttt") -> TransferReport | None:
    """For each variant beside `baseline` (outcomes by variant and id: `score.Outcome`): its effect by band of
    best-neighbour similarity, its letter-leak rise and how many items the gate skipped; None without a
    baseline or a variant with neighbours."""
    if baseline not in outcomes:
        return None
    base = outcomes[baseline]
    out = {}
    for name, mine in outcomes.items():
        ids = sorted(set(mine) & set(base))
        if name == baseline or not any(mine[i].relevance or mine[i].neighbour_letter for i in ids):
            continue
        letters = {i: mine[i].neighbour_letter for i in ids}
        out[name] = VariantTransfer(
            by_similarity=tuple(by_band([bool(mine[i].correct) for i in ids], [bool(base[i].correct) for i in ids],
                                        [max(mine[i].relevance) if mine[i].relevance else None for i in ids])),
            leak=leak_rise({i: mine[i].prediction for i in ids}, {i: base[i].prediction for i in ids},
                           letters, gold, ids),
            gated=sum(mine[i].gated for i in ids))
    return TransferReport(baseline, out) if out else None


def gate_from_bands(bands: Sequence[Band]) -> float | None:
    """The relevance gate a dev run's bands support: skip TTT below band k's lowest similarity when that gives
    the most items right (with TTT from band k up, without it below); None when no gate does better than TTT
    on every item. Ties keep the smaller gate. A choice on the dev items: checked on held-out ones."""
    if not bands:
        return None
    right = [sum(b.without * b.n for b in bands[:k]) + sum(b.with_ttt * b.n for b in bands[k:])
             for k in range(len(bands) + 1)]
    best = max(range(len(right)), key=lambda k: (round(right[k], 6), -k))
    if best == 0:
        return None
    if best == len(bands):  # TTT helps in no band: the gate is every item (TTT off), which the rule decides
        return None
    return float(bands[best].similarity[0])
