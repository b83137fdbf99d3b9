"""`synth score` and `synth classify`: a local model as judge, its output constrained to the schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finemed_cli.synth import prompts
from finemed_cli.synth.llm import StructuredError, TextModel, ask_json
from finemed_cli.synth.stage import Reject


def _judge(model: TextModel, retries: int, messages: Callable[[str], Any], schema: dict[str, Any],
           max_tokens: int, key: str, fields: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A stage function: ask the judge about the record's question, add `fields(reply)` and a `key` entry
    saying which model and prompt version judged it in how many tries."""

    def judge(rec: dict[str, Any]) -> dict[str, Any]:
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise Reject("no 'question' text to judge")
        try:
            value, tries = ask_json(model, messages(q), schema, retries=retries, max_tokens=max_tokens)
        except StructuredError as e:
            raise Reject(str(e)) from None
        return {**rec, **fields(value), key: {"model": model.name, "prompt": prompts.VERSION, "tries": tries}}

    return judge


def scorer(model: TextModel, retries: int = 3) -> Any:
    return _judge(model, retries, prompts.score_messages, prompts.SCORE_SCHEMA, 96, "judge", lambda v: v)


def classifier(model: TextModel, retries: int = 3) -> Any:
    def fields(value: dict[str, Any]) -> dict[str, Any]:
        department, sub = prompts.split_label(value["department"])
        return {"department": department, "subdepartment": sub}

    return _judge(model, retries, prompts.classify_messages, prompts.CLASSIFY_SCHEMA, 48, "classifier", fields)
