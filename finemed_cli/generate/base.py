"""The generator interface of `finemed answer`: messages in, text out. Backends: transformers
(`generate/hf.py`) and llama.cpp (`generate/llamacpp.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from finemed_cli.generate.extract import SUMMARY_HEADING
from finemed_cli.modeling.prompts import Message


@dataclass
class GenerationResult:
    text: str
    tokens: int  # new tokens generated
    seconds: float
    backend: str

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": round(self.seconds, 4), "backend": self.backend}


class Generator(Protocol):
    """Generates a response for chat messages, with the TTT adapter of the current question (if any)."""

    backend: str

    def generate(self, messages: list[Message], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.95, seed: int = 0, adapter: Any = None,
                 thought_tokens: int | None = None) -> GenerationResult: ...


_FORCED_SUMMARY = "\n\n## Summarization\n"


def budgeted_generate(continue_fn: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int,
                      thought_tokens: int | None) -> list[int]:
    """New token ids for a prompt, with an optional token budget for the Thought section.

    `continue_fn(ids, budget)` generates up to `budget` tokens after `ids` and returns (new ids without the
    end-of-turn token, whether it stopped at end-of-turn). When `thought_tokens` is set and the response has
    not reached a Summarization heading ('## Summarization' or '**Summarization**') within that many tokens, the header is written for the model and it
    goes on to conclude with the rest of `max_new_tokens`: long o1-style reasoning still ends in an answer.
    """
    first = min(max_new_tokens, thought_tokens) if thought_tokens else max_new_tokens
    new, stopped = continue_fn(prompt_ids, first)
    if not thought_tokens or stopped or len(new) >= max_new_tokens:
        return new
    if SUMMARY_HEADING.search(tokenizer.decode(new, skip_special_tokens=True)):
        more, _ = continue_fn(prompt_ids + new, max_new_tokens - len(new))
        return new + more
    forced = tokenizer(_FORCED_SUMMARY, add_special_tokens=False)["input_ids"]
    left = max_new_tokens - len(new) - len(forced)
    if left <= 0:
        return new
    more, _ = continue_fn(prompt_ids + new + forced, left)
    return new + forced + more
