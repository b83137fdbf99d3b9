"""Scoring answer files into paired statistics, and the reports rendered from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemed_cli.data.records import QuestionRecord
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.eval.report import write_report
from finemed_cli.eval.results import claim_results, file_name
from finemed_cli.eval.score import Labels, Outcome, load_answer_outcomes, rescore, score, source_of_id


def _variant(pattern: str, prefix: str = "medqa-dev-") -> dict[str, Outcome]:
    """'1' right, '0' wrong, '-' unanswered (wrong)."""
    return {f"{prefix}{i}": Outcome(f"{prefix}{i}", None if c == "-" else "A", c == "1") for i, c in enumerate(pattern)}


def test_paired_scores_by_hand() -> None:
    # 10 items: a right on 7, b right on 4; a-only 4 items, b-only 1 item -> McNemar p = 2*(1+5)/32 = 0.375
    a = _variant("1111111000")
    b = _variant("1110000100")
    b["medqa-dev-9"] = Outcome("medqa-dev-9", None, False)
    labels = Labels(department={f"medqa-dev-{i}": ("Cardiology" if i < 5 else "Endocrinology") for i in range(10)})
    s = score({"ttt": a, "no-ttt": b}, labels)
    assert s.items == 10 and s.left_out == {}
    assert s.results["ttt"].accuracy == 0.7 and s.results["no-ttt"].accuracy == 0.4
    assert s.results["no-ttt"].unanswered == 1
    assert s.results["ttt"].by_department["Cardiology"].accuracy == 1.0
    assert s.results["ttt"].by_department["Endocrinology"].accuracy == 0.4
    assert set(s.results["ttt"].by_source) == {"medqa"}
    (c,) = s.comparisons
    assert (c.a_only, c.b_only, c.both, c.neither) == (4, 1, 3, 2)
    assert c.p_value == pytest.approx(0.375) and c.difference == pytest.approx(0.3)
    assert c.b_only_ids == ("medqa-dev-7",) and len(c.a_only_ids) == 4
    lo, hi = c.ci95
    assert lo <= 0.3 <= hi


def test_items_missing_from_a_variant_are_left_out_of_all() -> None:
    a, b = _variant("1111"), _variant("111")
    s = score({"a": a, "b": b})
    assert s.items == 3 and s.left_out == {"a": 1}


def test_answer_files_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "ttt.answers.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "response": "The answer is (A).", "prediction": "A", "answer": "A", "correct": True},
        {"id": "q2", "response": "no idea", "prediction": None, "answer": "B", "correct": False},
        {"id": "q3", "response": "C", "prediction": "C", "answer": "C"},  # no 'correct': computed
        {"id": "q4", "response": "open", "prediction": "insulin"},  # no gold: not scored
    ]) + "\n")
    got = load_answer_outcomes(good)
    assert sorted(got) == ["q1", "q2", "q3"] and got["q3"].correct and got["q2"].prediction is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q1", "response": "x", "prediction": "A"}) + "\n" + json.dumps({"id": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*prediction"):
        load_answer_outcomes(bad)


def test_answer_files_against_a_question_file_extract_again_and_use_its_key(tmp_path: Path) -> None:
    path = tmp_path / "a.answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        # stored with an older extractor (None) and an older key ("A"): the question file decides both
        {"id": "q1", "response": "## Summarization\n**B**", "prediction": None, "answer": "A", "correct": False},
        {"id": "q2", "response": "The answer is (C).", "prediction": "C", "answer": "C", "correct": True},
        {"id": "q9", "response": "The answer is (A).", "prediction": "A", "answer": "A", "correct": True},
    ]) + "\n")
    options = {"A": "Iodine", "B": "Selenium", "C": "Zinc"}
    questions = {"q1": QuestionRecord("q1", "Which?", options, "B"), "q2": QuestionRecord("q2", "Which?", options, "A")}
    got = load_answer_outcomes(path, questions)
    assert sorted(got) == ["q1", "q2"]  # q9 is not among the questions
    assert (got["q1"].prediction, got["q1"].correct) == ("B", True)
    assert (got["q2"].prediction, got["q2"].correct) == ("C", False)


def test_rescore_uses_the_current_answer_key() -> None:
    stale = {"q1": Outcome("q1", "A", False), "q2": Outcome("q2", None, False), "q3": Outcome("q3", "B", True)}
    got = rescore(stale, {"q1": "A", "q2": "B", "q3": None})
    assert got == {"q1": Outcome("q1", "A", True), "q2": Outcome("q2", None, False)}


@pytest.mark.parametrize(("item_id", "source"), [
    ("medqa-dev-12", "medqa"), ("mmlu_pro-7", "mmlu_pro"), ("mmlu-anatomy-3", "mmlu"), ("pubmedqa-1", "pubmedqa"),
    ("medqa_usmle-3", "medqa"), ("custom_set-4", "custom"), ("-1", "unknown"),
])
def test_source_of_id(item_id: str, source: str) -> None:
    assert source_of_id(item_id) == source


def test_variant_file_names_are_distinct() -> None:
    names = ["ttt", "no-ttt", "ttt@runs/a b", "ttt@runs/a_b", "ttt@runs/a/b"]
    files = [file_name(n) for n in names]
    assert files[:2] == ["ttt", "no-ttt"] and len(set(files)) == len(files)
    assert all("/" not in f and " " not in f for f in files)


def test_results_are_resumed_only_under_the_settings_they_were_made_with(tmp_path: Path) -> None:
    path = tmp_path / "loglik" / "no-ttt.jsonl"
    path.parent.mkdir()
    settings = {"variant": "no-ttt", "model": "m", "dtype": "bfloat16", "seed": 0, "ttt": "off"}
    claim_results(path, settings)  # nothing written yet: the settings are recorded
    path.write_text('{"id": "q1"}\n')
    claim_results(path, dict(settings))  # same settings: resumed
    with pytest.raises(ConfigError, match=r"dtype='bfloat16', seed=0; this run has dtype='float32', seed=5.*delete"):
        claim_results(path, {**settings, "dtype": "float32", "seed": 5})
    path.write_text("")  # an empty results file holds nothing to protect: new settings are taken
    claim_results(path, {**settings, "seed": 5})
    path.write_text('{"id": "q1"}\n')
    with pytest.raises(ConfigError):
        claim_results(path, settings)
    path.write_text('{"id": "q')  # only a torn line (cut on resume): nothing to protect
    claim_results(path, settings)
    path.write_text('{"id": "q1"}\n')
    path.with_name("no-ttt.settings.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON; delete it"):
        claim_results(path, settings)


def test_report_files(tmp_path: Path) -> None:
    labels = Labels(source={f"q{i}": ("medqa" if i % 2 else "pubmedqa") for i in range(8)},
                    department={f"q{i}": ("Cardiology" if i < 4 else None) for i in range(8)})
    s = score({"ttt": _variant("11011010", "q"), "no-ttt": _variant("10010010", "q")}, labels)
    paths = write_report(tmp_path, {"mode": "generate", "seed": 0, "title": "test"}, s)
    body = json.loads(paths["json"].read_text())
    assert body["config"]["mode"] == "generate" and "torch" in body["versions"]
    assert body["results"]["ttt"]["accuracy"] == 0.625
    md = paths["md"].read_text()
    assert "| ttt | 62.5 |" in md and "| no-ttt | 37.5 |" in md and "McNemar" in md
    assert "| pubmedqa | 4 |" in md and "| unknown | 4 |" in md
    for key in ("accuracy_png", "source_png", "department_png"):
        assert paths[key].stat().st_size > 5000, key


def test_held_out_records_never_get_themselves_or_a_copy_as_neighbour() -> None:
    from types import SimpleNamespace as NS

    from finemed_cli.retrieval.index import neighbours

    records = [NS(id="r1", question="Which drug reverses heparin?"), NS(id="copy", question="which drug reverses HEPARIN"),
               NS(id="r2", question="Which drug reverses warfarin?"), NS(id="r3", question="Dose of protamine?")]

    class Index:
        def search(self, vectors, k):
            return [[NS(record=r) for r in records[:k]] for _ in vectors]

    embedder = NS(encode=lambda texts: list(texts))
    held_out = neighbours(Index(), embedder, ["Which drug reverses heparin?"], 2, exclude=["r1"])
    assert [n.record.id for n in held_out[0]] == ["r2", "r3"]
    assert [n.record.id for n in neighbours(Index(), embedder, ["Which drug reverses heparin?"], 2)[0]] == ["r1", "copy"]


def test_full_mmlu_files_keep_their_medical_subjects(tmp_path: Path) -> None:
    from finemed_cli.eval.benchmarks import BenchmarkItem
    from finemed_cli.eval.items import medical_only

    def item(i: int, source: str, subject: str | None) -> BenchmarkItem:
        return BenchmarkItem(QuestionRecord(f"{source}-{i}", "Which?", {"A": "x", "B": "y"}, "A"), source, subject)

    items = [item(1, "mmlu", "anatomy"), item(2, "mmlu", "astronomy"), item(3, "mmlu", "Clinical Knowledge"),
             item(4, "mmlu_pro", "health"), item(5, "mmlu_pro", "law"), item(6, "medmcqa", "Pharmacology"),
             item(7, "mmlu", None)]
    assert [it.question.id for it in medical_only(tmp_path / "f.jsonl", items)] == [
        "mmlu-1", "mmlu-3", "mmlu_pro-4", "medmcqa-6", "mmlu-7"]
    with pytest.raises(DataError, match=r"f.jsonl: none of its subjects is medical.*--subjects all"):
        medical_only(tmp_path / "f.jsonl", [items[1], items[4]])
