"""AnswerConfig / TTTConfig validation and defaults, question selection, answer records and prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finemed_cli.config.answer import AnswerConfig, GenerationConfig, TTTConfig
from finemed_cli.data.records import QuestionRecord
from finemed_cli.errors import ConfigError
from finemed_cli.modeling.prompts import format_question, question_messages
from finemed_cli.pipeline.answer import answer_record, select_questions

OPTIONS = {
    "A": "Anti-thyroid peroxidase antibody",
    "B": "TSH receptor-stimulating antibody",
    "C": "Anti-glutamic acid decarboxylase antibody",
    "D": "Anti-thyroglobulin antibody",
}


def _config(**overrides: Any) -> AnswerConfig:
    kwargs: dict[str, Any] = {"questions": Path("q.jsonl"), "output": Path("a.jsonl"), "index": Path("idx")}
    kwargs.update(overrides)
    return AnswerConfig(**kwargs)


# --------------------------------------------------------------------------- AnswerConfig.validate


def test_valid_config_passes() -> None:
    _config().validate()
    _config(index=None, ttt=TTTConfig(mode="off")).validate()
    _config(shard=(3, 4), limit=1).validate()


def test_validate_collects_several_errors_in_one_config_error() -> None:
    config = _config(
        index=None,  # TTT is on by default: needs an index
        shard=(2, 2),
        generation=GenerationConfig(temperature=-0.5),
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    msg = str(info.value)
    assert "shard 2/2 is invalid" in msg
    assert "--index" in msg
    assert "temperature must be >= 0" in msg
    assert msg.count("; ") >= 2


@pytest.mark.parametrize("shard", [(0, 0), (-1, 2), (4, 4), (5, 2)])
def test_bad_shard(shard: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match=f"shard {shard[0]}/{shard[1]} is invalid"):
        _config(shard=shard).validate()


def test_ttt_on_without_index() -> None:
    with pytest.raises(ConfigError, match="--index"):
        _config(index=None, ttt=TTTConfig(mode="paper")).validate()


def test_bad_limit() -> None:
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        _config(limit=0).validate()


def test_ttt_and_generation_errors_are_included() -> None:
    config = _config(
        ttt=TTTConfig(mode="full", k=0, lr=-1.0, rank=0, layers=-1, targets=()),
        generation=GenerationConfig(max_new_tokens=0, top_p=1.5, backend="vllm"),
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    msg = str(info.value)
    for part in ["ttt mode 'full'", "k (neighbours)", "ttt lr", "LoRA rank", "ttt layers", "LoRA targets",
                 "max new tokens", "top-p", "'vllm'"]:
        assert part in msg, part


# --------------------------------------------------------------------------- TTTConfig defaults


def test_ttt_defaults() -> None:
    t = TTTConfig()
    assert t.mode == "lora"
    assert t.validate() == []
    assert t.resolved_steps() == 1
    assert t.resolved_lr() == pytest.approx(3e-3)


def test_ttt_resolved_lr_per_mode() -> None:
    assert TTTConfig(mode="lora").resolved_lr() == pytest.approx(3e-3)
    assert TTTConfig(mode="paper").resolved_lr() == pytest.approx(1e-6)
    assert TTTConfig(mode="paper", lr=2e-5).resolved_lr() == pytest.approx(2e-5)
    assert TTTConfig(steps=4).resolved_steps() == 4


def test_ttt_resolved_layers() -> None:
    t = TTTConfig()
    assert t.resolved_layers(30) == 7
    assert t.resolved_layers(32) == 8
    assert t.resolved_layers(3) == 1
    assert t.resolved_layers(1) == 1
    assert TTTConfig(layers=4).resolved_layers(30) == 4
    assert TTTConfig(layers=50).resolved_layers(30) == 30
    assert TTTConfig(layers=0).resolved_layers(30) == 30  # 0: all of them


def test_ttt_steps_zero_is_an_error() -> None:
    assert any("steps" in e for e in TTTConfig(steps=0).validate())


# --------------------------------------------------------------------------- select_questions


def _questions(n: int) -> list[QuestionRecord]:
    return [QuestionRecord(id=f"q{i:02d}", question=f"Question {i}?") for i in range(n)]


def test_shards_partition_the_questions() -> None:
    qs = _questions(7)
    todo0, total0, skipped0 = select_questions(qs, (0, 2), set(), None)
    todo1, total1, skipped1 = select_questions(qs, (1, 2), set(), None)
    ids0 = [q.id for q in todo0]
    ids1 = [q.id for q in todo1]
    assert ids0 == ["q00", "q02", "q04", "q06"]
    assert ids1 == ["q01", "q03", "q05"]
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == [q.id for q in qs]
    assert (total0, skipped0, total1, skipped1) == (4, 0, 3, 0)


def test_single_shard_is_everything() -> None:
    qs = _questions(5)
    todo, total, skipped = select_questions(qs, (0, 1), set(), None)
    assert todo == qs
    assert (total, skipped) == (5, 0)


def test_done_ids_are_skipped_and_counted() -> None:
    qs = _questions(6)
    done = {"q00", "q03", "q05", "not-in-this-file"}
    todo, total, skipped = select_questions(qs, (0, 1), done, None)
    assert [q.id for q in todo] == ["q01", "q02", "q04"]
    assert (total, skipped) == (6, 3)


def test_done_ids_of_another_shard_are_not_counted() -> None:
    qs = _questions(6)
    todo, total, skipped = select_questions(qs, (1, 2), {"q00", "q01"}, None)
    assert [q.id for q in todo] == ["q03", "q05"]
    assert (total, skipped) == (3, 1)


def test_limit_counts_over_the_shard() -> None:
    qs = _questions(10)
    todo, total, skipped = select_questions(qs, (0, 2), set(), 3)
    assert [q.id for q in todo] == ["q00", "q02", "q04"]
    assert (total, skipped) == (3, 0)
    # A rerun with the same limit after two were answered answers only the third, not two more.
    todo, total, skipped = select_questions(qs, (0, 2), {"q00", "q02"}, 3)
    assert [q.id for q in todo] == ["q04"]
    assert (total, skipped) == (3, 2)
    # Everything within the limit done: nothing to do.
    todo, total, skipped = select_questions(qs, (0, 2), {"q00", "q02", "q04"}, 3)
    assert todo == []
    assert (total, skipped) == (3, 3)


def test_limit_larger_than_shard() -> None:
    todo, total, skipped = select_questions(_questions(3), (1, 2), set(), 10)
    assert [q.id for q in todo] == ["q01"]
    assert (total, skipped) == (1, 0)


# --------------------------------------------------------------------------- answer_record

NEIGHBOURS = [{"id": "c1", "score": 0.8}]
TTT = {"mode": "lora", "steps": 1}
GEN = {"max_new_tokens": 512, "temperature": 0.0}


def _record(q: QuestionRecord, response: str) -> dict[str, Any]:
    return answer_record(q, response, NEIGHBOURS, TTT, GEN, "tiny-model", 7, None)


def _mc(answer: str | None = "B") -> QuestionRecord:
    return QuestionRecord.from_json({"id": "mc1", "question": "Which antibody?", "options": OPTIONS,
                                     "answer": answer})


def test_answer_record_mc_correct() -> None:
    rec = _record(_mc("B"), "## Thought\n...\n## Summarization\nGraves disease: the answer is (B).")
    assert rec["id"] == "mc1"
    assert rec["prediction"] == "B"
    assert rec["answer"] == "B"
    assert rec["correct"] is True
    assert rec["neighbours"] == NEIGHBOURS
    assert rec["ttt"] == TTT
    assert rec["generation"] == GEN
    assert rec["model"] == "tiny-model"
    assert rec["seed"] == 7
    assert rec["response"].endswith("the answer is (B).")


def test_answer_record_mc_wrong() -> None:
    rec = _record(_mc("B"), "## Summarization\nthe answer is (A).")
    assert rec["prediction"] == "A"
    assert rec["correct"] is False


def test_answer_record_letter_naming_another_options_text_is_flagged_and_wrong() -> None:
    rec = _record(_mc("B"), "The correct answer is B. Anti-glutamic acid decarboxylase antibody.")
    assert rec["prediction"] == "B"  # the letter, as written
    assert rec["disagreement"] == {"letter": "B", "text": "C"}
    assert rec["correct"] is False  # as `finemed eval` scores it without --trust-letter
    assert "disagreement" not in _record(_mc("B"), "The correct answer is B. TSH receptor-stimulating antibody.")


def test_answer_record_prediction_none_when_no_commitment() -> None:
    rec = _record(_mc("B"), "I am not sure; several options seem plausible.")
    assert rec["prediction"] is None
    assert rec["correct"] is False


def test_answer_record_mc_without_gold_has_no_answer_or_correct() -> None:
    rec = _record(_mc(None), "the answer is (C)")
    assert rec["prediction"] == "C"
    assert "answer" not in rec
    assert "correct" not in rec


def test_answer_record_open_question_has_no_correct() -> None:
    q = QuestionRecord.from_json({"id": "open1", "question": "Antidote to paracetamol?",
                                  "answer": "N-acetylcysteine"})
    rec = _record(q, "## Thought\nGlutathione depletion.\n\n## Summarization\nN-acetylcysteine.")
    assert rec["prediction"] == "N-acetylcysteine."
    assert rec["answer"] == "N-acetylcysteine"
    assert "correct" not in rec


def test_answer_record_open_question_empty_response() -> None:
    q = QuestionRecord(id="open2", question="Why?")
    rec = _record(q, "   ")
    assert rec["prediction"] is None
    assert "answer" not in rec and "correct" not in rec


# --------------------------------------------------------------------------- prompts.format_question


def test_format_question_context_question_options_in_order() -> None:
    q = QuestionRecord.from_json({
        "id": "p1",
        "question": "  Can tailored interventions increase mammography use?  ",
        "context": "\nBACKGROUND: Telephone counseling was compared with print.\n",
        "options": {"C": "maybe", "A": "yes", "B": "no"},
    })
    text = format_question(q)
    assert text == (
        "Context:\nBACKGROUND: Telephone counseling was compared with print.\n\n"
        "Can tailored interventions increase mammography use?\n\n"
        "Options:\nA. yes\nB. no\nC. maybe"
    )


def test_format_question_list_options_are_lettered() -> None:
    q = QuestionRecord.from_json({"id": "t", "question": "Antidote?",
                                  "options": ["Naloxone", "N-acetylcysteine", "Fomepizole"]})
    text = format_question(q)
    assert "Context" not in text
    assert text.index("A. Naloxone") < text.index("B. N-acetylcysteine") < text.index("C. Fomepizole")
    assert text.startswith("Antidote?\n\nOptions:\n")


def test_format_question_open_has_no_options_block() -> None:
    assert format_question(QuestionRecord(id="o", question="Why is the sky blue?")) == "Why is the sky blue?"


def test_question_messages_roles() -> None:
    q = QuestionRecord(id="o", question="Why?")
    msgs = question_messages(q, system="SYS")
    assert msgs == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Why?"}]


@pytest.mark.parametrize(("config", "message"), [
    (TTTConfig(lr=float("nan")), "ttt lr must be a positive number"),
    (TTTConfig(lr=float("inf")), "ttt lr must be a positive number"),
    (TTTConfig(alpha=float("nan")), "ttt alpha must be a positive number"),
    (TTTConfig(alpha=0.0), "ttt alpha must be a positive number"),
    (GenerationConfig(temperature=float("nan")), "temperature must be >= 0, got nan"),
])
def test_library_configs_refuse_numbers_that_are_not_numbers(config, message) -> None:
    """Library callers (a YAML file, `ttt(lr=nan)`) do not pass through the CLI's finite-float type."""
    assert any(message in e for e in config.validate())
