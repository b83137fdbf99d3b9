"""An item that cannot be processed is that item's failure, recorded with its reason; the run goes on."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import EXAMPLES
from tests.robustness.conftest import run_finemed, write_jsonl

_LONG = " ".join(["The patient also reports fatigue, mild headaches and poor sleep for several weeks."] * 400)


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_filter_rejects_records_with_impossible_scores(tmp_path: Path) -> None:
    base = {"question": "Q?", "complexity": 3, "relevance": 5, "case_specific": False}
    scored = write_jsonl(tmp_path / "scored.jsonl", [
        {**base, "id": "nan", "source_id": "a", "quality": "NaN"},
        {**base, "id": "big", "source_id": "b", "quality": 10**12},
        {**base, "id": "flag", "source_id": "c", "quality": 5, "case_specific": "no"},
        {**base, "id": "ok", "source_id": "d", "quality": 5},
    ])
    run = run_finemed("synth", "filter", scored, "-o", tmp_path / "f.jsonl", "--no-progress")
    assert run.code == 0, run.stderr
    assert [r["id"] for r in _read(tmp_path / "f.jsonl")] == ["ok"]
    reasons = {r["id"]: r["reason"] for r in _read(tmp_path / "f.rejects.jsonl")}
    assert "quality is 'NaN'" in reasons["nan"] and "quality is 1000000000000" in reasons["big"]
    assert "case_specific is 'no'" in reasons["flag"]


@pytest.mark.integration
def test_answer_records_a_question_longer_than_the_context_and_goes_on(tmp_path: Path) -> None:
    first = orjson.loads((EXAMPLES / "questions.jsonl").read_bytes().splitlines()[0])
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {**first, "id": "long", "question": first["question"] + " " + _LONG}, {**first, "id": "short"}])
    out = tmp_path / "a.jsonl"
    run = run_finemed("answer", questions, "-o", out, "--no-ttt", "--generator", "llama.cpp", "--max-new-tokens",
                      "8", "--no-progress")
    assert run.code == 0, run.stderr
    records = {r["id"]: r for r in _read(out)}
    assert set(records) == {"long", "short"}
    long = records["long"]
    assert long["prediction"] is None and long["correct"] is False and long["response"] == ""
    assert "exceed the llama.cpp context of 4096 tokens; shorten the question" in long["error"]
    assert "error" not in records["short"] and records["short"]["generation"]["tokens"] > 0
    assert "1 answered, 1 not answered" in run.stdout


@pytest.mark.integration
def test_a_synth_record_longer_than_the_judges_context_is_rejected(tmp_path: Path) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": "long", "question": "Is this serious? " + _LONG},
                                                   {"id": "short", "question": "What does TSH measure?"}])
    run = run_finemed("synth", "score", questions, "-o", tmp_path / "s.jsonl", "--no-progress")
    assert run.code == 0, run.stderr
    rejects = {r["id"]: r["reason"] for r in _read(tmp_path / "s.rejects.jsonl")}
    assert "does not fit" in rejects["long"] and "context" in rejects["long"]
    done = [r["id"] for r in _read(tmp_path / "s.jsonl")] + list(rejects)
    assert sorted(done) == ["long", "short"]
