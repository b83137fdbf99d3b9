"""`synth respond`: each filtered question answered by its tier's model, in its tier's style, with the source
text it was made from in the prompt (the reference grounds every response in its text).

- complex tier: the reasoner thinks at length in o1 style, '## Thought' then '## Summarization', within
  `complex_max_tokens` (4,096 in the reference, where a QwQ model answers); one without both sections is
  retried, then rejected. The result is a corpus record (the training and index schema) in the output file.
- common tier: the instruction model writes two candidate answers (plain, detailed, each in its own style,
  each within `common_max_tokens`); the reward model scores both and the higher is kept for SFT, a tie
  going to a draw seeded by `seed` and the record's id, as the reference picks at random between equal
  rewards. The result — an instruction/output record (alpaca shape, which `finemed train` reads) with both
  candidates and their scores — goes to the side file: it has no Thought, so it is no o1 corpus record.

Both keep the record's options (and gold letter), departments, scores and source text.
"""

from __future__ import annotations

import random
from typing import Any

from finemed_cli.synth import prompts
from finemed_cli.synth.generate import grounded_o1_messages, o1_response, split_response
from finemed_cli.synth.judge import reward_score
from finemed_cli.synth.llm import TextModel, fit_text
from finemed_cli.synth.stage import Reject, ToSide

CARRIED = ("department", "subdepartment", "quality", "complexity", "relevance", "tier", "source_id", "options",
           "gold", "text")


def _made(model: TextModel, tier: str, tries: int, max_tokens: int, source_tokens: int) -> dict[str, Any]:
    """What the record says about how it was answered; `source_tokens` > 0: the text was in the prompt."""
    return {"model": model.name, "prompt": prompts.VERSION, "tier": tier, "tries": tries, "max_tokens": max_tokens,
            "source_tokens": source_tokens}


def complex_answer(rec: dict[str, Any], reasoner: TextModel, max_tokens: int, system: str | None,
                   retries: int) -> dict[str, Any]:
    messages, used = grounded_o1_messages(reasoner, rec, max_tokens, system)
    last = ""
    for attempt in range(retries):
        last = o1_response(reasoner, messages, max_tokens, seed=attempt, temperature=0.0 if attempt == 0 else 0.7)
        parts = split_response(last)
        if parts:
            return {"id": rec["id"], "question": rec["question"], "reasoning": parts[0], "answer": parts[1],
                    **{k: rec[k] for k in CARRIED if rec.get(k) is not None},
                    "responder": _made(reasoner, "complex", attempt + 1, max_tokens, used)}
    raise Reject(f"no '## Thought' and '## Summarization' sections in {retries} tries; last began {last[:80]!r}")


def _candidate(model: TextModel, rec: dict[str, Any], text: str, style: int, max_tokens: int,
               retries: int) -> tuple[str, int, int]:
    """(answer, tries, source tokens) in `style`; an empty reply is retried with sampling, then rejected."""
    messages, used = fit_text(model, lambda t: prompts.common_messages(rec, t, style), text, max_tokens)
    for attempt in range(retries):
        reply = model.generate(messages, seed=2 * attempt + style, max_tokens=max_tokens,
                               temperature=0.0 if attempt == 0 else 0.7).strip()
        if reply:
            return reply, attempt + 1, used
    raise Reject(f"candidate {style + 1} of the common tier is empty in {retries} tries")


def common_answer(rec: dict[str, Any], instruct: TextModel, reward: TextModel, max_tokens: int, retries: int,
                  seed: int) -> dict[str, Any]:
    text = rec.get("text") if isinstance(rec.get("text"), str) else ""
    made = [_candidate(instruct, rec, text, style, max_tokens, retries) for style in (0, 1)]
    candidates = [m[0] for m in made]
    shown = prompts.shown(rec)
    scores = [reward_score(reward, shown, c, retries)[0] for c in candidates]
    if scores[0] != scores[1]:
        chosen, by = int(scores[1] > scores[0]), "score"
    else:
        chosen, by = random.Random(f"{seed}:{rec['id']}").choice((0, 1)), f"a draw after equal scores (seed {seed})"
    return {"id": rec["id"], "question": rec["question"], "instruction": shown, "output": candidates[chosen],
            **{k: rec[k] for k in CARRIED if rec.get(k) is not None},
            "candidates": candidates, "reward": {"scores": scores, "chosen": chosen, "by": by, "model": reward.name,
                                                 "prompt": prompts.VERSION},
            "responder": _made(instruct, "common", sum(m[1] for m in made), max_tokens, made[0][2])}


def responder(instruct: TextModel, reasoner: TextModel, reward: TextModel, *, common_max_tokens: int = 4096,
              complex_max_tokens: int = 4096, system: str | None = prompts.RESPOND_SYSTEM, retries: int = 2,
              seed: int = 0) -> Any:
    def respond(rec: dict[str, Any]) -> Any:
        if not isinstance(rec.get("question"), str):
            raise Reject("no 'question'")
        tier = rec.get("tier")
        if tier == "complex":
            return complex_answer(rec, reasoner, complex_max_tokens, system, retries)
        if tier == "common":
            return ToSide(common_answer(rec, instruct, reward, common_max_tokens, retries, seed))
        raise Reject(f"tier is {tier!r}, not 'common' or 'complex'; run `finemed synth filter` first")

    return respond
