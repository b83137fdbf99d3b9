"""`finemed synth` against the FineMed reference code, step by step, with scripted models: the department
taxonomy and two-step classification on the source text, relevance on 1-6, the tie-break order with its
seeded draw, the tiers (their model, budget and style; two candidates and a reward choice for the common
tier), the source text in every response prompt, and options kept on corpus records and shown with the
question wherever it is shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_cli.synth import prompts
from finemed_cli.synth.filter import FilterRules, decide
from finemed_cli.synth.judge import classifier
from finemed_cli.synth.llm import ScriptedModel, fit_text
from finemed_cli.synth.respond import responder
from finemed_cli.synth.stage import Reject, StageWalk, ToSide, run_stage
from finemed_cli.synth.taxonomy import DEPARTMENTS, INTERNAL_MEDICINE, subdepartments

TEXT = "Levothyroxine replaces thyroxine in primary hypothyroidism; the dose is adjusted until the TSH is normal."
OPTIONS = {"A": "Anti-TPO", "B": "TSH receptor", "C": "Anti-GAD"}


def test_the_taxonomy_is_the_reference_codes() -> None:
    assert list(DEPARTMENTS) == ["Internal Medicine", "Surgery", "Obstetrics and Gynecology", "Pediatrics",
                                 "Otorhinolaryngology (ENT)", "Other Departments"]
    assert list(subdepartments(INTERNAL_MEDICINE)) == [
        "Respiratory and Critical Care Medicine", "Cardiology", "Endocrinology", "Gastroenterology", "Hematology",
        "Nephrology", "Rheumatology and Immunology", "Neurology"]
    assert len(subdepartments("Surgery")) == 10
    assert {"Ophthalmology", "Dentistry (Oral Medicine)"} < set(subdepartments("Otorhinolaryngology (ENT)"))
    assert all(what for what, subs in DEPARTMENTS.values()) and all(
        d for _, subs in DEPARTMENTS.values() for d in subs.values())  # every choice is described


def test_classification_takes_two_steps_on_the_source_text() -> None:
    model = ScriptedModel(['{"department": "Internal Medicine"}', '{"subdepartment": "Endocrinology"}'])
    rec = classifier(model)({"id": "x", "question": "How is the dose adjusted?", "text": TEXT})
    assert (rec["department"], rec["subdepartment"]) == ("Internal Medicine", "Endocrinology")
    assert rec["classifier"]["steps"] == ["Internal Medicine", "Endocrinology"] and rec["classifier"]["on"] == "text"
    first, second = (call[-1]["content"] for call in model.calls)
    assert TEXT in first and TEXT in second and "How is the dose adjusted?" not in first
    assert "Surgery: conditions treated by operation" in first  # each department with its description
    assert "- Endocrinology: hormones" in second and "- Urology" not in second and '"None"' in second


def test_the_second_step_offers_only_the_departments_own_and_none() -> None:
    schema = prompts.subdepartment_schema("Obstetrics and Gynecology")
    assert schema["properties"]["subdepartment"]["enum"] == ["Gynecology", "Obstetrics", "None"]
    model = ScriptedModel(['{"department": "Obstetrics and Gynecology"}', '{"subdepartment": "Endocrinology"}',
                           '{"subdepartment": "None"}'])
    rec = classifier(model, retries=2)({"id": "x", "question": "Which?", "options": OPTIONS})
    assert rec["department"] == "Obstetrics and Gynecology" and rec["subdepartment"] is None
    assert rec["classifier"] | {"model": None} == {"model": None, "prompt": prompts.VERSION, "tries": 3,
                                                   "on": "question", "steps": ["Obstetrics and Gynecology", "None"]}
    assert "Options:\nA. Anti-TPO" in model.calls[0][-1]["content"]  # no text: the question as shown
    with pytest.raises(Reject, match="subdepartment: no valid reply"):
        classifier(ScriptedModel(['{"department": "Surgery"}', '{"subdepartment": "Cardiology"}']), retries=1)(
            {"id": "y", "text": TEXT})


def test_a_long_source_text_is_cut_to_fit_the_context_and_an_impossible_prompt_is_the_records_reject() -> None:
    text = " ".join(f"w{i}" for i in range(500))
    model = ScriptedModel([], context_length=300)
    messages, kept = fit_text(model, prompts.questions_messages, text, 100)
    assert 0 < kept < 500 and model.count(messages) <= 300 - 100 and "w0 w1" in messages[-1]["content"]
    from finemed_cli.synth.llm import ContextOverflow

    with pytest.raises(ContextOverflow, match="no room"):
        fit_text(ScriptedModel([], context_length=120), prompts.questions_messages, text, 100)


def _s(i: str, q: int, c: int, r: int, source: str = "t", case: bool = False) -> dict:
    return {"id": i, "question": "…", "quality": q, "complexity": c, "relevance": r, "case_specific": case,
            "source_id": source}


@pytest.mark.parametrize(("a", "b", "why"), [
    ((5, 5, 6), (6, 5, 4), "a higher summed score"),          # 16 > 15
    ((6, 4, 4), (5, 6, 3), "a higher quality + complexity"),  # 14 = 14; 10 < 11
    ((5, 6, 3), (6, 5, 3), "a higher quality"),               # 14 = 14; 11 = 11; 6 > 5
])
def test_ties_between_a_texts_questions_break_in_the_reference_order(a, b, why) -> None:
    records = [_s("q1", *a), _s("q2", *b)]
    got = decide(records, FilterRules())
    loser, winner = ("q2", "q1") if got["q1"] is None else ("q1", "q2")
    assert why in got[loser] and got[winner] is None
    assert winner == ("q1" if why == "a higher summed score" else "q2")


def test_an_exact_tie_is_a_seeded_draw_that_does_not_depend_on_the_file_order() -> None:
    def kept(seed: int, source: str, order: int) -> str:
        records = [_s("q1", 6, 6, 4, source), _s("q2", 6, 6, 4, source)][::order]
        got = decide(records, FilterRules(seed=seed))
        assert "a draw after equal scores" in next(v for v in got.values() if v)
        return next(k for k, v in got.items() if v is None)

    picks = {(seed, source): kept(seed, source, 1) for seed in range(4) for source in ("t1", "t2", "t3")}
    assert all(kept(seed, source, -1) == pick for (seed, source), pick in picks.items())
    assert set(picks.values()) == {"q1", "q2"}  # a draw, not always the first
    both = decide([_s("q1", 9, 9, 6, case=True), _s("q2", 9, 9, 6, case=True)], FilterRules())
    assert all("case-specific" in why for why in both.values())  # a text whose questions both are gives none


def _filtered(tier: str, **extra: object) -> dict:
    return {"id": f"{tier}-1", "source_id": "t", "question": "Which antibody drives Graves disease?", "text": TEXT,
            "tier": tier, "quality": 8, "complexity": 9 if tier == "complex" else 5, "relevance": 6,
            "department": "Internal Medicine", "subdepartment": "Endocrinology", **extra}


def test_the_complex_tier_is_the_reasoners_long_o1_answer_grounded_in_the_text() -> None:
    instruct, reasoner = ScriptedModel([]), ScriptedModel(["TSH receptor antibodies stimulate the gland.", "(B)."])
    rec = _filtered("complex", options=OPTIONS, gold="B")
    out = responder(instruct, reasoner, ScriptedModel([]), complex_max_tokens=300, system="SYS")(rec)
    assert not instruct.calls and out["reasoning"].startswith("TSH receptor") and out["answer"] == "(B)."
    messages = reasoner.calls[0]
    assert messages[0] == {"role": "system", "content": "SYS"} and TEXT in messages[-1]["content"]
    assert "Options:\nA. Anti-TPO" in messages[-1]["content"] and "the answer is (X)" in messages[-1]["content"]
    assert out["options"] == OPTIONS and out["gold"] == "B" and out["text"] == TEXT
    assert out["responder"]["tier"] == "complex" and out["responder"]["max_tokens"] == 300
    assert out["responder"]["source_tokens"] >= len(TEXT.split())  # the whole text was in the prompt


def test_the_common_tier_is_two_candidates_of_the_instruction_model_and_the_reward_models_choice() -> None:
    instruct = ScriptedModel(["1. TSH receptor antibodies.\n2. So (B).", "Graves disease is driven by (B)."])
    reward = ScriptedModel(['{"score": 6}', '{"score": 9}'])
    rec = _filtered("common", options=OPTIONS, gold="B")
    result = responder(instruct, ScriptedModel([]), reward, common_max_tokens=200)(rec)
    assert isinstance(result, ToSide)
    out = result.record
    assert out["output"] == "Graves disease is driven by (B)." and out["candidates"][0].startswith("1. TSH")
    assert out["reward"] | {"model": None} == {"scores": [6, 9], "chosen": 1, "by": "score", "model": None,
                                                "prompt": prompts.VERSION}
    styles = [call[-1]["content"] for call in instruct.calls]
    assert all(TEXT in s and "Options:\nA. Anti-TPO" in s for s in styles) and styles[0] != styles[1]
    assert "\nC. Anti-GAD" in reward.calls[0][-1]["content"] and TEXT not in reward.calls[0][-1]["content"]
    assert out["instruction"] == prompts.shown(rec) and out["options"] == OPTIONS and out["tier"] == "common"
    assert out["responder"]["tier"] == "common" and out["responder"]["max_tokens"] == 200


def test_equal_rewards_are_a_seeded_draw() -> None:
    def chosen(seed: int, rid: str) -> int:
        result = responder(ScriptedModel(["one", "two"]), ScriptedModel([]), ScriptedModel(['{"score": 7}'] * 2),
                           seed=seed)({**_filtered("common"), "id": rid})
        assert "a draw after equal scores" in result.record["reward"]["by"]
        return result.record["reward"]["chosen"]

    picks = [chosen(seed, rid) for seed in range(3) for rid in ("a", "b", "c")]
    assert picks == [chosen(seed, rid) for seed in range(3) for rid in ("a", "b", "c")] and set(picks) == {0, 1}


def test_respond_writes_the_tiers_to_their_files_and_resumes(tmp_path) -> None:
    records = [_filtered("complex"), _filtered("common"), {**_filtered("common"), "id": "x", "tier": None}]
    instruct = ScriptedModel(["Levothyroxine, by TSH.", "Adjust it until TSH is normal."])
    reasoner = ScriptedModel(["Thinking about TSH.", "Adjust by TSH."])
    fn = responder(instruct, reasoner, ScriptedModel(['{"score": 9}', '{"score": 4}']))
    out, side = tmp_path / "corpus.jsonl", tmp_path / "corpus.common.jsonl"
    s = run_stage("respond", records, out, None, fn, StageWalk(False, side=side))
    assert (s.written, s.rejected) == (2, 1)
    assert [r["id"] for r in _read(out)] == ["complex-1"] and [r["id"] for r in _read(side)] == ["common-1"]
    assert "run `finemed synth filter` first" in _read(tmp_path / "corpus.rejects.jsonl")[0]["reason"]
    again = run_stage("respond", records, out, None, responder(*[ScriptedModel([])] * 3), StageWalk(False, side=side))
    assert again.resumed == 3


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_records_keep_their_options_and_show_them_with_the_question(tmp_path) -> None:
    from finemed_cli.data.records import CorpusRecord, load_corpus
    from finemed_cli.errors import DataError
    from finemed_cli.modeling.prompts import example_messages

    base = {"id": "c1", "question": "Which antibody?", "reasoning": "Graves.", "answer": "The answer is (B)."}
    old = CorpusRecord.from_json(base)  # a corpus written before options: unchanged
    assert old.options is None and old.to_json() == base
    assert example_messages(old, None)[0] == [{"role": "user", "content": "Which antibody?"}]
    mc = CorpusRecord.from_json({**base, "options": ["Anti-TPO", "TSH receptor"]})
    assert mc.options == {"A": "Anti-TPO", "B": "TSH receptor"} and CorpusRecord.from_json(mc.to_json()) == mc
    prompt, _ = example_messages(mc, None)  # TTT, training and the index's question+response key all see them
    assert prompt[0]["content"] == "Which antibody?\n\nOptions:\nA. Anti-TPO\nB. TSH receptor"
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({**base, "options": {"A": "x", "C": "y"}}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:1: .*expected consecutive letters AB"):
        load_corpus(path)


def test_an_index_keeps_the_options_for_ttt_and_an_old_corpus_builds_as_before(tmp_path, hash_embedder) -> None:
    from finemed_cli.retrieval.index import CorpusIndex, build_index

    rows = [{"id": "mc", "question": "Which antibody?", "reasoning": "Graves.", "answer": "The answer is (B).",
             "options": {"A": "Anti-TPO", "B": "TSH receptor"}},
            {"id": "open", "question": "What does TSH measure?", "reasoning": "Feedback.", "answer": "Thyroid drive."}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(corpus, tmp_path / "index", embedder=hash_embedder)
    records = {r.id: r for r in CorpusIndex(tmp_path / "index").records}
    assert records["mc"].options == rows[0]["options"] and records["open"].options is None
    assert "options" not in (tmp_path / "index" / "records.jsonl").read_text().splitlines()[1]
