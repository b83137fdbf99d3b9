"""Chat templates: the one sandboxed Jinja renderer every finemed path uses (HF tokenizers, GGUF files).

It renders as transformers' `apply_chat_template` does (ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the
`{% generation %}` tag, the special tokens as variables), so the text is the same whether a prompt is made
from a model's HF directory or from its GGUF; a test compares the two.
"""

from __future__ import annotations

import functools
import json
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


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_template(template: str, messages: list[Message], add_generation_prompt: bool,
                    **special_tokens: str) -> str:
    """Render a chat template (`bos_token=`, `eos_token=`, … as its variables).

    Raises:
        ModelError: the template has a syntax error, raises, or is refused by the sandbox.
    """
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError as e:
        raise template_error(e) from None


def template_error(error: Exception) -> ModelError:
    """One line for a chat template that cannot be rendered (a syntax error, or refused by the sandbox)."""
    what = " ".join(str(error).split())[:200]
    if "system" in what.lower():  # Gemma 2's template refuses a system turn: the fix is to send none
        return ModelError(f"the model's chat template refuses the system prompt ({what}); pass --system-prompt "
                          "model (no system turn)")
    return ModelError(f"the model's chat template cannot be rendered ({type(error).__name__}: {what}); fix the "
                      "template (tokenizer_config.json or chat_template.jinja of the model, "
                      "tokenizer.chat_template of a GGUF)")


# Chat templates' end-of-turn tokens. When one differs from eos (ChatML's <|im_end|> with <|endoftext|> as eos,
# Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>), a generator that stops on eos alone runs on.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def tokenizer_template(tokenizer: Any) -> str:
    """The chat template of an HF tokenizer (its default one when it has several), or the fallback."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or FALLBACK_TEMPLATE
