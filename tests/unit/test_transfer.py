"""What TTT carries into an answer (eval/transfer.py): the oracle neighbour, the relevance gate, the letter
leak, TTT's effect by similarity band, and the rule that a choice needs enough items."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.eval.records import LeakRate
from finemed_cli.eval.transfer import (
    MIN_ITEMS_TO_CHOOSE,
    by_band,
    gate_from_bands,
    leak,
    leak_rise,
    neighbour_letter,
    oracle_record,
)
from finemed_cli.eval.variants import parse_variants

Q = QuestionRecord.from_json({"id": "q1", "question": "First-line drug for type 2 diabetes?",
                              "options": {"A": "Insulin", "B": "Metformin", "C": "Sulfonylurea"}, "answer": "B"})


def test_the_oracle_record_is_the_gold_answer_under_another_id() -> None:
    rec = oracle_record(Q)
    assert rec is not None and rec.id != Q.id and rec.question == Q.question and rec.options == Q.options
    assert "(B)" in rec.answer and "Metformin" in rec.answer
    assert neighbour_letter(rec) == "B"  # what a leak would repeat: here the gold itself
    assert oracle_record(QuestionRecord.from_json({"id": "x", "question": "Why?"})) is None  # no gold: nothing
    corpus = CorpusRecord(id="c1", question="Q?", reasoning="R", answer="A")
    assert oracle_record(corpus).reasoning == "R" and oracle_record(corpus).id != "c1"


@pytest.mark.parametrize(("answer", "letter"), [
    ("C. Dental plaque", "C"), ("(B) Metformin", "B"), ("So the answer is (D).", "D"),
    ("Therefore the answer is C, dental plaque.", "C"), ("Metformin", None), ("A", None)])
def test_a_neighbour_without_options_names_its_letter_in_its_answer(answer, letter) -> None:
    # the vlievin CoTs keep their options inside the question text; their answers open with the letter
    assert neighbour_letter(CorpusRecord(id="c", question="Q?\nA. x\nB. y", reasoning="R", answer=answer)) == letter


def test_the_gate_skips_only_questions_whose_best_neighbour_is_too_far() -> None:
    gate = TTTConfig(min_sim=0.5)
    assert gate.gated([0.2, 0.4]) and gate.gated([])
    assert not gate.gated([0.2, 0.7])
    assert not TTTConfig().gated([0.0])  # no gate by default
    assert TTTConfig(min_sim=float("nan")).validate()  # NaN is refused, not a gate that never closes


def test_oracle_and_gate_as_eval_variants() -> None:
    oracle, gated = parse_variants("oracle-ttt(steps=4),ttt(min_sim=0.6)", None)
    assert oracle.oracle and not oracle.retrieves and oracle.ttt == "lora"
    assert gated.retrieves and gated.ttt_config(TTTConfig()).min_sim == 0.6
    assert gated.describe(TTTConfig())["min_sim"] == 0.6
    assert "min_sim" not in parse_variants("ttt", None)[0].describe(TTTConfig())  # old results still resume


def test_the_leak_counts_repeats_of_a_wrong_neighbour_letter_only() -> None:
    ids = ["a", "b", "c", "d"]
    gold = {"a": "A", "b": "B", "c": "C", "d": "D"}
    letters = {"a": "B", "b": "B", "c": "A", "d": None}  # b: the neighbour's letter is gold; d: none
    with_ttt = {"a": "B", "b": "B", "c": "A", "d": "A"}
    without = {"a": "A", "b": "B", "c": "C", "d": "A"}
    assert leak(with_ttt, letters, gold, ids) == LeakRate(items=2, repeats=2, rate=1.0)
    assert leak(without, letters, gold, ids).rate == 0.0
    rise = leak_rise(with_ttt, without, letters, gold, ids)
    assert rise.items == 2 and rise.rise == 1.0
    assert leak(with_ttt, {}, gold, ids) is None


def test_effect_by_band_and_the_gate_it_supports() -> None:
    # TTT hurts the four least similar items and helps the rest
    sim = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    with_ttt = [False, False, False, False, True, True, True, True, True]
    without = [True, True, True, True, False, False, True, True, True]
    bands = by_band(with_ttt, without, sim)
    assert [b.n for b in bands] == [3, 3, 3]
    assert bands[0].difference < 0 and bands[2].difference == 0
    assert bands[0].hurt == 3 and bands[1].helped == 2
    assert gate_from_bands(bands) == pytest.approx(0.4)  # TTT from the second band up
    assert gate_from_bands(by_band(without, with_ttt, sim)) is None  # helps the far, hurts the near: no gate
    assert by_band([True], [False], [0.5]) == []  # fewer items than bands: no bands


def test_a_choice_needs_enough_items_for_a_sign_test_to_exclude_zero() -> None:
    from scipy.stats import binomtest

    n = MIN_ITEMS_TO_CHOOSE
    assert binomtest(n, n, 0.5).pvalue < 0.05 <= binomtest(n - 1, n - 1, 0.5).pvalue


def test_eval_oracle_ttt_and_the_gate_record_what_they_did(tmp_path, tiny_model, hash_embedder) -> None:
    from finemed_cli.eval.benchmarks import BenchmarkItem
    from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_loglik
    from finemed_cli.retrieval.index import CorpusIndex, build_index
    from tests.conftest import EXAMPLES

    build_index(EXAMPLES / "corpus.jsonl", tmp_path / "idx", hash_embedder)
    index = CorpusIndex(tmp_path / "idx")
    q2 = dataclasses.replace(Q, id="q2", question="Best test for thyroid function?")
    items = [BenchmarkItem(q, "medqa", None) for q in (Q, q2)]
    variants = parse_variants("no-ttt,oracle-ttt(lr=1e-2),ttt(min_sim=1.0)", None)
    run = EvalRun(tmp_path / "rep", Models("cpu", "float32", loaded={None: tiny_model}), TTTConfig(k=1), 0, False,
                  index, hash_embedder)
    files = run_loglik(run, variants, items)
    read = {name: [orjson.loads(x) for x in path.read_bytes().splitlines()] for name, path in files.items()}
    plain = {r["id"]: r["scores"] for r in read["no-ttt"]}
    for r in read["oracle-ttt(lr=1e-2)"]:  # trained on its own gold: the scores moved, no neighbour retrieved
        assert r["neighbours"] == [f"oracle:{r['id']}"] and "neighbour_scores" not in r
        assert any(abs(r["scores"][k]["logprob"] - plain[r["id"]][k]["logprob"]) > 1e-4 for k in Q.options)
    for r in read["ttt(min_sim=1.0)"]:  # no neighbour is that similar: every item gated, scored as no-ttt
        assert r["gated"] == 1.0 and r["neighbour_scores"]
        assert all(abs(r["scores"][k]["logprob"] - plain[r["id"]][k]["logprob"]) < 1e-4 for k in Q.options)
