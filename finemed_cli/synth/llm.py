"""Structured output from a local model: llama.cpp constrains decoding to a JSON schema (it turns the schema
into a grammar), the reply is parsed and checked against the schema, and a reply that still fails (cut off
by the token budget, say) is retried a bounded number of times with a different seed. What fails every try
becomes a reject record with the reason, never a silent drop."""

from __future__ import annotations

import json
from typing import Any, Protocol

from finemed_cli.errors import FinemedError


class StructuredError(FinemedError):
    """No valid reply within the retries; the message says what the last reply was and why it failed."""


class TextModel(Protocol):
    name: str

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str: ...


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


class LlamaCppModel:
    """A GGUF model through llama-cpp-python, decoding constrained to the schema."""

    def __init__(self, gguf: str | None = None, n_ctx: int = 2048) -> None:
        from pathlib import Path

        from finemed_cli.generate.llamacpp import open_gguf
        from finemed_cli.models.embedded import embedded_gguf

        path = Path(gguf) if gguf else embedded_gguf()
        self.name = path.name
        self._llm = open_gguf(path, n_ctx=n_ctx)

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str:
        # Greedy on the first try; later tries sample a little, so a retry is not the same reply again.
        out = self._llm.create_chat_completion(
            messages=messages, response_format={"type": "json_object", "schema": schema},
            temperature=0.0 if seed == 0 else 0.7, seed=seed, max_tokens=max_tokens)
        return out["choices"][0]["message"]["content"] or ""

    def close(self) -> None:
        self._llm.close()


class ScriptedModel:
    """Replies from a script, for deterministic tests of the plumbing (parsing, retries, rejects)."""

    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.calls = list(replies), []

    def complete(self, messages: list[dict[str, str]], schema: dict[str, Any], *, seed: int,
                 max_tokens: int) -> str:
        self.calls.append(messages)
        return self.replies.pop(0)
