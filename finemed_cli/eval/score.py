"""Scoring variants on the same items: accuracy with Wilson intervals per variant, per source and per
department, every pair of variants compared with the exact McNemar test (and Newcombe's paired interval of the
difference), how often a response's letter and option text disagree, and the retrieval scores of the
neighbours behind each answer.

A variant is a name and its per-item outcomes (`Outcome`): produced by `finemed answer` (answer files), by
option log-likelihood, or read back from files written earlier. Items are paired by id; an item some
variant lacks is left out of every variant (and counted), so each comparison is on the same items.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finemed_cli.data.jsonl import RecordError, read_records
from finemed_cli.eval.records import Accuracy, Comparison, RelevanceSummary, Scores, VariantScore
from finemed_cli.eval.stats import Interval, accuracy_ci, group_accuracy, mcnemar_exact, paired_outcomes
from finemed_cli.generate.extract import extract_choice, letter_text_disagreement


@dataclass(frozen=True)
class Outcome:
    """One variant's result on one item: its prediction (None: no answer could be extracted, or its letter and
    option text disagree) and whether it is right (unanswered counts as wrong)."""

    id: str
    prediction: str | None
    correct: bool | None  # None: the item has no gold answer (not scored)
    disagreement: dict[str, str] | None = None  # {"letter": "D", "text": "B"}: "the answer is D. <B's text>"
    relevance: tuple[float, ...] = ()  # retrieval scores of the neighbours the variant used for this item
    neighbour_letter: str | None = None  # the first neighbour's own gold letter (eval/transfer.py: the leak)
    gated: bool = False  # the relevance gate skipped TTT for this item


@dataclass
class Labels:
    """What the statistics group items by."""

    source: dict[str, str] = field(default_factory=dict)
    department: dict[str, str | None] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)  # options per item: a uniform guess is right 1/n


def relevance_of(obj: dict[str, Any]) -> tuple[float, ...]:
    """The retrieval scores of a record's neighbours: answer records keep [{id, score}], loglik and perplexity
    records `neighbour_scores`."""
    if isinstance(obj.get("neighbour_scores"), list):
        return tuple(float(x) for x in obj["neighbour_scores"])
    return tuple(float(n["score"]) for n in obj.get("neighbours") or () if isinstance(n, dict) and "score" in n)


def _answer_outcome(obj: dict[str, Any], questions: dict[str, Any] | None = None,
                    trust_letter: bool = False) -> Outcome:
    """An answer record (`finemed answer` output) → Outcome (`correct` None when it has no gold answer).

    With `questions` (id → `QuestionRecord`), the question decides: the prediction is extracted again from
    the response with the current extractor and its options, and scored against the question's answer.
    A response whose letter names one option and whose text another ("D. Naloxone" with B Naloxone) is
    unanswered, or, with `trust_letter`, scored by its letter.
    """
    if not isinstance(obj.get("id"), str):
        raise RecordError("missing field 'id' (is this a `finemed answer` output file?)")
    disagreement = obj.get("disagreement") if isinstance(obj.get("disagreement"), dict) else None
    if questions is not None:
        q = questions.get(obj["id"])
        if q is None or not q.options:
            return Outcome(obj["id"], obj.get("prediction"), None)  # not among the questions: left out
        if not isinstance(obj.get("response"), str):
            raise RecordError("missing field 'response'; score answer files written by `finemed answer`")
        prediction = extract_choice(obj["response"], q.options)
        found = letter_text_disagreement(obj["response"], q.options)
        disagreement = {"letter": found.letter, "text": found.text} if found else None
        gold = q.answer
    else:
        if "prediction" not in obj:
            raise RecordError("missing field 'prediction'; pass the question file (--questions) to extract it "
                              "from the response")
        prediction, gold = obj["prediction"], obj.get("answer")
    if disagreement is not None:
        prediction = disagreement["letter"] if trust_letter else None
    correct = None if gold is None else prediction is not None and prediction == gold
    gated = isinstance(obj.get("ttt"), dict) and "gated" in obj["ttt"]
    return Outcome(obj["id"], prediction, correct, disagreement, relevance_of(obj), gated=gated)


def load_answer_outcomes(path: str | Path, questions: dict[str, Any] | None = None,
                         trust_letter: bool = False) -> dict[str, Outcome]:
    """Outcomes of an answer file, scored against each record's `answer` (or, with `questions`, against
    the question file: see `_answer_outcome`); lines without a gold answer are skipped. Errors name
    path:line."""
    rows = read_records(path, lambda obj: _answer_outcome(obj, questions, trust_letter))
    return {o.id: o for o in rows if o.correct is not None}


def rescore(outcomes: dict[str, Outcome], gold: dict[str, str | None]) -> dict[str, Outcome]:
    """The outcomes of the items in `gold`, judged against its answers (a result file's own `correct` may
    predate a corrected answer key)."""
    return {i: dataclasses.replace(o, correct=o.prediction is not None and o.prediction == gold[i])
            for i, o in outcomes.items() if gold.get(i) is not None}


def is_answer_file(first_record: dict[str, Any]) -> bool:
    return isinstance(first_record, dict) and "response" in first_record and "id" in first_record


def source_of_id(item_id: str) -> str:
    """A source label from an id when no question file says better: `medqa-dev-12` → `medqa`,
    `mmlu_pro-7` → `mmlu_pro`."""
    from finemed_cli.config.eval import SOURCES
    from finemed_cli.eval.benchmarks import normalise_source

    head = item_id.split("-", 1)[0]
    source = normalise_source(head)
    return source if source in SOURCES else head.split("_", 1)[0] or "unknown"


def _accuracy(iv: Interval) -> Accuracy:
    return Accuracy(iv.estimate, (iv.low, iv.high), iv.n)


RELEVANCE_BINS = 20  # of the histogram report.json keeps (and relevance.png draws)


def relevance_summary(outcomes: list[Outcome]) -> RelevanceSummary | None:
    """Mean, median and range of the neighbours' retrieval scores (every neighbour of every item), and of each
    item's best one; None when the variant retrieved nothing."""
    every = [x for o in outcomes for x in o.relevance]
    if not every:
        return None
    best = [max(o.relevance) for o in outcomes if o.relevance]
    counts, edges = np.histogram(every, bins=RELEVANCE_BINS)
    return RelevanceSummary(len(every), len(best), statistics.fmean(every), statistics.median(every), min(every),
                            max(every), statistics.fmean(best), statistics.median(best),
                            tuple(float(e) for e in edges), tuple(int(c) for c in counts))


INTERVALS = {"accuracy": "Wilson score interval, 95% (scipy.stats.binomtest(...).proportion_ci)",
             "difference": "Newcombe's hybrid score interval for paired proportions (1998, method 10), 95%",
             "p_value": "exact McNemar test: two-sided binomial test of the discordant items at 1/2 (scipy)"}


def score(variants: dict[str, dict[str, Outcome]], labels: Labels | None = None,
          pairs: list[tuple[str, str]] | None = None) -> Scores:
    """Per-variant accuracy (overall, per source, per department) and McNemar tests on the items every
    variant has, for `pairs` of variants (default: every pair). Returns the `results`/`comparisons` part of
    report.json (`Scores.to_json()`)."""
    if not variants:
        raise ValueError("nothing to score: no variants")
    names = list(variants)
    common = set.intersection(*(set(v) for v in variants.values()))
    ids = sorted(common)
    missing = {n: len(set(v) - common) for n, v in variants.items() if set(v) - common}
    labels = labels or Labels()
    sources = [labels.source.get(i) or source_of_id(i) for i in ids]
    departments = [labels.department.get(i) for i in ids]
    results: dict[str, VariantScore] = {}
    correct: dict[str, list[bool]] = {}
    for name in names:
        outcomes = [variants[name][i] for i in ids]
        correct[name] = [bool(o.correct) for o in outcomes]
        overall = accuracy_ci(correct[name])
        results[name] = VariantScore(
            overall.estimate, (overall.low, overall.high), overall.n,
            unanswered=sum(o.prediction is None for o in outcomes),
            disagreements=sum(o.disagreement is not None for o in outcomes),
            by_source={k: _accuracy(v) for k, v in group_accuracy(correct[name], sources).items()},
            by_department={k: _accuracy(v) for k, v in group_accuracy(correct[name], departments).items()},
            relevance=relevance_summary(outcomes))
    comparisons = []
    for a, b in pairs if pairs is not None else itertools.combinations(names, 2):
        m = mcnemar_exact(correct[a], correct[b])
        outcomes = paired_outcomes(ids, correct[a], correct[b])
        comparisons.append(Comparison(
            a, b, m.difference, (m.difference_ci.low, m.difference_ci.high), m.p_value, m.a_only, m.b_only, m.both,
            m.neither, tuple(outcomes["only_a"]), tuple(outcomes["only_b"])))
    # a uniform guess over each item's options, when every item's count is known
    chance = statistics.fmean(1 / labels.options[i] for i in ids) if ids and all(
        labels.options.get(i) for i in ids) else None
    return Scores(len(ids), missing, chance, dict(INTERVALS), results,
                  tuple(comparisons))
