"""`synth score` and `synth classify`: a local model as judge, its output constrained to the schema.

- score: the question as shown (with its options) is rated for quality (1-10), complexity (1-10), medical
  relevance (1-6) and whether it is case-specific, as the reference does.
- classify: the source text (the question itself when a record has none) gets its department and then,
  asked again with that department's sub-departments and "None", its sub-department — the reference's two
  steps. The text is cut at its end to fit the judge's context, as the reference cuts its texts.
"""

from __future__ import annotations

from typing import Any

from finemed_cli.synth import prompts
from finemed_cli.synth.llm import StructuredError, TextModel, ask_json, fit_text
from finemed_cli.synth.stage import Reject
from finemed_cli.synth.taxonomy import NONE

CLASSIFY_TOKENS = 48


def scorer(model: TextModel, retries: int = 3) -> Any:
    def score(rec: dict[str, Any]) -> dict[str, Any]:
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise Reject("no 'question' text to judge")
        try:
            value, tries = ask_json(model, prompts.score_messages(prompts.shown(rec)), prompts.SCORE_SCHEMA,
                                    retries=retries, max_tokens=96)
        except StructuredError as e:
            raise Reject(str(e)) from None
        return {**rec, **value, "judge": {"model": model.name, "prompt": prompts.VERSION, "tries": tries}}

    return score


def classified_text(rec: dict[str, Any]) -> tuple[str, str]:
    """(what is classified, which field it is): the source text, else the question as shown."""
    text = rec.get("text")
    if isinstance(text, str) and text.strip():
        return text, "text"
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise Reject("no 'text' or 'question' to classify")
    return prompts.shown(rec), "question"


def classifier(model: TextModel, retries: int = 3) -> Any:
    def ask(messages: Any, schema: dict[str, Any], key: str) -> tuple[str, int]:
        try:
            value, tries = ask_json(model, messages, schema, retries=retries, max_tokens=CLASSIFY_TOKENS)
        except StructuredError as e:
            raise Reject(f"{key}: {e}") from None
        return value[key], tries

    def classify(rec: dict[str, Any]) -> dict[str, Any]:
        text, on = classified_text(rec)
        first, _ = fit_text(model, prompts.department_messages, text, CLASSIFY_TOKENS)
        department, t1 = ask(first, prompts.DEPARTMENT_SCHEMA, "department")
        second, _ = fit_text(model, lambda t: prompts.subdepartment_messages(t, department), text, CLASSIFY_TOKENS)
        sub, t2 = ask(second, prompts.subdepartment_schema(department), "subdepartment")
        made = {"model": model.name, "prompt": prompts.VERSION, "tries": t1 + t2, "on": on, "steps": [department, sub]}
        return {**rec, "department": department, "subdepartment": None if sub == NONE else sub, "classifier": made}

    return classify


def reward_score(model: TextModel, question: str, response: str, retries: int = 3) -> tuple[int, int]:
    """A generative judge's 1-10 score of one response, and the tries it took (the reference scores with a
    reward model's scalar; any instruction GGUF stands in here). No valid score is the record's Reject."""
    try:
        value, tries = ask_json(model, prompts.reward_messages(question, response), prompts.REWARD_SCHEMA,
                                retries=retries, max_tokens=16)
    except StructuredError as e:  # ContextOverflow too: the response exceeds the judge's context
        raise Reject(f"reward model: {e}") from None
    return value["score"], tries
