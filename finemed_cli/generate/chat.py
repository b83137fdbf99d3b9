"""`finemed chat`: a conversation with a GGUF model through llama.cpp, rendered with the model's own chat
template (the `tokenizer.chat_template` key of the GGUF), streamed token by token.

The template is rendered as transformers renders it (Jinja2 sandbox, trim_blocks and lstrip_blocks), so a
finemed-exported GGUF gives exactly the prompt tokens the HF tokenizer would (a test checks).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from typing import Any

from finemed_cli.errors import ModelError
from finemed_cli.generate.prompts import _FALLBACK_TEMPLATE, Message


def render_template(template: str, messages: list[Message], add_generation_prompt: bool,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Render a HF-style chat template the way transformers does."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise template_error(e) from None


def template_error(error: Exception) -> ModelError:
    """One line for a chat template that cannot be rendered (a syntax error, or refused by the sandbox)."""
    what = " ".join(str(error).split())[:200]
    return ModelError(f"the model's chat template cannot be rendered ({type(error).__name__}: {what}); fix the "
                      "template (tokenizer_config.json or chat_template.jinja of the model, "
                      "tokenizer.chat_template of a GGUF)")


class ChatSession:
    """A running conversation: `reply()` streams the assistant's answer and remembers it."""

    def __init__(self, gguf_path: str | os.PathLike[str], *, system: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, n_ctx: int = 4096,
                 threads: int | None = None) -> None:
        from finemed_cli.generate.llamacpp import open_gguf

        self.llm = open_gguf(gguf_path, n_ctx=n_ctx, threads=threads)
        import llama_cpp

        self._lc = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template") or _FALLBACK_TEMPLATE
        self.bos_token = self._token_text(meta.get("tokenizer.ggml.bos_token_id"))
        self.eos_token = self._token_text(meta.get("tokenizer.ggml.eos_token_id"))
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.system = system
        self.history: list[Message] = []

    def _token_text(self, tid: Any) -> str:
        if tid is None:
            return ""
        return self.llm.detokenize([int(tid)], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        text = render_template(self.template, messages, True, self.bos_token, self.eos_token)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; the finished answer joins the history.

        Old turns are dropped (the system prompt kept) when the conversation would not fit the context.
        """
        self.history.append({"role": "user", "content": user_text})
        ids = self.prompt_ids(self.messages())
        while len(ids) + self.max_tokens > self.llm.n_ctx() and len(self.history) > 1:
            del self.history[:2 if len(self.history) > 2 else 1]
            ids = self.prompt_ids(self.messages())
        if len(ids) + self.max_tokens > self.llm.n_ctx():
            self.history.pop()
            raise ModelError(f"the message ({len(ids)} tokens) and the token budget ({self.max_tokens}) exceed "
                             f"the context of {self.llm.n_ctx()} tokens; shorten it or lower --max-tokens")
        self.llm.set_seed(self.seed)
        sampling = ({"temp": 0.0} if self.temperature <= 0 else
                    {"temp": self.temperature, "top_p": self.top_p, "top_k": 0, "min_p": 0.0})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        stream = self.llm.generate(ids, reset=True, repeat_penalty=1.0, **sampling)
        for count, token in enumerate(stream, start=1):
            if self._lc.llama_vocab_is_eog(self._vocab, token):
                break
            piece = decoder.decode(self.llm.detokenize([token]))
            if piece:
                pieces.append(piece)
                yield piece
            if count >= self.max_tokens:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            yield tail
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
