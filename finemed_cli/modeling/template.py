"""Chat templates: the one sandboxed Jinja renderer every finemed path uses (HF tokenizers, GGUF files).

It renders as transformers' `apply_chat_template` does (ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the
`{% generation %}` tag, the special tokens as variables), so the text is the same whether a prompt is made
from a model's HF directory or from its GGUF; a test compares the two.

A template is code that came with a model file, so it is also bounded: whatever it raises is one ModelError
naming the file, and a render that would build a prompt far past the conversation it was given (a loop writing
gigabytes, `'x' * 10**10`, nested loops that spin) is stopped before it takes the memory or the time.
"""

from __future__ import annotations

import functools
import json
import os
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finemed_cli.errors import ModelError

Message = dict[str, str]

# Used only when a model has no chat template (e.g. a base, non-instruct checkpoint).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Question\n{{ m['content'] }}\n\n"
    "{% else %}### Response\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response\n{% endif %}"
)


# What a template may write beyond the conversation it is given (a system prompt, tool schemas, dates): a
# rendered prompt past this is a runaway template (a loop building gigabytes), refused before it fills memory.
TEMPLATE_ALLOWANCE_CHARS = 1 << 20
# Items all of a render's `range()` calls may yield together (the sandbox caps each call at 100,000, not their
# sum): nested loops that write nothing would otherwise spin for hours.
RANGE_BUDGET = 1_000_000


@dataclass
class _Budget:
    """One render's limits, read by the sandbox's `*`, `**` and `range`."""

    chars: int
    range_items: int = RANGE_BUDGET


_budget: ContextVar[_Budget | None] = ContextVar("finemed_template_budget", default=None)


def _current() -> _Budget:
    """The running render's budget (a fresh one outside `render_template`, e.g. a template compiled alone)."""
    return _budget.get() or _Budget(TEMPLATE_ALLOWANCE_CHARS)


def _too_large(what: str) -> OverflowError:
    return OverflowError(f"{what} would exceed the {_current().chars:,} characters a prompt may have")


def _bounded_binop(operator: str, left: Any, right: Any) -> Any:
    """`*` and `**` refused before they build a value past the render's bound (`'x' * 10**10` allocates
    10 GB at once: the output bound alone would come too late)."""
    if operator == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _current().chars:
            raise _too_large("a repetition")
        return left * right
    if isinstance(left, int) and isinstance(right, int) and right > 0 and \
            right * abs(left).bit_length() > 8 * _current().chars:
        raise _too_large("a power")
    return left**right


def _bounded_range(*args: int) -> range:
    from jinja2.sandbox import safe_range

    items = safe_range(*args)
    budget = _current()
    budget.range_items -= len(items)
    if budget.range_items < 0:
        raise OverflowError(f"its loops run past {RANGE_BUDGET:,} range() items")
    return items


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with `*` and `**` bounded (intercepting them also stops Jinja from folding
        a constant `'x' * 10**10` while compiling)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _bounded_binop(operator, left, right)

    class GenerationTag(Extension):
        """`{% generation %}…{% endgeneration %}` (transformers marks assistant tokens with it): the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _bounded_range
    return env.from_string(template)


def render_template(template: str, messages: list[Message], add_generation_prompt: bool, *,
                    origin: str | os.PathLike[str] | None = None, **special_tokens: str) -> str:
    """Render a chat template (`bos_token=`, `eos_token=`, … as its variables).

    A template is code from the model's files: whatever it raises, and a prompt it builds past the bound
    (the conversation's own text ×4 plus `TEMPLATE_ALLOWANCE_CHARS`), is one ModelError naming `origin` (the
    GGUF or model folder it came from).

    Raises:
        ModelError: the template has a syntax error, raises, runs away, or is refused by the sandbox.
    """
    given = sum(len(str(m.get("content") or "")) for m in messages)
    limit = 4 * given + TEMPLATE_ALLOWANCE_CHARS
    token = _budget.set(_Budget(limit))
    try:
        pieces, size = [], 0
        for piece in _compile(template).generate(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **special_tokens):
            size += len(piece)
            if size > limit:
                raise _too_large("the rendered prompt")
            pieces.append(piece)
        return "".join(pieces)
    except Exception as e:  # the template is the model's code: whatever it raises is the template's fault
        raise template_error(e, origin) from None
    finally:
        _budget.reset(token)


def check_template(template: str, *, origin: str | os.PathLike[str] | None = None, **special_tokens: str) -> None:
    """Refuse, when a model loads, a template that renders no conversation finemed sends (a user turn, with or
    without a system turn: Gemma 2's refuses the system turn, others may want one), so a broken template is
    reported once, naming the user's file, before any question or turn is begun.

    Raises:
        ModelError: as `render_template`, for the plain user turn.
    """
    user = {"role": "user", "content": "Which hormone does the thyroid gland make?"}
    try:
        render_template(template, [user], True, origin=origin, **special_tokens)
    except ModelError as first:
        try:
            render_template(template, [{"role": "system", "content": "Be brief."}, user], True, origin=origin,
                            **special_tokens)
        except ModelError:
            raise first from None


def template_error(error: Exception, origin: str | os.PathLike[str] | None = None) -> ModelError:
    """One line for a chat template that cannot be rendered (a syntax error, an error it raises, a runaway
    size, or a refusal by the sandbox), naming the file it came from when known."""
    what = " ".join(str(error).split())[:200] or type(error).__name__
    where = f"{origin}: " if origin is not None else ""
    if "system" in what.lower():  # Gemma 2's template refuses a system turn: the fix is to send none
        return ModelError(f"{where}the model's chat template refuses the system prompt ({what}); pass "
                          "--system-prompt model (no system turn)")
    fix = ("its tokenizer.chat_template metadata; re-export the GGUF from a model whose template works" if
           str(origin or "").endswith(".gguf") else
           "tokenizer_config.json or chat_template.jinja of the model, tokenizer.chat_template of a GGUF")
    return ModelError(f"{where}the chat template is broken ({type(error).__name__}: {what}); fix {fix}")


# Chat templates' end-of-turn tokens. When one differs from eos (ChatML's <|im_end|> with <|endoftext|> as eos,
# Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>), a generator that stops on eos alone runs on.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def tokenizer_template(tokenizer: Any) -> str:
    """The chat template of an HF tokenizer (its default one when it has several), or the fallback."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or FALLBACK_TEMPLATE
