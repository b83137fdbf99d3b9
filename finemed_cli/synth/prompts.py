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
