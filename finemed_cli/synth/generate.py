"""`synth questions`, `synth respond` and `synth pairs`: the stages that write text.

- questions: two self-contained questions per raw text (schema-constrained list of two strings); each keeps
  `source_id`, so `filter` can keep the better of the two.
- respond: an o1-style response (## Thought, then ## Summarization) from the reasoner; one without both
  sections is retried, then rejected. The result is a corpus record (the training and index schema).
- pairs: for a record with options and a gold letter, sampled responses are sorted by whether they reach
  it: chosen reaches it, rejected does not. Otherwise the record's own response is chosen and a cold-start
  reply of the base model (no reasoning format) is rejected, as the paper's DPO cold-start set. With a
  reward model, a local judge scores both sides 1-10 and a pair whose chosen side does not win by the margin
  is rejected with both scores (the paper filters pairs with a reward model; its script does not run).
"""

from __future__ import annotations

import re
from typing import Any

from finemed_cli.synth import prompts
from finemed_cli.synth.llm import StructuredError, TextModel, ask_json
from finemed_cli.synth.stage import Reject

# '## Thought' … '## Summarization' (finemed's headings) or '**Thought**' … '**Summarization**' (FineMedLM-o1's)
_SECTIONS = re.compile(r"(?:#+\s*|\*\*\s*)Thought\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*\n(?P<thought>.*?)\n\s*"
                       r"(?:#+\s*|\*\*\s*)Summari[sz]ation\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*\n(?P<summary>.*)", re.S | re.I)


def questioner(model: TextModel, retries: int = 3) -> Any:
    def make(rec: dict[str, Any]) -> list[dict[str, Any]]:
        text = rec.get("text") or rec.get("content")
        if not isinstance(text, str) or len(text.split()) < 8:
            raise Reject("no 'text' (or fewer than 8 words) to write questions from")
        try:
            value, tries = ask_json(model, prompts.questions_messages(text), prompts.QUESTIONS_SCHEMA,
                                    retries=retries, max_tokens=256)
        except StructuredError as e:
            raise Reject(str(e)) from None
        made = {"model": model.name, "prompt": prompts.VERSION, "tries": tries}
        return [{"id": f"{rec['id']}-q{i + 1}", "source_id": rec["id"], "question": q.strip(), "questioner": made}
                for i, q in enumerate(value["questions"])]

    return make


def split_response(text: str) -> tuple[str, str] | None:
    """(thought, summarization) of an o1-style response, or None when a section is missing or empty."""
    m = _SECTIONS.search(text)
    if not m or not m.group("thought").strip() or not m.group("summary").strip():
        return None
    return m.group("thought").strip(), m.group("summary").strip()


THOUGHT, SUMMARY = "## Thought\n", "\n\n## Summarization\n"


def o1_response(model: TextModel, messages: list[dict[str, str]], max_tokens: int, seed: int = 0,
                temperature: float = 0.0) -> str:
    """An o1-style response in two phases: the model thinks after a written '## Thought' until it writes
    '## Summarization' itself or spends 3/4 of the budget, then the heading is written for it and it
    summarises. Small models that never write the headings still give the format (as `finemed answer
    --thought-tokens` does)."""
    thought = model.generate(messages, seed=seed, max_tokens=max_tokens * 3 // 4, temperature=temperature,
                             prefix=THOUGHT, stop=["## Summarization", "## Summarisation"])
    head = THOUGHT + thought.rstrip() + SUMMARY
    summary = model.generate(messages, seed=seed, max_tokens=max(32, max_tokens // 4), temperature=temperature,
                             prefix=head)
    return head + summary


def responder(model: TextModel, retries: int = 2, max_tokens: int = 1024,
              system: str | None = prompts.RESPOND_SYSTEM) -> Any:
    def respond(rec: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(rec.get("question"), str):
            raise Reject("no 'question'")
        last = ""
        for attempt in range(retries):
            last = o1_response(model, prompts.respond_messages(rec, system), max_tokens, seed=attempt,
                               temperature=0.0 if attempt == 0 else 0.7)
            parts = split_response(last)
            if parts:
                out = {k: rec[k] for k in ("department", "subdepartment", "quality", "complexity", "tier",
                                           "source_id", "options", "gold") if rec.get(k) is not None}
                return {"id": rec["id"], "question": rec["question"], "reasoning": parts[0], "answer": parts[1],
                        **out, "responder": {"model": model.name, "prompt": prompts.VERSION, "tries": attempt + 1}}
        raise Reject(f"no '## Thought' and '## Summarization' sections in {retries} tries; last began "
                     f"{last[:80]!r}")

    return respond


def rewarder(model: TextModel, min_margin: int = 1, retries: int = 3) -> Any:
    """A check on a pair: the judge's 1-10 score of each side; returns the `reward` entry of a kept pair,
    raises Reject when chosen does not beat rejected by `min_margin`."""

    def score(prompt: str, response: str) -> tuple[int, int]:
        try:
            value, tries = ask_json(model, prompts.reward_messages(prompt, response), prompts.REWARD_SCHEMA,
                                    retries=retries, max_tokens=16)
        except StructuredError as e:  # ContextOverflow too: the pair exceeds the judge's context
            raise Reject(f"reward model: {e}") from None
        return value["score"], tries

    def check(pair: dict[str, Any]) -> dict[str, Any]:
        (chosen, t1), (rejected, t2) = score(pair["prompt"], pair["chosen"]), score(pair["prompt"], pair["rejected"])
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
        prompt = prompts.question_text(rec)
        options, gold = rec.get("options"), rec.get("gold")
        if isinstance(options, dict) and gold in (options or {}):
            right, wrong = [], []
            own = format_response(rec["reasoning"], rec["answer"])
            for text in [own] + [o1_response(reasoner, prompts.respond_messages(rec, system), max_tokens, seed=s,
                                             temperature=0.8) for s in range(samples)]:
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
