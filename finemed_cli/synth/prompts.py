"""The synth stages' prompts and output schemas, versioned: every output record names the version it was
made with, so data made by different prompt versions can be told apart.

Each step follows the FineMed reference code (what the model is asked, on what input, with which scale) and
every sentence is written for finemed; `source_text` is the raw text a question was made from, shown to the
writer of its answer as the reference does (its responses are grounded in the text, not written from memory).
"""

from __future__ import annotations

from typing import Any

from finemed_cli.modeling.prompts import question_text
from finemed_cli.synth.taxonomy import DEPARTMENTS, NONE, subdepartments

VERSION = "finemed-synth-v2"
TEN = list(range(1, 11))
RELEVANCE = list(range(1, 7))  # the reference rates medical relevance on 1-6, quality and complexity on 1-10


def shown(rec: dict[str, Any]) -> str:
    """A record's question as every prompt shows it: with its lettered options when it has them."""
    options = rec.get("options")
    return question_text(rec["question"], options if isinstance(options, dict) else None)


def _turns(system: str | None, user: str) -> list[dict[str, str]]:
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]


# --- questions: two per raw text ---------------------------------------------------------------------------
QUESTIONS_SYSTEM = "You write questions for training medical language models. Reply with JSON only."
QUESTIONS_USER = (
    "Source text:\n{text}\n\n"
    "Write two questions drawn from the main points of this text. They may be open-ended, ask about a detail or "
    "take a wider view of the subject, and they must:\n"
    "- ask different things, so that together they cover more of the text;\n"
    "- stand alone: someone who never reads the text can understand and answer them, so put any background "
    "they need into the question itself;\n"
    "- not hinge on the particular patients, people or studies the text describes;\n"
    "- ask for more than one recalled word."
)
QUESTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"questions": {"type": "array", "items": {"type": "string", "minLength": 15},
                                 "minItems": 2, "maxItems": 2}},
    "required": ["questions"],
}


def questions_messages(text: str) -> list[dict[str, str]]:
    return _turns(QUESTIONS_SYSTEM, QUESTIONS_USER.format(text=text.strip()))


# --- score: the reference's four judgements, each on its banded scale ---------------------------------------
SCORE_SYSTEM = "You review questions written for training medical language models. Reply with JSON only."
SCORE_USER = (
    "Question:\n{question}\n\n"
    "Judge it on four points.\n"
    "quality, 1-10: is it worded clearly and correctly?\n"
    "  9-10 precise, nothing ambiguous; 7-8 clear, at most a trace of ambiguity; 5-6 mostly clear, some "
    "ambiguity; 3-4 vague, the ambiguity is plain; 1-2 hard to make sense of, or a statement that asks nothing.\n"
    "complexity, 1-10: how hard is it to understand and answer?\n"
    "  9-10 specialist knowledge and multi-step analysis; 7-8 some specialist knowledge and analysis; 5-6 "
    "general knowledge and a little analysis; 3-4 basic knowledge is enough; 1-2 no special knowledge at all.\n"
    "relevance, 1-6: how medical is it?\n"
    "  5-6 wholly medical, full of medical terms; 3-4 touches a medical field; 1-2 hardly medical.\n"
    "case_specific, true or false: does it rely on details of a particular case, patient or text that it does "
    "not itself give?"
)
SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"quality": {"enum": TEN}, "complexity": {"enum": TEN}, "relevance": {"enum": RELEVANCE},
                   "case_specific": {"type": "boolean"}},
    "required": ["quality", "complexity", "relevance", "case_specific"],
}


def score_messages(question: str) -> list[dict[str, str]]:
    return _turns(SCORE_SYSTEM, SCORE_USER.format(question=question.strip()))


# --- classify: department, then sub-department, of the source text -----------------------------------------
CLASSIFY_SYSTEM = "You are a physician who sorts medical texts by hospital department. Reply with JSON only."
DEPARTMENT_USER = (
    "Text:\n{text}\n\nWhich hospital department does this text belong to, judged by its main subject?\n"
    "{choices}"
)
SUBDEPARTMENT_USER = (
    "Text:\n{text}\n\nThis text belongs to {department}. Which of its sub-departments fits the main subject "
    "best? Answer \"" + NONE + "\" if none of them does.\n{choices}"
)


def _choices(described: dict[str, str]) -> str:
    return "\n".join(f"- {name}: {what}" for name, what in described.items())


def department_messages(text: str) -> list[dict[str, str]]:
    choices = _choices({name: what for name, (what, _) in DEPARTMENTS.items()})
    return _turns(CLASSIFY_SYSTEM, DEPARTMENT_USER.format(text=text.strip(), choices=choices))


def subdepartment_messages(text: str, department: str) -> list[dict[str, str]]:
    user = SUBDEPARTMENT_USER.format(text=text.strip(), department=department,
                                     choices=_choices(subdepartments(department)))
    return _turns(CLASSIFY_SYSTEM, user)


DEPARTMENT_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"department": {"enum": list(DEPARTMENTS)}}, "required": ["department"]}


def subdepartment_schema(department: str) -> dict[str, Any]:
    """One department's sub-departments and "None": the grammar cannot name another department's."""
    return {"type": "object", "properties": {"subdepartment": {"enum": [*subdepartments(department), NONE]}},
            "required": ["subdepartment"]}


# --- respond: the common tier (instruction model, plain answers) and the complex tier (reasoner, o1) --------
def _question_and_text(rec: dict[str, Any], text: str) -> str:
    background = f"\n\nBackground text:\n{text.strip()}" if text.strip() else ""
    return f"Question:\n{shown(rec)}{background}"


# The reference asks for both candidates in one JSON reply; finemed asks for each on its own, in its own
# style, so that a long first answer cannot eat the second one's budget (a grammar cannot cap a string's
# length cheaply) and a small model is not asked to escape long prose into JSON.
COMMON_STYLES = (
    "Structure the answer as clear steps or short sections.",
    "Write the answer as connected prose, as an expert would explain it to a colleague.",
)
COMMON_USER = (
    "{body}\n\nAnswer the question completely and accurately. Take the facts you need from the background text, "
    "but write as an expert who knows them: do not mention the text. Explain each step so that the reader "
    "can follow it. {style}{choice}"
)
CHOICE_END = " It is a multiple-choice question: end with \"the answer is (X)\", X being the option's letter."


def common_messages(rec: dict[str, Any], text: str, style: int) -> list[dict[str, str]]:
    choice = CHOICE_END if rec.get("options") else ""
    return _turns(None, COMMON_USER.format(body=_question_and_text(rec, text), style=COMMON_STYLES[style],
                                           choice=choice))


RESPOND_SYSTEM = (
    "You are a careful medical expert. First write '## Thought' and reason step by step: the key facts, the "
    "candidate answers, and checks of your own reasoning, revising where a check fails. Then write "
    "'## Summarization' and give the answer briefly. For a multiple-choice question end with: the answer is "
    "(X)."
)
COMPLEX_USER = (
    "{body}\n\nWork through this question at length before you answer: analyse it, explore the possibilities, "
    "check each step, and go back and revise where a step fails. Use the background text where it helps, and "
    "state in your reasoning each fact you take from it, as a fact, without referring to the text. Put your "
    "reasoning under '## Thought' and the final answer, drawn from that reasoning, under '## Summarization'."
    "{choice}"
)


def complex_messages(rec: dict[str, Any], text: str, system: str | None = RESPOND_SYSTEM) -> list[dict[str, str]]:
    """The reasoner's turn; `system` None leaves the system turn to the chat template."""
    choice = CHOICE_END if rec.get("options") else ""
    return _turns(system, COMPLEX_USER.format(body=_question_and_text(rec, text), choice=choice))


COLD_START_SYSTEM = "Answer the medical question."


def cold_start_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    return _turns(COLD_START_SYSTEM, shown(rec))


# --- reward: a generative judge's score of one answer (the reference uses a reward model's scalar) -----------
REWARD_SYSTEM = (
    "You grade answers to medical questions. Judge the response on correctness first, then on the quality of "
    "its reasoning (sound steps, no contradictions, a clear conclusion). Reply with JSON only."
)
REWARD_USER = (
    "Question:\n{question}\n\nResponse:\n{response}\n\n"
    "score: 1 = wrong or unreasoned; 10 = correct, with clear and sound reasoning."
)
REWARD_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"score": {"enum": TEN}}, "required": ["score"],
}


def reward_messages(question: str, response: str) -> list[dict[str, str]]:
    return _turns(REWARD_SYSTEM, REWARD_USER.format(question=question.strip(), response=response.strip()))
