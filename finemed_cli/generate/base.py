"""The generator interface of `finemed answer`: messages in, text out. Backends: transformers (here),
llama.cpp (with the export issue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from finemed_cli.generate.prompts import Message


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
                 top_p: float = 0.95, seed: int = 0, adapter: Any = None) -> GenerationResult: ...
