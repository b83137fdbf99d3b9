"""The synth stages' prompts and output schemas, versioned: every output record names the version it was
made with, so data made by different prompt versions can be told apart. Written for finemed."""

from __future__ import annotations

from typing import Any

from finemed_cli.synth.taxonomy import DEPARTMENTS

VERSION = "finemed-synth-v1"
SCORES = list(range(1, 11))

SCORE_SYSTEM = (
    "You are a strict reviewer of medical exam and training questions. Rate the question on three 1-10 "
    "scales and say whether it depends on a specific case that is not described in it. Reply with JSON only."
)
SCORE_USER = (
    "Question:\n{question}\n\n"
    "quality: 1 = unclear, wrong or not answerable; 10 = precise, self-contained, clinically sound.\n"
    "complexity: 1 = a single recalled fact; 10 = multi-step clinical reasoning (differential diagnosis, "
    "weighing findings, choosing among treatments).\n"
    "relevance: 1 = not about medicine; 10 = squarely about medicine or health care.\n"
    "case_specific: true if the question refers to a patient, table or text the reader cannot see."
)
SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"quality": {"enum": SCORES}, "complexity": {"enum": SCORES}, "relevance": {"enum": SCORES},
                   "case_specific": {"type": "boolean"}},
    "required": ["quality", "complexity", "relevance", "case_specific"],
}

CLASSIFY_SYSTEM = (
    "You sort medical questions into the hospital department that would handle them. Reply with JSON only."
)
CLASSIFY_USER = "Question:\n{question}\n\nChoose the department (for internal medicine, the sub-department)."


def labels() -> list[str]:
    """Every valid (department, sub-department) pair as one label: one enum in the schema, so the grammar
    cannot produce a sub-department of the wrong department."""
    out = []
    for dept, subs in DEPARTMENTS.items():
        out += [f"{dept} / {s}" for s in subs] + ([f"{dept} / other"] if subs else [dept])
    return out


def split_label(label: str) -> tuple[str, str | None]:
    dept, _, sub = label.partition(" / ")
    return dept, (None if sub in ("", "other") else sub)


CLASSIFY_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"department": {"enum": labels()}}, "required": ["department"],
}


def score_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SCORE_SYSTEM},
            {"role": "user", "content": SCORE_USER.format(question=question.strip())}]


def classify_messages(question: str) -> list[dict[str, str]]:
    user = CLASSIFY_USER.format(question=question.strip())
    return [{"role": "system", "content": CLASSIFY_SYSTEM}, {"role": "user", "content": user}]


QUESTIONS_SYSTEM = (
    "You write medical exam and training questions. Each question must stand alone: a reader who never sees "
    "the source text can understand and answer it. Reply with JSON only."
)
QUESTIONS_USER = (
    "Source text:\n{text}\n\nWrite two different questions that this text helps answer. Give any patient "
    "details the question needs inside the question itself; do not say 'the text' or 'the passage'."
)
QUESTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"questions": {"type": "array", "items": {"type": "string", "minLength": 15},
                                 "minItems": 2, "maxItems": 2}},
    "required": ["questions"],
}

RESPOND_SYSTEM = (
    "You are a careful medical expert. First write '## Thought' and reason step by step: the key facts, the "
    "candidate answers, and checks of your own reasoning, revising where a check fails. Then write "
    "'## Summarization' and give the answer briefly. For a multiple-choice question end with: the answer is "
    "(X)."
)
COLD_START_SYSTEM = "Answer the medical question."


def questions_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": QUESTIONS_SYSTEM},
            {"role": "user", "content": QUESTIONS_USER.format(text=text.strip())}]


def question_text(rec: dict[str, Any]) -> str:
    """The question as the responder sees it: with lettered options when the record has them."""
    q = rec["question"].strip()
    options = rec.get("options")
    if isinstance(options, dict) and options:
        q += "\n\nOptions:\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return q


def respond_messages(rec: dict[str, Any], system: str | None = RESPOND_SYSTEM) -> list[dict[str, str]]:
    """The responder's turn: `system` None leaves the system turn to the chat template."""
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": question_text(rec)}]


def cold_start_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": COLD_START_SYSTEM}, {"role": "user", "content": question_text(rec)}]


REWARD_SYSTEM = (
    "You grade answers to medical questions. Judge the response on correctness first, then on the quality of "
    "its reasoning (sound steps, no contradictions, a clear conclusion). Reply with JSON only."
)
REWARD_USER = (
    "Question:\n{question}\n\nResponse:\n{response}\n\n"
    "score: 1 = wrong or unreasoned; 10 = correct, with clear and sound reasoning."
)
REWARD_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"score": {"enum": SCORES}}, "required": ["score"],
}


def reward_messages(question: str, response: str) -> list[dict[str, str]]:
    user = REWARD_USER.format(question=question.strip(), response=response.strip())
    return [{"role": "system", "content": REWARD_SYSTEM}, {"role": "user", "content": user}]
