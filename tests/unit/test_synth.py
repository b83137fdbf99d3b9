"""The synth plumbing with a scripted model: schema checks, bounded retries, every input accounted for,
resume, the filter's rule cascade, and the pipeline's outputs (questions, pairs, configs). The steps that
follow the FineMed reference code (scoring scales, tie-breaks, two-step classification, tiers, grounding,
options) are checked in test_synth_reference.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_cli.synth import prompts
from finemed_cli.synth.filter import FilterRules, decide
from finemed_cli.synth.judge import scorer
from finemed_cli.synth.llm import ScriptedModel, StructuredError, ask_json, validate
from finemed_cli.synth.stage import StageWalk, run_stage

GOOD = '{"quality": 8, "complexity": 9, "relevance": 6, "case_specific": false}'


def test_validate_the_schema_subset() -> None:
    s = prompts.SCORE_SCHEMA
    assert validate(json.loads(GOOD), s) is None
    assert "missing 'relevance'" in validate({"quality": 8, "complexity": 9, "case_specific": False}, s)
    assert "11 is not one of" in validate({**json.loads(GOOD), "quality": 11}, s)
    assert "7 is not one of" in validate({**json.loads(GOOD), "relevance": 7}, s)  # relevance is 1-6
    assert "True is not one of" in validate({**json.loads(GOOD), "quality": True}, s)  # bool is not an int here
    assert "expected boolean" in validate({**json.loads(GOOD), "case_specific": "no"}, s)


def test_retries_until_valid_then_gives_up_with_the_reason() -> None:
    model = ScriptedModel(['{"quality": 8, "complex', '{"quality": 0, "complexity": 1, "relevance": 1, '
                           '"case_specific": false}', GOOD])
    value, tries = ask_json(model, prompts.score_messages("q"), prompts.SCORE_SCHEMA, retries=3)
    assert tries == 3 and value["complexity"] == 9
    with pytest.raises(StructuredError, match="no valid reply in 2 tries; last: .*not JSON"):
        ask_json(ScriptedModel(["{}", "oops"]), prompts.score_messages("q"), prompts.SCORE_SCHEMA, retries=2)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_input_is_written_or_rejected_and_a_rerun_resumes(tmp_path) -> None:
    records = [{"id": "a", "question": "Name a thyroid hormone."}, {"id": "b", "question": " "},
               {"id": "c", "question": "First-line drug for type 2 diabetes?"}]
    model = ScriptedModel([GOOD, "not json", "still not", "nope"])
    out = tmp_path / "scored.jsonl"
    summary = run_stage("score", records, out, None, scorer(model, retries=3), StageWalk(progress=False))
    assert (summary.written, summary.rejected) == (1, 2)
    rejects = _read(tmp_path / "scored.rejects.jsonl")
    assert {r["id"] for r in rejects} == {"b", "c"} and "no 'question'" in rejects[0]["reason"]
    assert "no valid reply in 3 tries" in rejects[1]["reason"] and rejects[1]["record"] == records[2]
    (scored,) = _read(out)
    assert scored["quality"] == 8 and scored["relevance"] == 6 and scored["judge"]["prompt"] == prompts.VERSION
    again = run_stage("score", records, out, None, scorer(ScriptedModel([]), retries=3), StageWalk(progress=False))
    assert again.resumed == 3 and again.written == again.rejected == 0


def _scored(i: str, q: int, c: int, r: int, case: bool = False, source: str | None = None) -> dict:
    rec = {"id": i, "question": "…", "quality": q, "complexity": c, "relevance": r, "case_specific": case}
    return {**rec, "source_id": source} if source else rec


def test_filter_cascade() -> None:
    records = [_scored("a1", 8, 9, 5, source="t1"), _scored("a2", 9, 9, 5, source="t1"),
               _scored("b1", 9, 9, 5, case=True, source="t2"), _scored("b2", 5, 3, 5, source="t2"),
               _scored("c", 2, 9, 5), {"id": "d", "question": "not scored"}, _scored("e", 5, 5, 7)]
    got = decide(records, FilterRules(complex_above=8, min_quality=3))
    assert got["a2"] is None and "same text was kept (a2): a higher summed score" in got["a1"]
    assert "case-specific" in got["b1"] and got["b2"] is None  # its sibling was rejected, so it stays
    assert "quality 2 < 3" in got["c"] and "run `finemed synth score` first" in got["d"]
    assert "relevance is 7, not an integer from 1 to 6" in got["e"]


def test_report_plots_and_counts(tmp_path, hash_embedder) -> None:
    from finemed_cli.synth.report import write_report

    depts = [("Internal medicine", "Endocrinology"), ("Surgery", None), ("Pediatrics", None)]
    for name, shift in (("ours", 2), ("theirs", 0)):
        rows = [{"id": f"{name}{i}", "question": f"case {i} about {depts[i % 3][0]} and hormone {i % 5}",
                 "quality": 3 + (i + shift) % 7, "complexity": 1 + (i * 3 + shift) % 10,
                 "department": depts[i % 3][0], "subdepartment": depts[i % 3][1]} for i in range(12)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_report([tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"], tmp_path / "r", embedder=hash_embedder)
    assert [p.name for p in paths] == ["scores.png", "tsne.png", "summary.md"]
    assert all(p.stat().st_size > 2000 for p in paths[:2])
    md = paths[2].read_text()
    assert "## ours: 12 records" in md and "| Internal medicine | Endocrinology | 4 |" in md
    assert "| Surgery | — | 4 |" in md


def test_questions_two_per_text_written_together_and_resumed(tmp_path) -> None:
    from finemed_cli.synth.generate import questioner, questions_done_key

    text = "Levothyroxine replaces thyroxine in primary hypothyroidism; the dose follows TSH."
    raw = [{"id": "t1", "text": text}, {"id": "t2", "text": "too short"}]
    reply = '{"questions": ["Which drug treats primary hypothyroidism?", "How is the levothyroxine dose adjusted?"]}'
    model = ScriptedModel([reply])
    out = tmp_path / "q.jsonl"
    s = run_stage("questions", raw, out, None, questioner(model), StageWalk(False, done_key=questions_done_key))
    assert (s.written, s.rejected) == (2, 1)
    assert [(r["id"], r["source_id"], r["text"]) for r in _read(out)] == [("t1-q1", "t1", text), ("t1-q2", "t1", text)]
    assert text in model.calls[0][-1]["content"]
    again = run_stage("questions", raw, out, None, questioner(ScriptedModel([])), StageWalk(False, done_key=questions_done_key))
    assert again.resumed == 2 and again.written == 0


def test_a_raw_record_with_its_own_question_is_taken_as_it_is(tmp_path) -> None:
    from finemed_cli.synth.generate import questioner, questions_done_key

    options = {"A": "Anti-TPO", "B": "TSH receptor"}
    raw = [{"id": "mc", "question": "Antibody in Graves disease?", "options": options, "answer": "(b)",
            "text": "Graves disease is driven by TSH receptor antibodies."},
           {"id": "bad", "question": "Which?", "options": options, "answer": "E"}]
    out = tmp_path / "q.jsonl"
    model = ScriptedModel([])  # no question is written for them
    s = run_stage("questions", raw, out, None, questioner(model), StageWalk(False, done_key=questions_done_key))
    assert (s.written, s.rejected) == (1, 1) and not model.calls
    (rec,) = _read(out)
    assert rec == {"id": "mc", "source_id": "mc", "question": "Antibody in Graves disease?", "given": True,
                   "options": options, "gold": "B", "text": raw[0]["text"]}
    (bad,) = _read(tmp_path / "q.rejects.jsonl")
    assert "answer' is 'E' but the options are A, B" in bad["reason"]
    again = run_stage("questions", raw, out, None, questioner(model), StageWalk(False, done_key=questions_done_key))
    assert again.resumed == 2


def test_pairs_from_a_gold_letter_and_from_a_cold_start() -> None:
    from finemed_cli.synth.generate import pairer

    rec = {"id": "q", "question": "Antibody in Graves disease?", "options": {"A": "Anti-TPO", "B": "TSH receptor"},
           "gold": "B", "reasoning": "Exophthalmos points to Graves.", "answer": "The answer is (B).",
           "text": "Graves disease is driven by TSH receptor antibodies."}
    samples = ScriptedModel(["TPO antibodies are common.", "The answer is (A).", "Graves.", "The answer is (B)."])
    pair = pairer(samples, ScriptedModel([]), samples=2)(rec)
    assert pair["kind"] == "gold" and "(B)" in pair["chosen"] and "(A)" in pair["rejected"]
    assert "Options:\nA. Anti-TPO" in pair["prompt"] and rec["text"] not in pair["prompt"]
    assert rec["text"] in samples.calls[0][-1]["content"]  # the samples are grounded as the corpus response was
    cold = pairer(ScriptedModel([]), ScriptedModel(["Insulin."]))({**rec, "options": None, "gold": None})
    assert cold["kind"] == "cold-start" and cold["rejected"] == "Insulin." and "## Summarization" in cold["chosen"]


def test_reward_model_keeps_pairs_whose_chosen_side_wins_by_the_margin() -> None:
    from finemed_cli.synth.generate import pairer, rewarder
    from finemed_cli.synth.llm import ContextOverflow
    from finemed_cli.synth.stage import Reject

    rec = {"id": "q", "question": "First-line drug in type 2 diabetes?", "reasoning": "Guidelines start with it.",
           "answer": "Metformin.", "options": None, "gold": None}
    judge = ScriptedModel(['{"score": 8}', '{"score": 3}'])
    pair = pairer(ScriptedModel([]), ScriptedModel(["Insulin."]), reward=rewarder(judge, min_margin=2))(rec)
    assert pair["reward"]["chosen"] == 8 and pair["reward"]["rejected"] == 3
    assert "Metformin." in judge.calls[0][1]["content"] and "Insulin." in judge.calls[1][1]["content"]
    with pytest.raises(Reject, match="chosen 5, rejected 5: below the margin of 1"):
        pairer(ScriptedModel([]), ScriptedModel(["Insulin."]),
               reward=rewarder(ScriptedModel(['{"score": 5}', '{"score": 5}'])))(rec)

    class TooLong(ScriptedModel):  # what LlamaCppModel raises for a prompt longer than its context
        def complete(self, *a, **kw):
            raise ContextOverflow("the prompt (3601 tokens) does not fit judge.gguf's context of 2048 tokens")

    with pytest.raises(Reject, match="does not fit"):  # this pair's reject, not the stage's crash
        pairer(ScriptedModel([]), ScriptedModel(["Insulin."]), reward=rewarder(TooLong([])))(rec)
    with pytest.raises(Reject, match="reward model"):  # out of range every try
        pairer(ScriptedModel([]), ScriptedModel(["Insulin."]),
               reward=rewarder(ScriptedModel(['{"score": 11}'] * 3), retries=3))(rec)


def test_the_example_pipeline_config_loads_with_its_paths_made_absolute() -> None:
    from finemed_cli.config.synth import load_synth_config
    from tests.conftest import EXAMPLES

    cfg = load_synth_config(EXAMPLES / "synth.yaml")
    assert Path(cfg.raw) == EXAMPLES / "raw.jsonl" and Path(cfg.raw).is_file()
    assert Path(cfg.out_dir).is_absolute() and cfg.judge is None and cfg.keep_case_specific
    assert cfg.validate() == [] and cfg.complex_above == 8 and not cfg.reward_pairs


def test_a_pipeline_config_reports_every_problem_with_its_key(tmp_path) -> None:
    from finemed_cli.config.synth import load_synth_config
    from finemed_cli.errors import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text("raw: r.jsonl\nretries: 0\ncomplex_above: 11\njudgee: x.gguf\nmin_relevance: 7\n")
    with pytest.raises(ConfigError) as e:
        load_synth_config(path)
    text = str(e.value)
    assert "4 problem(s)" in text and "judgee: unknown key; did you mean 'judge'?" in text
    assert "retries: at least 1" in text and "complex_above: a score from 1 to 10" in text
    assert "min_relevance: relevance is scored 1 to 6, got 7" in text


def test_torchrun_refuses_a_work_folder_one_process_began(tmp_path, monkeypatch):
    from finemed_cli.errors import ConfigError
    from finemed_cli.synth.pipeline import run_pipeline

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"id": "t1", "text": "Insulin lowers blood glucose."}\n')
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "questions.jsonl").write_text('{"id": "t1-q1", "source_id": "t1"}\n')
    config = tmp_path / "synth.yaml"
    config.write_text(f"raw: {raw}\nout_dir: {tmp_path / 'work'}\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="begun by one process: continue it with one process"):
        run_pipeline(config)
