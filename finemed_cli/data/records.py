"""The record types of DESIGN.md's contracts, with validation that names the bad field and the fix."""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from typing import Any

from finemed_cli.data.jsonl import RecordError, read_records

OPTION_LETTERS = string.ascii_uppercase[:10]  # MMLU-Pro style items have up to 10 options (A–J)
_LETTER_IN_PARENS = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")


def _require_str(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise RecordError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__} {value!r:.40}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_int(obj: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(f"field {key!r} must be an integer from {low} to {high}, got {value!r}")
    return value


def _parse_options(value: Any) -> dict[str, str]:
    """Options as {"A": text, …}; a JSON list is accepted and lettered A, B, …."""
    if isinstance(value, list):
        if len(value) > len(OPTION_LETTERS):
            raise RecordError(f"field 'options' has {len(value)} options; at most {len(OPTION_LETTERS)} (A–J)")
        value = dict(zip(OPTION_LETTERS, value, strict=False))
    if not isinstance(value, dict):
        raise RecordError(f"field 'options' must be an object like {{\"A\": \"…\"}}, got {type(value).__name__}")
    if len(value) < 2:
        raise RecordError("field 'options' needs at least two options")
    options: dict[str, str] = {}
    for key, text in value.items():
        if key not in OPTION_LETTERS:
            raise RecordError(
                f"field 'options' has key {key!r}; option keys must be the letters A–J, upper case"
            )
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"field 'options' has an empty or non-string text for option {key!r}")
        options[key] = text
    expected = list(OPTION_LETTERS[: len(options)])
    if sorted(options) != expected:
        raise RecordError(
            f"field 'options' has letters {''.join(sorted(options))}; expected consecutive letters "
            f"{''.join(expected)} starting at A"
        )
    return {k: options[k] for k in expected}


def normalise_letter(value: str) -> str | None:
    """'c', '(C)', 'C.' → 'C'; anything else → None."""
    m = _LETTER_IN_PARENS.match(value.strip())
    return m.group(1).upper() if m else None


@dataclass(frozen=True)
class QuestionRecord:
    """A question to answer: multiple choice (with options), open, or PubMedQA-style (with context)."""

    id: str
    question: str
    options: dict[str, str] | None = None
    answer: str | None = None
    context: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> QuestionRecord:
        rid = _require_str(obj, "id")
        question = _require_str(obj, "question")
        options = _parse_options(obj["options"]) if obj.get("options") is not None else None
        answer = _optional_str(obj, "answer")
        if options is not None and answer is not None:
            letter = normalise_letter(answer)
            if letter is None or letter not in options:
                raise RecordError(
                    f"field 'answer' is {answer!r} but the options are {', '.join(options)}; "
                    "give the letter of the correct option"
                )
            answer = letter
        meta = obj.get("meta")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise RecordError("field 'meta' must be an object")
        return cls(rid, question, options, answer, _optional_str(obj, "context"), meta)


@dataclass(frozen=True)
class CorpusRecord:
    """A reasoning example: a question with its o1-style reasoning (Thought) and answer (Summarization)."""

    id: str
    question: str
    reasoning: str
    answer: str
    department: str | None = None
    subdepartment: str | None = None
    quality: int | None = None
    complexity: int | None = None
    options: dict[str, str] | None = None  # a multiple-choice example's options: "the answer is (C)" needs them

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CorpusRecord:
        return cls(
            id=_require_str(obj, "id"),
            question=_require_str(obj, "question"),
            reasoning=_require_str(obj, "reasoning"),
            answer=_require_str(obj, "answer"),
            department=_optional_str(obj, "department"),
            subdepartment=_optional_str(obj, "subdepartment"),
            quality=_optional_int(obj, "quality", 1, 10),
            complexity=_optional_int(obj, "complexity", 1, 10),
            options=_parse_options(obj["options"]) if obj.get("options") is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def load_questions(path: str | os.PathLike[str]) -> list[QuestionRecord]:
    """Read a question file (DESIGN.md contract); raises DataError naming every bad line."""
    return read_records(path, QuestionRecord.from_json)


def load_corpus(path: str | os.PathLike[str]) -> list[CorpusRecord]:
    """Read a corpus of reasoning examples; raises DataError naming every bad line."""
    return read_records(path, CorpusRecord.from_json)
