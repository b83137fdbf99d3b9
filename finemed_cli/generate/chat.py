"""`finemed chat`: a conversation with a GGUF model through llama.cpp, rendered with the model's own chat
template (the `tokenizer.chat_template` key of the GGUF) by finemed's one renderer, streamed token by token.

A finemed-exported GGUF gives exactly the prompt tokens the HF tokenizer would (a test checks).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator

from finemed_cli.errors import ModelError
from finemed_cli.generate.llamacpp import LlamaCpp, Sampling, context_size
from finemed_cli.modeling.prompts import system_turn
from finemed_cli.modeling.template import Message


class MessageTooLong(ModelError):
    """A message that does not fit the context even alone: refused, and the conversation goes on without it."""


class ChatSession(LlamaCpp):
    """A running conversation: `reply()` streams the assistant's answer and remembers it."""

    def __init__(self, gguf_path: str | os.PathLike[str], *, system: str | None = None, max_tokens: int = 512,
                 sampling: Sampling = Sampling(), n_ctx: int | None = None, threads: int | None = None,
                 n_gpu_layers: int | None = None) -> None:
        """`sampling`: temperature, top-p and seed (default greedy). `n_ctx` None: 4096, or the model's trained
        context when shorter; longer than that is refused (`context_size`)."""
        super().__init__(gguf_path, n_ctx=context_size(gguf_path, n_ctx), threads=threads,
                         n_gpu_layers=n_gpu_layers)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.system = system
        self.history: list[Message] = []

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """None: no system turn (the chat template's default); "": an empty one."""
        self.system = text

    def messages(self) -> list[Message]:
        return system_turn(self.system) + self.history

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.tokenize(self.render(messages))

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; the finished answer joins the history.

        Old turns are dropped (the system prompt kept) when the conversation would not fit the context.

        Raises:
            MessageTooLong: the message does not fit even alone; the conversation is left as it was.
        """
        ids = self._fit({"role": "user", "content": user_text})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        try:
            for token in self.stream(ids, self.max_tokens, self.sampling):
                piece = decoder.decode(self.llm.detokenize([token]))
                if piece:
                    pieces.append(piece)
                    yield piece
            tail = decoder.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                yield tail
        finally:  # also when the reader stops early (Ctrl-C): what was said stays, the turns stay paired
            self.history.append({"role": "assistant", "content": "".join(pieces).strip()})

    def _fit(self, turn: Message) -> list[int]:
        """The prompt ids with `turn` added, dropping the oldest turns until it fits beside the reply's budget.
        The turn alone is measured first, so a message too long for any conversation costs none of it."""
        room = self.context_length - self.max_tokens
        alone = len(self.prompt_ids(system_turn(self.system) + [turn]))
        if alone > room:
            frame = len(self.prompt_ids(system_turn(self.system) + [{"role": "user", "content": ""}]))
            raise MessageTooLong(
                f"message too long: {alone - frame:,} tokens, and {max(room - frame, 0):,} fit (the context of "
                f"{self.context_length:,} tokens less the reply's {self.max_tokens:,} (--max-new-tokens) and {frame:,} "
                "for the system prompt and template); shorten it, or start the chat with a larger --ctx-size or a lower "
                "--max-new-tokens. The conversation so far is kept")
        self.history.append(turn)
        ids = self.prompt_ids(self.messages())
        while len(ids) > room and len(self.history) > 1:
            del self.history[:2 if len(self.history) > 2 else 1]
            ids = self.prompt_ids(self.messages())
        return ids
