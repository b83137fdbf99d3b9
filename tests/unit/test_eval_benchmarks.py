"""Benchmark files in their upstream shapes → QuestionRecords with source and department labels.

Every row here is invented for the test; none is copied from a real benchmark.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from finemed_cli.config.eval import SOURCES
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.eval.benchmarks import (
    BenchmarkItem,
    detect_source,
    load_benchmark,
    normalise_source,
)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _at(path: Path, line: int) -> str:
    """A regex for the start of an error line: `path:line: `."""
    return re.escape(f"{path}:{line}: ")


def _medmcqa_row(rid: str, cop: int, subject: str = "Pharmacology") -> dict[str, Any]:
    return {
        "id": rid,
        "question": f"Which drug is the invented first choice for zorbitis ({rid})?",
        "opa": "Alphazine",
        "opb": "Betamol",
        "opc": "Gammadrex",
        "opd": "Deltafen",
        "cop": cop,
        "choice_type": "single",
        "exp": "Made-up explanation." if cop else None,
        "subject_name": subject,
        "topic_name": None,
    }


MEDQA_ROWS = [
    {
        "question": "A 30-year-old invented patient has a blue rash after glowberries. Most likely cause?",
        "options": {"A": "Glowberry allergy", "B": "Sunburn", "C": "Viral rash", "D": "Ink", "E": "Stress"},
        "answer": "Glowberry allergy",
        "answer_idx": "A",
        "meta_info": "step1",
    },
    {
        "question": "Which made-up enzyme converts fictose to glimmerol?",
        "options": {"A": "Fictase", "B": "Glimmerase", "C": "Sparkinase", "D": "Nullase"},
        "answer": "Glimmerase",
        "answer_idx": "B",
        "meta_info": "step2&3",
    },
]


# --- detection and the six shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"id": "q1", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "A"}, "finemed"),
        (MEDQA_ROWS[0], "medqa"),
        (_medmcqa_row("m1", 2), "medmcqa"),
        ({"pubid": 1, "question": "Q?", "context": {"contexts": []}, "final_decision": "yes"}, "pubmedqa"),
        ({"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 1}, "mmlu"),
        (
            {"question_id": 7, "question": "Q?", "options": ["a", "b"], "answer": "A", "answer_index": 0},
            "mmlu_pro",
        ),
        ({"id": "r1", "question": "Q?", "reasoning": "…", "answer": "A. x"}, None),  # a reasoning trace
        ({"prompt": "Q?", "chosen": "a", "rejected": "b"}, None),  # a preference pair
    ],
)
def test_detect_source(obj: dict[str, Any], expected: str | None) -> None:
    assert detect_source(obj) == expected
    assert expected is None or expected in SOURCES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("medqa_usmle", "medqa"),
        ("MedQA-dev", "medqa"),
        ("mmlu_medical", "mmlu"),
        ("mmlu-pro-health", "mmlu_pro"),
        ("medmcqa", "medmcqa"),
        ("mmlupro", "mmlupro"),
        ("headqa", "headqa"),
    ],
)
def test_normalise_source(value: str, expected: str) -> None:
    assert normalise_source(value) == expected


def test_finemed_schema_source_and_department(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "id": "x-1",
                "source": "medqa_usmle",
                "question": "Invented stem one?",
                "options": {"A": "One", "B": "Two"},
                "answer": "(b)",
                "meta": {"department": "Cardiology"},
            },
            {
                "id": "x-2",
                "source": "mmlu_medical",
                "question": "Invented stem two?",
                "options": {"A": "One", "B": "Two", "C": "Three"},
                "answer": "C",
                "meta": {"subject": "anatomy"},
            },
            {
                "id": "x-3",
                "question": "Invented open question?",
                "context": "BACKGROUND: made up.",
                "meta": {"subject": " ", "category": "health"},
            },
        ],
    )
    items = load_benchmark(path)
    assert [(i.source, i.department) for i in items] == [
        ("medqa", "Cardiology"),
        ("mmlu", "anatomy"),
        ("finemed", "health"),
    ]
    assert items[0].question.answer == "B"
    assert items[2].question.options is None and items[2].question.context == "BACKGROUND: made up."


def test_medqa_jind11(tmp_path: Path) -> None:
    items = load_benchmark(_jsonl(tmp_path / "US_test.jsonl", MEDQA_ROWS))
    assert [i.question.id for i in items] == ["medqa-1", "medqa-2"]
    first = items[0]
    assert first == BenchmarkItem(first.question, "medqa", None)
    assert list(first.question.options) == ["A", "B", "C", "D", "E"] and first.question.answer == "A"
    assert items[1].question.answer == "B" and items[1].question.meta == {"meta_info": "step2&3"}


def test_medqa_answer_text_without_letter_and_disagreement(tmp_path: Path) -> None:
    no_letter = {k: v for k, v in MEDQA_ROWS[1].items() if k != "answer_idx"}
    assert load_benchmark(_jsonl(tmp_path / "a.jsonl", [MEDQA_ROWS[0], no_letter]))[1].question.answer == "B"
    wrong = {**MEDQA_ROWS[1], "answer_idx": "C"}
    path = _jsonl(tmp_path / "b.jsonl", [MEDQA_ROWS[0], wrong])
    with pytest.raises(
        DataError,
        match=_at(path, 2) + r"'answer_idx' 'C' is 'Sparkinase' but 'answer' is 'Glimmerase'",
    ):
        load_benchmark(path)


def test_medmcqa_one_based_inferred_from_a_4(tmp_path: Path) -> None:
    rows = [_medmcqa_row("aa-1", 4), _medmcqa_row("aa-2", 1, subject="Anatomy")]
    # MedMCQA's release names its JSON-lines files .json: they must still be read as JSONL.
    items = load_benchmark(_jsonl(tmp_path / "dev.json", rows))
    assert [i.question.answer for i in items] == ["D", "A"]
    assert [i.department for i in items] == ["Pharmacology", "Anatomy"]
    q = items[0].question
    assert q.id == "medmcqa-aa-1" and q.options == {
        "A": "Alphazine",
        "B": "Betamol",
        "C": "Gammadrex",
        "D": "Deltafen",
    }
    assert q.meta == {"choice_type": "single", "explanation": "Made-up explanation."}
    assert {i.source for i in items} == {"medmcqa"}


def test_medmcqa_zero_based_inferred_from_a_0(tmp_path: Path) -> None:
    items = load_benchmark(_jsonl(tmp_path / "hf.jsonl", [_medmcqa_row("b1", 3), _medmcqa_row("b2", 0)]))
    assert [i.question.answer for i in items] == ["D", "A"]


def test_medmcqa_ambiguous_base_needs_the_parameter(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "amb.jsonl", [_medmcqa_row("c1", 1), _medmcqa_row("c2", 3)])
    with pytest.raises(DataError, match=r"cannot be inferred; pass --medmcqa-cop-base 0"):
        load_benchmark(path)
    assert [i.question.answer for i in load_benchmark(path, medmcqa_cop_base=1)] == ["A", "C"]
    assert [i.question.answer for i in load_benchmark(path, medmcqa_cop_base=0)] == ["B", "D"]


def test_medmcqa_contradictory_and_out_of_range_cop(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "both.jsonl", [_medmcqa_row("d1", 0), _medmcqa_row("d2", 2), _medmcqa_row("d3", 4)]
    )
    with pytest.raises(DataError, match=r"line 1 has cop 0 \(0-based\) but line 3 has cop 4"):
        load_benchmark(path)
    with pytest.raises(DataError, match=_at(path, 1) + r"field 'cop' is 0; 1-based cop must be 1–4"):
        load_benchmark(path, medmcqa_cop_base=1)


PUBMED_ITEMS = {
    "90000001": {
        "QUESTION": "Does invented tea lower made-up fever?",
        "CONTEXTS": ["We studied 12 imaginary volunteers.", "Fever fell in most of them."],
        "LABELS": ["BACKGROUND", "RESULTS"],
        "MESHES": ["Tea"],
        "YEAR": "2001",
        "reasoning_required_pred": "yes",
        "reasoning_free_pred": "yes",
        "final_decision": "yes",
        "LONG_ANSWER": "Invented tea seems to help.",
    },
    "90000002": {
        "QUESTION": "Is fictional gene X linked to sneezing?",
        "CONTEXTS": ["A made-up cohort was genotyped."],
        "LABELS": ["METHODS"],
        "final_decision": "maybe",
        "LONG_ANSWER": "Unclear.",
    },
}


def test_pubmedqa_original_json(tmp_path: Path) -> None:
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(PUBMED_ITEMS, indent=2), encoding="utf-8")  # one pretty-printed JSON object
    items = load_benchmark(path)
    q = items[0].question
    assert (q.id, q.answer, items[0].source, items[0].department) == (
        "pubmedqa-90000001",
        "A",
        "pubmedqa",
        None,
    )
    assert q.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert (
        q.context == "BACKGROUND: We studied 12 imaginary volunteers.\nRESULTS: Fever fell in most of them."
    )
    assert q.meta == {"pmid": "90000001", "long_answer": "Invented tea seems to help."}
    assert items[1].question.answer == "C"


def test_pubmedqa_hugging_face_jsonl(tmp_path: Path) -> None:
    rows = [
        {
            "pubid": int(pmid),
            "question": it["QUESTION"],
            "long_answer": it["LONG_ANSWER"],
            "context": {"contexts": it["CONTEXTS"], "labels": it["LABELS"]},
            "final_decision": it["final_decision"],
        }
        for pmid, it in PUBMED_ITEMS.items()
    ]
    rows.append(
        {
            "pubid": 90000003,
            "question": "Does nothing help?",
            "final_decision": "No",
            "context": {"contexts": ["Unlabelled passage."]},
        }
    )
    items = load_benchmark(_jsonl(tmp_path / "pqal.jsonl", rows))
    assert [i.question.id for i in items] == ["pubmedqa-90000001", "pubmedqa-90000002", "pubmedqa-90000003"]
    assert items[1].question.context == "METHODS: A made-up cohort was genotyped."
    assert (items[2].question.answer, items[2].question.context) == ("B", "Unlabelled passage.")


def test_pubmedqa_labels_must_match_passages(tmp_path: Path) -> None:
    bad = {
        "pubid": 5,
        "question": "Q?",
        "final_decision": "yes",
        "context": {"contexts": ["a", "b"], "labels": ["X"]},
    }
    path = _jsonl(tmp_path / "p.jsonl", [bad])
    with pytest.raises(
        DataError,
        match=_at(path, 1) + r"2 passages but labels \['X'\]; give one label per passage",
    ):
        load_benchmark(path)


def test_mmlu_hugging_face_jsonl(tmp_path: Path) -> None:
    rows = [
        {
            "question": "Which invented bone is in the ear?",
            "subject": "anatomy",
            "choices": ["Fibblet", "Stapoid", "Clavix", "Tarsule"],
            "answer": 1,
        },
        {
            "question": "Which made-up vitamin prevents glumps?",
            "subject": "nutrition",
            "choices": ["V1", "V2", "V3", "V4"],
            "answer": 3,
        },
    ]
    items = load_benchmark(_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert [(i.question.id, i.question.answer, i.source, i.department) for i in items] == [
        ("mmlu-anatomy-1", "B", "mmlu", "anatomy"),
        ("mmlu-nutrition-2", "D", "mmlu", "nutrition"),
    ]
    assert items[0].question.options == {"A": "Fibblet", "B": "Stapoid", "C": "Clavix", "D": "Tarsule"}


def test_mmlu_original_csv(tmp_path: Path) -> None:
    path = tmp_path / "clinical_knowledge_test.csv"
    path.write_text(
        '"Which invented sign, ""the wobble"", suggests glumps?",Blue nails,Wobble,"Red ears, itchy",None,B\n'
        '"A two-line\nmade-up stem?",w,x,y,z,d\n',
        encoding="utf-8",
    )
    items = load_benchmark(path)
    assert [(i.question.id, i.question.answer, i.department) for i in items] == [
        ("mmlu-clinical_knowledge-1", "B", "clinical_knowledge"),
        ("mmlu-clinical_knowledge-2", "D", "clinical_knowledge"),
    ]
    assert items[0].question.options["C"] == "Red ears, itchy"
    assert items[0].question.question == 'Which invented sign, "the wobble", suggests glumps?'
    assert items[1].question.question == "A two-line\nmade-up stem?"
    (tmp_path / "bad_dev.csv").write_text('"one\ntwo",a,b,c,d,A\nq,a,b,c,d,Z\nq,a,b\n', encoding="utf-8")
    with pytest.raises(DataError) as e:  # line numbers count the physical lines of a quoted multi-line cell
        load_benchmark(tmp_path / "bad_dev.csv")
    assert f"{tmp_path / 'bad_dev.csv'}:3: field 'answer' is 'Z'" in str(e.value)
    assert f"{tmp_path / 'bad_dev.csv'}:4: 3 columns; expected question,A,B,C,D,answer" in str(e.value)


def test_mmlu_csv_with_header_and_zero_based_answers(tmp_path: Path) -> None:
    path = tmp_path / "anatomy_dev.csv"
    path.write_text("question,A,B,C,D,answer\nWhich made-up nerve tickles?,n1,n2,n3,n4,2\n", encoding="utf-8")
    [item] = load_benchmark(path)
    assert (item.question.id, item.question.answer, item.department) == ("mmlu-anatomy-2", "C", "anatomy")


@pytest.mark.parametrize("header", ["question,A,B,C,D,answer\n", ""], ids=["header", "no-header"])
def test_mmlu_csv_with_a_byte_order_mark(tmp_path: Path, header: str) -> None:
    path = tmp_path / "anatomy_dev.csv"
    path.write_text(header + "Which made-up nerve tickles?,n1,n2,n3,n4,B\n", encoding="utf-8-sig")
    [item] = load_benchmark(path)
    assert (item.question.question, item.question.answer) == ("Which made-up nerve tickles?", "B")


def test_mmlu_pro_drops_na_padding(tmp_path: Path) -> None:
    rows = [
        {
            "question_id": 101,
            "question": "Which invented hormone makes toes glow?",
            "options": ["Glowin", "N/A", "Toetonin", "Lumex", "N/A"],
            "answer": "D",
            "answer_index": 3,
            "cot_content": "",
            "category": "health",
            "src": "made-up-src",
        },
        {
            "question_id": 102,
            "question": "Which fictional organ stores sparkle?",
            "options": ["Sparkleen", "Glimmery", "Shinelum"],
            "answer": "A",
            "answer_index": 0,
            "category": "biology",
        },
    ]
    items = load_benchmark(_jsonl(tmp_path / "pro.jsonl", rows))
    q = items[0].question
    assert q.id == "mmlu_pro-101" and q.options == {"A": "Glowin", "B": "Toetonin", "C": "Lumex"}
    assert q.answer == "C" and q.meta == {"src": "made-up-src"}
    assert [(i.source, i.department) for i in items] == [("mmlu_pro", "health"), ("mmlu_pro", "biology")]
    path = _jsonl(tmp_path / "pro_bad.jsonl", [{**rows[1], "answer": "B"}])
    with pytest.raises(DataError, match=_at(path, 1) + r"'answer' 'B' disagrees with 'answer_index' 0"):
        load_benchmark(path)


# --- errors, ids, explicit source and limit ------------------------------------------------------------


def test_every_bad_line_is_reported_with_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "medqa_bad.jsonl"
    lines = [
        json.dumps(MEDQA_ROWS[0]),
        "{not json",
        json.dumps({**MEDQA_ROWS[1], "answer_idx": "F"}),
        json.dumps(_medmcqa_row("z", 1)),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_benchmark(path)
    message = str(e.value)
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: field 'answer' is 'F' but the options are A, B, C, D" in message
    assert (
        f"{path}:4: this record looks like medmcqa, but line 1 is medqa; keep one benchmark per file"
        in message
    )


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "dup.jsonl", [_medmcqa_row("e1", 4), _medmcqa_row("e2", 1), _medmcqa_row("e1", 2)]
    )
    with pytest.raises(DataError, match=_at(path, 3) + r"duplicate id 'medmcqa-e1' \(first at line 1\)"):
        load_benchmark(path)


def test_explicit_source(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "q.jsonl", MEDQA_ROWS)
    assert [i.source for i in load_benchmark(path, source="medqa")] == ["medqa", "medqa"]
    with pytest.raises(DataError, match=_at(path, 1) + r".*this record looks like medqa, not pubmedqa"):
        load_benchmark(path, source="pubmedqa")
    mcq = _jsonl(tmp_path / "m.jsonl", [_medmcqa_row("f1", 4)])
    with pytest.raises(DataError, match=_at(mcq, 1) + r"this record has the shape of medmcqa, not finemed's"):
        load_benchmark(mcq, source="finemed")  # else it would load as an open question without options


def test_unknown_shape_empty_file_and_bad_arguments(tmp_path: Path) -> None:
    trace = _jsonl(
        tmp_path / "trace.jsonl", [{"id": "r", "question": "Q?", "reasoning": "…", "answer": "A. x"}]
    )
    with pytest.raises(
        DataError, match=_at(trace, 1) + r"cannot tell which benchmark this is .*reasoning examples.*perplexity"
    ):
        load_benchmark(trace)
    no_question = _jsonl(tmp_path / "noq.jsonl", [{"id": "a", "options": {"A": "x", "B": "y"}, "answer": "A"}])
    with pytest.raises(DataError, match=_at(no_question, 1) + r".*no 'question' field"):
        load_benchmark(no_question)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_benchmark(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_benchmark(tmp_path / "missing.jsonl")
    (tmp_path / "array.json").write_text(json.dumps(MEDQA_ROWS), encoding="utf-8")
    with pytest.raises(DataError, match=r"a JSON array, not JSONL; convert it first: jq -c"):
        load_benchmark(tmp_path / "array.json")
    with pytest.raises(ConfigError, match="source 'medqa_usmle' is unknown"):
        load_benchmark(trace, source="medqa_usmle")
    with pytest.raises(ConfigError, match="limit is 0"):
        load_benchmark(trace, limit=0)
    with pytest.raises(ConfigError, match="medmcqa_cop_base is 2"):
        load_benchmark(trace, medmcqa_cop_base=2)
    with pytest.raises(ConfigError, match="a .csv file is read as MMLU"):
        load_benchmark(tmp_path / "x.csv", source="medqa")


def test_limit_keeps_the_first_items(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [_medmcqa_row(f"g{i}", 1 + i % 4) for i in range(5)])
    assert [i.question.id for i in load_benchmark(path, limit=2)] == ["medmcqa-g0", "medmcqa-g1"]
    assert len(load_benchmark(path, limit=99)) == 5


# --- the shared development data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("medqa_dev", "medqa"),
        ("medmcqa_dev", "medmcqa"),
        ("pubmedqa_dev", "pubmedqa"),
        ("mmlu_medical_dev", "mmlu"),
    ],
)
def test_shared_files_load(shared_data: Path, name: str, source: str) -> None:
    path = shared_data / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    items = load_benchmark(path)
    assert items and {i.source for i in items} == {source}
    assert all(i.question.options and i.question.answer in i.question.options for i in items)
    if source in ("medmcqa", "mmlu"):
        assert all(i.department for i in items)
    if source == "pubmedqa":
        assert all(i.question.context and i.question.id.startswith("pubmedqa-") for i in items)
