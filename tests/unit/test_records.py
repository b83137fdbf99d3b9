"""QuestionRecord / CorpusRecord validation, and loading the example and shared data files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from finemed_cli.data.jsonl import RecordError
from finemed_cli.data.records import (
    CorpusRecord,
    QuestionRecord,
    load_corpus,
    load_questions,
    normalise_letter,
)
from finemed_cli.errors import DataError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

OPTIONS = {
    "A": "Anti-thyroid peroxidase antibody",
    "B": "TSH receptor-stimulating antibody",
    "C": "Anti-glutamic acid decarboxylase antibody",
    "D": "Anti-thyroglobulin antibody",
}


def _mc(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "q1",
        "question": "Which autoantibody causes Graves disease?",
        "options": dict(OPTIONS),
        "answer": "B",
    }
    obj.update(overrides)
    return obj


def _write_jsonl(path: Path, objs: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    return path


# --------------------------------------------------------------------------- QuestionRecord


def test_multiple_choice_with_dict_options() -> None:
    q = QuestionRecord.from_json(_mc(meta={"department": "Endocrinology"}))
    assert q.id == "q1"
    assert q.question == "Which autoantibody causes Graves disease?"
    assert q.options == OPTIONS
    assert list(q.options) == ["A", "B", "C", "D"]
    assert q.answer == "B"
    assert q.context is None
    assert q.meta == {"department": "Endocrinology"}
    assert q.is_multiple_choice


def test_dict_options_out_of_order_are_sorted_by_letter() -> None:
    q = QuestionRecord.from_json(_mc(options={"C": "c text", "A": "a text", "B": "b text"}, answer="A"))
    assert list(q.options.items()) == [("A", "a text"), ("B", "b text"), ("C", "c text")]


def test_options_list_gets_letters() -> None:
    q = QuestionRecord.from_json(_mc(options=["Naloxone", "N-acetylcysteine", "Fomepizole"], answer="b"))
    assert q.options == {"A": "Naloxone", "B": "N-acetylcysteine", "C": "Fomepizole"}
    assert q.answer == "B"


def test_options_list_of_ten_is_lettered_a_to_j() -> None:
    texts = [f"option {i}" for i in range(10)]
    q = QuestionRecord.from_json(_mc(options=texts, answer="J"))
    assert list(q.options) == list("ABCDEFGHIJ")
    assert q.options["J"] == "option 9"


def test_options_list_of_eleven_is_rejected() -> None:
    with pytest.raises(RecordError, match="'options'"):
        QuestionRecord.from_json(_mc(options=[f"o{i}" for i in range(11)], answer=None))


@pytest.mark.parametrize("given", ["c", "C", "(C)", "C.", "(c)", " C ", "C:"])
def test_answer_letter_normalised(given: str) -> None:
    assert QuestionRecord.from_json(_mc(answer=given)).answer == "C"


@pytest.mark.parametrize(("value", "expected"), [("c", "C"), ("(C)", "C"), ("C.", "C"), ("CC", None), ("", None),
                                                 ("the answer is C", None)])
def test_normalise_letter(value: str, expected: str | None) -> None:
    assert normalise_letter(value) == expected


@pytest.mark.parametrize("answer", ["E", "(E)", "Graves", "BC", ""])
def test_answer_not_among_options_names_answer(answer: str) -> None:
    with pytest.raises(RecordError, match="'answer'") as info:
        QuestionRecord.from_json(_mc(answer=answer))
    assert "A, B, C, D" in str(info.value)


def test_answer_must_be_a_string() -> None:
    with pytest.raises(RecordError, match="'answer'"):
        QuestionRecord.from_json(_mc(answer=2))


def test_missing_answer_is_allowed() -> None:
    obj = _mc()
    del obj["answer"]
    q = QuestionRecord.from_json(obj)
    assert q.answer is None
    assert q.is_multiple_choice


@pytest.mark.parametrize(
    "options",
    [
        {"A": "x", "B": "y", "X": "z"},
        {"a": "x", "b": "y"},
        {"A": "x", "b": "y"},
        {"A": "x", "C": "y"},
        {"B": "x", "C": "y"},
        {"A": "only one"},
        {"A": "x", "B": ""},
        {"A": "x", "B": 3},
        "A. x B. y",
    ],
    ids=["X-after-AB", "lowercase", "mixed-case", "A-C-gap", "no-A", "one-option", "empty-text",
         "non-string-text", "string"],
)
def test_bad_options_name_options(options: Any) -> None:
    with pytest.raises(RecordError, match="'options'"):
        QuestionRecord.from_json(_mc(options=options, answer=None))


def test_open_question_keeps_free_text_answer() -> None:
    q = QuestionRecord.from_json(
        {"id": "open-1", "question": "What is the antidote to paracetamol overdose?", "answer": "N-acetylcysteine"}
    )
    assert q.options is None
    assert not q.is_multiple_choice
    assert q.answer == "N-acetylcysteine"
    assert q.meta == {}


def test_open_question_with_null_options() -> None:
    q = QuestionRecord.from_json({"id": "o", "question": "Why?", "options": None, "answer": "(c)"})
    assert q.options is None
    assert q.answer == "(c)"  # not normalised: there are no options to be a letter of


def test_pubmedqa_style_with_context() -> None:
    q = QuestionRecord.from_json(
        {
            "id": "pubmedqa-1",
            "question": "Can tailored interventions increase mammography use among HMO women?",
            "context": "BACKGROUND: Telephone counseling ...",
            "options": {"A": "yes", "B": "no", "C": "maybe"},
            "answer": "A",
            "long_answer": "ignored extra field",
            "meta": {"pmid": "10808977"},
        }
    )
    assert q.context == "BACKGROUND: Telephone counseling ..."
    assert q.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert q.answer == "A"
    assert q.meta == {"pmid": "10808977"}


def test_context_must_be_a_string() -> None:
    with pytest.raises(RecordError, match="'context'"):
        QuestionRecord.from_json(_mc(context=["para 1"]))


@pytest.mark.parametrize("meta", ["department: cardiology", ["cardiology"], 3])
def test_meta_not_a_dict(meta: Any) -> None:
    with pytest.raises(RecordError, match="'meta'"):
        QuestionRecord.from_json(_mc(meta=meta))


@pytest.mark.parametrize(("field_name", "value"), [("id", ""), ("question", "   ")])
def test_empty_required_string(field_name: str, value: str) -> None:
    with pytest.raises(RecordError, match=f"'{field_name}' is empty"):
        QuestionRecord.from_json(_mc(**{field_name: value}))


def test_load_questions_names_path_line_and_field(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "q.jsonl", [_mc(id="a"), _mc(id="b", answer="F"), _mc(id="c", options={"A": "x", "C": "y"})])
    with pytest.raises(DataError) as info:
        load_questions(p)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{p}:2:") and "'answer'" in lines[0]
    assert lines[1].startswith(f"{p}:3:") and "'options'" in lines[1]


def test_load_questions_round_trip(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "q.jsonl", [_mc(id="a"), {"id": "b", "question": "Open?"}])
    qs = load_questions(p)
    assert [q.id for q in qs] == ["a", "b"]
    assert qs[0].is_multiple_choice and not qs[1].is_multiple_choice


# --------------------------------------------------------------------------- CorpusRecord


def _corpus(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "c1",
        "question": "A 26-year-old woman has a goiter ...",
        "reasoning": "Heat intolerance and exophthalmos suggest Graves disease ...",
        "answer": "TSH receptor-stimulating antibody.",
        "department": "Internal medicine",
        "quality": 8,
        "complexity": 5,
    }
    obj.update(overrides)
    return obj


def test_corpus_record_and_to_json_drops_none() -> None:
    r = CorpusRecord.from_json(_corpus())
    assert r.quality == 8 and r.complexity == 5
    assert r.subdepartment is None
    assert r.to_json() == _corpus()


@pytest.mark.parametrize("quality", [1, 10])
def test_corpus_quality_bounds_accepted(quality: int) -> None:
    assert CorpusRecord.from_json(_corpus(quality=quality)).quality == quality


@pytest.mark.parametrize("quality", [0, 11, -3, 7.5, "8", True])
def test_corpus_quality_out_of_range(quality: Any) -> None:
    with pytest.raises(RecordError, match="'quality'") as info:
        CorpusRecord.from_json(_corpus(quality=quality))
    assert "1 to 10" in str(info.value)


def test_corpus_complexity_out_of_range() -> None:
    with pytest.raises(RecordError, match="'complexity'"):
        CorpusRecord.from_json(_corpus(complexity=12))


@pytest.mark.parametrize("missing", ["id", "question", "reasoning", "answer"])
def test_corpus_missing_required_field(missing: str) -> None:
    obj = _corpus()
    del obj[missing]
    with pytest.raises(RecordError, match=f"missing field '{missing}'"):
        CorpusRecord.from_json(obj)


def test_load_corpus_bad_quality_names_line(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "c.jsonl", [_corpus(id="a"), _corpus(id="b", quality=0)])
    with pytest.raises(DataError) as info:
        load_corpus(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}:2:")
    assert "'quality'" in msg


# --------------------------------------------------------------------------- real files


def test_example_questions_load() -> None:
    qs = load_questions(EXAMPLES / "questions.jsonl")
    assert len(qs) == 20
    assert len({q.id for q in qs}) == 20


def test_example_corpus_loads() -> None:
    corpus = load_corpus(EXAMPLES / "corpus.jsonl")
    assert len(corpus) == 60
    assert len({r.id for r in corpus}) == 60


def _shared(name: str) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is absent")
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.parametrize("name", ["medqa_dev.jsonl", "pubmedqa_dev.jsonl", "mmlu_medical_dev.jsonl"])
def test_shared_question_files_load(name: str) -> None:
    qs = load_questions(_shared(name))
    assert qs
    assert all(q.is_multiple_choice for q in qs)


def test_shared_pubmedqa_has_context_and_yes_no_maybe() -> None:
    qs = load_questions(_shared("pubmedqa_dev.jsonl"))
    assert all(q.context for q in qs)
    assert all(q.options == {"A": "yes", "B": "no", "C": "maybe"} for q in qs)


@pytest.mark.parametrize(
    "name",
    ["reasoning_huatuogpt_o1_demo.jsonl", "reasoning_vlievin_cot.jsonl", "reasoning_ultramedical.jsonl"],
)
def test_shared_corpus_files_load(name: str) -> None:
    assert load_corpus(_shared(name))
