"""`synth questions` and `synth pairs`, and the o1-style generation `respond` shares with `pairs`.

- questions: two self-contained questions per raw text (a schema-constrained list of two strings), each
  keeping `source_id` and the text itself, so that `filter` keeps the better of the two and `classify` and
  `respond` see the text. A raw record that already holds a question (an exam item, with its options and
  answer letter) is taken as it is: one question, its `text` (if any) kept for grounding.
- pairs: for a record with options and a gold letter, sampled responses are sorted by whether they reach
  it: chosen reaches it, rejected does not. Otherwise the record's own response is chosen and a cold-start
  reply of the base model (no reasoning format) is rejected, as the paper's DPO cold-start set. finemed can
  also check each pair with a reward model (`reward_pairs`): a local judge scores both sides 1-10 and a pair
  whose chosen side does not win by the margin is rejected. That check is finemed's: the reference uses its
  reward model on the common tier's two candidates (synth/respond.py), not on DPO pairs.
"""

from __future__ import annotations

import re
from typing import Any

from finemed_cli.data.jsonl import RecordError
from finemed_cli.data.records import QuestionRecord
from finemed_cli.synth import prompts
from finemed_cli.synth.judge import reward_score
from finemed_cli.synth.llm import StructuredError, TextModel, ask_json, fit_text
from finemed_cli.synth.stage import Reject

# '## Thought' … '## Summarization' (finemed's headings) or '**Thought**' … '**Summarization**' (FineMedLM-o1's)
_SECTIONS = re.compile(r"(?:#+\s*|\*\*\s*)Thought\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*\n(?P<thought>.*?)\n\s*"
                       r"(?:#+\s*|\*\*\s*)Summari[sz]ation\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*\n(?P<summary>.*)", re.S | re.I)
QUESTION_TOKENS = 256


def is_given(rec: dict[str, Any]) -> bool:
    """A raw record that brings its own question (no questions are written for it)."""
    return isinstance(rec.get("question"), str)


def questions_done_key(rec: dict[str, Any]) -> str:
    """The output id that marks a raw record done: its own id when given, else its first question's."""
    return rec["id"] if is_given(rec) else f"{rec['id']}-q1"


def given_question(rec: dict[str, Any]) -> dict[str, Any]:
    """A raw record's own question, checked as `finemed answer` checks questions (options lettered A.., the
    answer one of their letters), with the answer letter kept as `gold` for `pairs`."""
    try:
        q = QuestionRecord.from_json(rec)
    except RecordError as e:
        raise Reject(f"its question is not usable: {e}") from None
    text = rec.get("text")
    out: dict[str, Any] = {"id": q.id, "source_id": q.id, "question": q.question, "given": True}
    if q.options:
        out["options"] = q.options
        if q.answer:
            out["gold"] = q.answer
    if isinstance(text, str) and text.strip():
        out["text"] = text
    return out


def questioner(model: TextModel, retries: int = 3) -> Any:
    def make(rec: dict[str, Any]) -> list[dict[str, Any]]:
        if is_given(rec):
            return [given_question(rec)]
        text = rec.get("text") or rec.get("content")
        if not isinstance(text, str) or len(text.split()) < 8:
            raise Reject("no 'text' (or fewer than 8 words) to write questions from, and no 'question'")
        try:
            messages, _ = fit_text(model, prompts.questions_messages, text, QUESTION_TOKENS)
            value, tries = ask_json(model, messages, prompts.QUESTIONS_SCHEMA, retries=retries,
                                    max_tokens=QUESTION_TOKENS)
        except StructuredError as e:
            raise Reject(str(e)) from None
        made = {"model": model.name, "prompt": prompts.VERSION, "tries": tries}
        return [{"id": f"{rec['id']}-q{i + 1}", "source_id": rec["id"], "question": q.strip(), "text": text,
                 "questioner": made} for i, q in enumerate(value["questions"])]

    return make


def split_response(text: str) -> tuple[str, str] | None:
    """(thought, summarization) of an o1-style response, or None when a section is missing or empty."""
    m = _SECTIONS.search(text)
    if not m or not m.group("thought").strip() or not m.group("summary").strip():
        return None
    return m.group("thought").strip(), m.group("summary").strip()


THOUGHT, SUMMARY = "## Thought\n", "\n\n## Summarization\n"
O1_MARGIN = 32  # the summary phase is given at least this many tokens (see o1_response)


def o1_response(model: TextModel, messages: list[dict[str, str]], max_tokens: int, seed: int = 0,
                temperature: float = 0.0) -> str:
    """An o1-style response in two phases: the model thinks after a written '## Thought' until it writes
    '## Summarization' itself or spends 3/4 of the budget, then the heading is written for it and it
    summarises. Small models that never write the headings still give the format (as `finemed answer
    --thought-tokens` does)."""
    thought = model.generate(messages, seed=seed, max_tokens=max_tokens * 3 // 4, temperature=temperature,
                             prefix=THOUGHT, stop=["## Summarization", "## Summarisation"])
    head = THOUGHT + thought.rstrip() + SUMMARY
    summary = model.generate(messages, seed=seed, max_tokens=max(O1_MARGIN, max_tokens // 4),
                             temperature=temperature, prefix=head)
    return head + summary


def grounded_o1_messages(model: TextModel, rec: dict[str, Any], max_tokens: int,
                         system: str | None) -> tuple[list[dict[str, str]], int]:
    """The reasoner's prompt for a record: its question (with options) and its source text, cut to fit."""
    text = rec.get("text") if isinstance(rec.get("text"), str) else ""
    return fit_text(model, lambda t: prompts.complex_messages(rec, t, system), text, max_tokens + O1_MARGIN)


def rewarder(model: TextModel, min_margin: int = 1, retries: int = 3) -> Any:
    """A check on a pair: the judge's 1-10 score of each side; returns the `reward` entry of a kept pair,
    raises Reject when chosen does not beat rejected by `min_margin`."""

    def check(pair: dict[str, Any]) -> dict[str, Any]:
        (chosen, t1) = reward_score(model, pair["prompt"], pair["chosen"], retries)
        (rejected, t2) = reward_score(model, pair["prompt"], pair["rejected"], retries)
        if chosen - rejected < min_margin:
            raise Reject(f"reward model scores chosen {chosen}, rejected {rejected}: below the margin of {min_margin}")
        return {"chosen": chosen, "rejected": rejected, "model": model.name, "prompt": prompts.VERSION,
                "tries": t1 + t2}

    return check


def pairer(reasoner: TextModel, base: TextModel, samples: int = 4, max_tokens: int = 1024,
           reward: Any = None, system: str | None = prompts.RESPOND_SYSTEM) -> Any:
    """The pairs stage; `reward` (a `rewarder`) checks every pair when given."""
    from finemed_cli.generate.extract import extract_choice
    from finemed_cli.modeling.prompts import format_response

    def pair(rec: dict[str, Any]) -> dict[str, Any]:
        out = make(rec)
        if reward is not None:
            out["reward"] = reward(out)
        return out

    def make(rec: dict[str, Any]) -> dict[str, Any]:
        for key in ("question", "reasoning", "answer"):
            if not isinstance(rec.get(key), str):
                raise Reject(f"no '{key}': pairs are made from corpus records (run `synth respond` first)")
        prompt = prompts.shown(rec)
        options, gold = rec.get("options"), rec.get("gold")
        if isinstance(options, dict) and gold in (options or {}):
            right, wrong = [], []
            messages, _ = grounded_o1_messages(reasoner, rec, max_tokens, system)
            own = format_response(rec["reasoning"], rec["answer"])
            for text in [own] + [o1_response(reasoner, messages, max_tokens, seed=s, temperature=0.8)
                                 for s in range(samples)]:
                (right if extract_choice(text, options) == gold else wrong).append(text)
            if not right or not wrong:
                raise Reject(f"{len(right)} of {len(right) + len(wrong)} responses reach the gold answer "
                             f"{gold}: a pair needs one of each")
            return {"id": rec["id"], "prompt": prompt, "chosen": right[0], "rejected": wrong[0], "kind": "gold"}
        cold = base.generate(prompts.cold_start_messages(rec), seed=0, max_tokens=max_tokens // 2)
        if not cold.strip():
            raise Reject("the base model's cold-start reply is empty")
        return {"id": rec["id"], "prompt": prompt, "chosen": format_response(rec["reasoning"], rec["answer"]),
                "rejected": cold.strip(), "kind": "cold-start"}

    return pair
