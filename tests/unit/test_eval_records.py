"""eval's typed result records (eval/records.py) write report.json byte for byte as the nested dicts they replaced
did: each `to_json()` is compared with the dict the old code built (reproduced here from the same statistics), and
a whole report.json with the one written from them."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from finemed_cli.eval.contamination import decontaminate
from finemed_cli.eval.perplexity import score_perplexity
from finemed_cli.eval.records import ContaminationReport, TransferReport
from finemed_cli.eval.report import write_report
from finemed_cli.eval.score import INTERVALS, RELEVANCE_BINS, Labels, Outcome, score, source_of_id
from finemed_cli.eval.stats import (
    accuracy_ci,
    group_accuracy,
    mcnemar_exact,
    paired_outcomes,
    ratio_intervals,
)
from finemed_cli.eval.transfer import BANDS, transfer_report
from finemed_cli.manifest import package_versions

IDS = [f"medqa-{i}" for i in range(9)] + [f"pubmedqa-{i}" for i in range(3)]


def _outcomes(pattern: str, letters: str = "", relevance: bool = True) -> dict[str, Outcome]:
    """'1' right, '0' wrong, '-' unanswered; each item with two neighbour scores and its neighbour's letter."""
    out = {}
    for n, (i, c) in enumerate(zip(IDS, pattern, strict=True)):
        rel = (round(0.9 - 0.05 * n, 3), 0.3) if relevance else ()
        out[i] = Outcome(i, None if c == "-" else ("A" if c == "1" else "B"), c == "1",
                         {"letter": "A", "text": "B"} if n == 4 and c == "-" else None, rel,
                         letters[n] if letters and letters[n] != "." else None, gated=n == 0 and relevance)
    return out


def _iv(iv: Any) -> dict[str, Any]:
    return {"accuracy": iv.estimate, "ci95": [iv.low, iv.high], "n": iv.n}


def _old_relevance(outcomes: list[Outcome]) -> dict[str, Any] | None:
    every = [x for o in outcomes for x in o.relevance]
    if not every:
        return None
    best = [max(o.relevance) for o in outcomes if o.relevance]
    counts, edges = np.histogram(every, bins=RELEVANCE_BINS)
    return {"neighbours": len(every), "items": len(best), "mean": statistics.fmean(every),
            "median": statistics.median(every), "min": min(every), "max": max(every),
            "top1_mean": statistics.fmean(best), "top1_median": statistics.median(best),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def _old_score(variants: dict[str, dict[str, Outcome]], labels: Labels) -> dict[str, Any]:
    """The dict `score` returned before the records (its code, on the same statistics)."""
    ids = sorted(set.intersection(*(set(v) for v in variants.values())))
    sources = [labels.source.get(i) or source_of_id(i) for i in ids]
    departments = [labels.department.get(i) for i in ids]
    results, correct = {}, {}
    for name, v in variants.items():
        outcomes = [v[i] for i in ids]
        correct[name] = [bool(o.correct) for o in outcomes]
        results[name] = {**_iv(accuracy_ci(correct[name])), "unanswered": sum(o.prediction is None for o in outcomes),
                         "disagreements": sum(o.disagreement is not None for o in outcomes),
                         "by_source": {k: _iv(x) for k, x in group_accuracy(correct[name], sources).items()},
                         "by_department": {k: _iv(x) for k, x in group_accuracy(correct[name], departments).items()}}
        if (relevance := _old_relevance(outcomes)) is not None:
            results[name]["relevance"] = relevance
    comparisons = []
    for a, b in itertools.combinations(variants, 2):
        m = mcnemar_exact(correct[a], correct[b])
        po = paired_outcomes(ids, correct[a], correct[b])
        comparisons.append({"a": a, "b": b, "difference": m.difference,
                            "ci95": [m.difference_ci.low, m.difference_ci.high], "p_value": m.p_value,
                            "a_only": m.a_only, "b_only": m.b_only, "both": m.both, "neither": m.neither,
                            "a_only_ids": po["only_a"], "b_only_ids": po["only_b"]})
    chance = statistics.fmean(1 / labels.options[i] for i in ids)
    return {"items": len(ids), "left_out": {}, "chance": chance,
            "intervals": dict(INTERVALS), "results": results, "comparisons": comparisons}


def _old_transfer(mine: dict[str, Outcome], base: dict[str, Outcome], gold: dict[str, str]) -> dict[str, Any]:
    ids = sorted(mine)
    rows = sorted((max(mine[i].relevance), bool(mine[i].correct), bool(base[i].correct)) for i in ids)
    bands = []
    for k in range(BANDS):
        part = rows[k * len(rows) // BANDS:(k + 1) * len(rows) // BANDS]
        wa, wo = statistics.fmean(x for _, x, _ in part), statistics.fmean(y for _, _, y in part)
        bands.append({"band": k + 1, "similarity": [part[0][0], part[-1][0]], "n": len(part), "with": wa,
                      "without": wo, "difference": wa - wo, "helped": sum(x and not y for _, x, y in part),
                      "hurt": sum(y and not x for _, x, y in part)})
    pool = [i for i in ids if mine[i].neighbour_letter is not None and mine[i].neighbour_letter != gold[i]]
    m = mcnemar_exact([mine[i].prediction == mine[i].neighbour_letter for i in pool],
                      [base[i].prediction == mine[i].neighbour_letter for i in pool])
    leak = {"items": len(pool), "rise": m.difference, "ci95": [m.difference_ci.low, m.difference_ci.high],
            "p_value": m.p_value}
    return {"baseline": "no-ttt", "variants": {"ttt": {"by_similarity": bands, "leak": leak,
                                                       "gated": sum(mine[i].gated for i in ids)}}}


def _variants() -> tuple[dict[str, dict[str, Outcome]], Labels]:
    variants = {"ttt": _outcomes("1101-1011010", "BBA.CAB.ABBC"),
                "no-ttt": _outcomes("10101-010011", relevance=False)}
    labels = Labels(department={i: "Cardiology" if i < "medqa-5" else None for i in IDS},
                    options={i: 4 if i.startswith("medqa") else 3 for i in IDS})
    return variants, labels


def test_scores_and_transfer_write_the_dicts_they_replaced() -> None:
    variants, labels = _variants()
    scores = score(variants, labels)
    old = _old_score(variants, labels)
    assert orjson.dumps(scores.to_json(), option=orjson.OPT_INDENT_2) == orjson.dumps(old, option=orjson.OPT_INDENT_2)
    assert scores.results["ttt"].relevance is not None and scores.results["no-ttt"].relevance is None
    assert scores.results["ttt"].disagreements == 1 and scores.comparisons[0].a_only_ids
    gold = {i: "A" for i in IDS}
    transfer = transfer_report(variants, gold)
    assert isinstance(transfer, TransferReport) and transfer.variants["ttt"].leak is not None
    assert transfer.variants["ttt"].gated == 1 and len(transfer.variants["ttt"].by_similarity) == BANDS
    assert orjson.dumps(transfer.to_json()) == orjson.dumps(_old_transfer(variants["ttt"], variants["no-ttt"], gold))


def test_perplexity_scores_write_the_dict_they_replaced(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    files = {}
    for name in ("ttt", "no-ttt", "icl"):
        rows = [{"id": f"r{i}", "nats": round(float(rng.uniform(5, 50)), 5), "tokens": int(rng.integers(3, 40))}
                for i in range(7)] + [{"id": "r9", "skipped": "no response token within --max-length 8"}]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = score_perplexity(files, seed=3, n_boot=200)
    read = {k: [json.loads(x) for x in p.read_text().splitlines()][:7] for k, p in files.items()}
    nats = {k: np.array([r["nats"] for r in v], dtype=float) / math.log(2) for k, v in read.items()}
    toks = {k: np.array([r["tokens"] for r in v], dtype=float) for k, v in read.items()}
    single, pairs = ratio_intervals(nats, toks, n_boot=200, seed=3)
    old = {"items": 7, "comparisons": [
        {"a": a, "b": b, "difference": iv.estimate, "n": 7, "ci95": [iv.low, iv.high],
         "a_lower": int(((nats[a] / toks[a]) < (nats[b] / toks[b])).sum())} for (a, b), iv in pairs.items()],
        "variants": {k: {"bits_per_token": iv.estimate, "n": 7, "ci95": [iv.low, iv.high]} for k, iv in single.items()}}
    assert len(got.comparisons) == 3 and got.variants["icl"].n == 7
    assert orjson.dumps(got.to_json()) == orjson.dumps(old)


def test_contamination_report_and_a_whole_report_json(tmp_path: Path) -> None:
    from finemed_cli.data.records import QuestionRecord
    from finemed_cli.eval.benchmarks import BenchmarkItem

    text = "which antidote reverses an overdose of the opioid heroin in the emergency department today"
    items = [BenchmarkItem(QuestionRecord(i, text if n % 2 else f"unrelated question number {n} about kidneys",
                                          {"A": "x", "B": "y"}, "A"), "medqa", None) for n, i in enumerate(IDS)]
    kept, info = decontaminate(items, [("ref-1", text)], 4, 0.5, drop=False)
    assert isinstance(info, ContaminationReport) and len(kept) == len(IDS) and info.flagged == 6
    flagged = [{"id": i, "overlap": 1.0, "matched": "ref-1"} for n, i in enumerate(IDS) if n % 2]
    assert orjson.dumps(info.to_json()) == orjson.dumps(
        {"n": 4, "threshold": 0.5, "references": 1, "flagged": 6, "dropped": False, "items": flagged})
    looked_at = set(IDS[:4])
    assert info.among(looked_at).to_json() == {**info.to_json(), "flagged": 2, "items": flagged[:2]}
    variants, labels = _variants()
    scores, transfer = score(variants, labels), transfer_report(variants, dict.fromkeys(IDS, "A"))
    config = {"mode": "loglik", "seed": 0, "title": "t"}
    path = write_report(tmp_path, config, scores, contamination=info, transfer=transfer)["json"]
    written = path.read_bytes()
    body = {"config": config, "versions": package_versions(), "date": json.loads(written)["date"],
            **_old_score(variants, labels), "contamination": info.to_json(),
            "transfer": _old_transfer(variants["ttt"], variants["no-ttt"], dict.fromkeys(IDS, "A"))}
    assert written == orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    assert list(json.loads(written)) == ["config", "versions", "date", "items", "left_out", "chance", "intervals",
                                         "results", "comparisons", "contamination", "transfer"]
