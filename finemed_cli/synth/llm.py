"""Structured output from a local model: llama.cpp constrains decoding to a JSON schema (it turns the schema
into a grammar), the reply is parsed and checked against the schema, and a reply that still fails (cut off
by the token budget, say) is retried a bounded number of times with a different seed. What fails every try
becomes a reject record with the reason, never a silent drop."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from finemed_cli.errors import FinemedError


class StructuredError(FinemedError):
    """No valid reply within the retries; the message says what the last reply was and why it failed."""


class ContextOverflow(StructuredError):
    """The prompt does not fit the model's context: that record is rejected, the stage goes on."""


class TextModel(Protocol):
    name: str
    context_length: int

    def count(self, messages: list[dict[str, str]]) -> int: ...

    def clip(self, text: str, tokens: int) -> str: ...

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str: ...

    def generate(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int,
                 temperature: float = 0.0, prefix: str = "", stop: list[str] | None = None) -> str: ...


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> str | None:
    """The subset of JSON Schema the synth stages use (object, required, properties, enum, boolean,
    integer, string); None when `value` conforms, else the first problem."""
    if "enum" in schema:
        if isinstance(value, bool) or value not in schema["enum"]:
            return f"{path}: {value!r} is not one of {schema['enum']}"
        return None
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return f"{path}: expected an object"
        for key in schema.get("required", []):
            if key not in value:
                return f"{path}: missing {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value and (problem := validate(value[key], sub, f"{path}.{key}")):
                return problem
        return None
    if kind == "array":
        if not isinstance(value, list):
            return f"{path}: expected a list"
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return f"{path}: expected {schema.get('minItems')}-{schema.get('maxItems')} items, got {len(value)}"
        for i, item in enumerate(value):
            if problem := validate(item, schema.get("items", {}), f"{path}[{i}]"):
                return problem
        return None
    if kind == "string" and isinstance(value, str) and len(value.strip()) < schema.get("minLength", 0):
        return f"{path}: shorter than {schema['minLength']} characters"
    checks = {"boolean": lambda v: isinstance(v, bool), "string": lambda v: isinstance(v, str),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)}
    if kind in checks and not checks[kind](value):
        return f"{path}: expected {kind}, got {value!r}"
    return None


def ask_json(model: TextModel, messages: list[dict[str, str]], schema: dict[str, Any], *, retries: int = 3,
             max_tokens: int = 128, seed: int = 0) -> tuple[dict[str, Any], int]:
    """A reply conforming to `schema` and the number of tries it took; raises StructuredError after
    `retries` failures."""
    problem = ""
    for attempt in range(retries):
        raw = model.complete(messages, schema, seed=seed + attempt, max_tokens=max_tokens)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg} at {e.pos}): {raw[:120]!r}"
            continue
        problem = validate(value, schema) or ""
        if not problem:
            return value, attempt + 1
    raise StructuredError(f"no valid reply in {retries} tries; last: {problem}")


def fit_text(model: TextModel, messages: Callable[[str], list[dict[str, str]]], text: str,
             max_tokens: int) -> tuple[list[dict[str, str]], int]:
    """`messages(text)` with the source text cut at its end so that the prompt and `max_tokens` fit the model's
    context (the reference code cuts its texts to its context too), and how many tokens of the text it kept.
    A prompt that leaves no room for any text is this record's ContextOverflow."""
    bare = model.count(messages(""))
    room = model.context_length - max_tokens - bare - 8  # 8: tokens may merge differently where the text joins
    if room <= 0:
        raise ContextOverflow(f"the prompt without its source text leaves no room in {model.name}'s context of "
                              f"{model.context_length} tokens for a {max_tokens}-token reply")
    out = messages(model.clip(text, room))
    return out, model.count(out) - bare


class LlamaCppModel:
    """A GGUF model through finemed's llama.cpp front end; replies to a schema are decoded under a grammar
    made from it (llama.cpp turns the JSON schema into a grammar), so they parse by construction."""

    # llama-cpp-python's chat defaults, with which the judges in bench/judge_quality.py were measured.
    _TOP_K, _MIN_P = 40, 0.05

    def __init__(self, gguf: str | None = None, n_ctx: int = 2048) -> None:
        from pathlib import Path

        from finemed_cli.checkpoints.embedded import embedded_gguf
        from finemed_cli.generate.llamacpp import LlamaCpp

        path = Path(gguf) if gguf else embedded_gguf()
        self.name = path.name
        self._llm = LlamaCpp(path, n_ctx=n_ctx)
        self.context_length = self._llm.context_length

    def count(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the rendered prompt (with the generation prompt)."""
        return len(self._llm.tokenize(self._llm.render(messages)))

    def clip(self, text: str, tokens: int) -> str:
        """`text` cut to its first `tokens` tokens (unchanged when it is shorter)."""
        ids = self._llm.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(ids) <= tokens:
            return text
        return self._llm.llm.detokenize(ids[:tokens]).decode("utf-8", errors="ignore")

    def _sampling(self, temperature: float, seed: int) -> Any:
        from finemed_cli.generate.llamacpp import Sampling

        return Sampling(temperature, 0.95, self._TOP_K, self._MIN_P, seed)

    def _ids(self, text: str, max_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids and the budget that fits after them (as llama-cpp-python shortens it); a prompt
        that leaves no room is this record's ContextOverflow."""
        ids = self._llm.tokenize(text)
        room = self._llm.context_length - len(ids)
        if room <= 0:
            raise ContextOverflow(f"the prompt ({len(ids)} tokens) does not fit {self.name}'s context of "
                                  f"{self._llm.context_length} tokens; the record is too long for this model")
        return ids, min(max_tokens, room)

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str:
        from llama_cpp import LlamaGrammar

        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        ids, budget = self._ids(self._llm.render(messages), max_tokens)
        # Greedy on the first try; later tries sample a little, so a retry is not the same reply again.
        return self._llm.complete_text(ids, budget, self._sampling(0.0 if seed == 0 else 0.7, seed), grammar)

    def generate(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int,
                 temperature: float = 0.0, prefix: str = "", stop: list[str] | None = None) -> str:
        """Free text (responses, cold starts), greedy unless a temperature is given. `prefix` is written
        for the model at the start of its reply (how `respond` makes a small model keep the o1 format);
        the return value excludes it."""
        ids, budget = self._ids(self._llm.render(messages) + prefix, max_tokens)
        return self._llm.complete_text(ids, budget, self._sampling(temperature, seed), stop=stop)

    def close(self) -> None:
        self._llm.close()


class ScriptedModel:
    """Replies from a script, for deterministic tests of the plumbing (parsing, retries, rejects)."""

    name = "scripted"

    def __init__(self, replies: list[str], context_length: int = 100_000) -> None:
        self.replies, self.calls, self.context_length = list(replies), [], context_length

    def count(self, messages: list[dict[str, str]]) -> int:  # a word is a token here
        return sum(len(m["content"].split()) for m in messages)

    def clip(self, text: str, tokens: int) -> str:
        return text if len(text.split()) <= tokens else " ".join(text.split()[:tokens])

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str:
        self.calls.append(messages)
        return self.replies.pop(0)

    def generate(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int,
                 temperature: float = 0.0, prefix: str = "", stop: list[str] | None = None) -> str:
        self.calls.append(messages)
        return self.replies.pop(0)
