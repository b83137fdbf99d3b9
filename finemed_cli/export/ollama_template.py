"""Jinja chat template → Ollama TEMPLATE (Go text/template), per chat-template family.

Ollama does not run a GGUF's Jinja template: a Modelfile's TEMPLATE is Go text/template over `.Messages` (role,
content), `.System`, `.Tools`, … So the Go text is written per family (`FAMILIES`, keyed by what only that
family's Jinja template contains; no general Jinja → Go translation), and the few strings a Go template cannot
compute are read off the model's own template by rendering it on sample conversations (`_Probe`): a default
system turn (SmolLM2, Qwen2), Llama 3.1+'s system preamble (knowledge cutoff and date), the generation prompt
(Qwen3 Thinking opens `<think>`), Mistral's separator after an answer, whether a Phi-3 template keeps system
turns, and what opens a final answer that is continued (Qwen3's empty think block). A conversation ending
with an assistant message leaves that turn open, Ollama's convention for continuing it.

What Go templates cannot do: Llama 3 and Gemma strip each message's whitespace (Ollama has no trim), Llama
3.2's "Today Date" is the day the TEMPLATE was written, and a system turn that Gemma 2 or Mistral refuse is
folded into the first user turn, as Gemma 3 and Mistral v0.3 do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from finemed_cli.errors import ExportError, ModelError
from finemed_cli.modeling.template import FALLBACK_TEMPLATE, render_template

TEMPLATE_DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"

# Sample message texts the model's Jinja template is rendered with, to find the pieces around them.
_SYS, _U1, _A1, _U2 = "FINEMEDSYSTEMTEXT", "FINEMEDUSERTEXT1", "FINEMEDANSWERTEXT", "FINEMEDUSERTEXT2"
_BOS = "FINEMEDBOSTEXT"
# Go: whether the message `range $i, $_ := .Messages` is at is the last one (templates have no arithmetic).
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"


def _go(text: str) -> str:
    """`text` as a Go template action printing it: immune to `{{-` trimming, and `{{` in it stays text."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


class _Probe:
    """The model's Jinja template rendered on sample conversations, as transformers renders it."""

    def __init__(self, template: str, bos: str | None, eos: str | None, add_bos: bool) -> None:
        self.template, self.bos, self.eos, self.add_bos = template, bos or "", eos or "", add_bos
        # Whether the template writes BOS first, told apart from text that merely looks like it (SmolLM2's BOS
        # is <|im_start|>, which its template writes as the start of a turn)
        text = render_template(template, [{"role": "user", "content": _U1}], True, bos_token=_BOS,
                               eos_token=self.eos)
        self.writes_bos = bool(self.bos) and text.startswith(_BOS)

    def render(self, messages: list[dict[str, str]], generation: bool = True) -> str | None:
        """The rendered text after the BOS the template writes first (see `lead`); None when the template
        refuses the conversation."""
        try:
            text = render_template(self.template, messages, generation, bos_token=_BOS, eos_token=self.eos)
        except ModelError:
            return None
        return text.removeprefix(_BOS).replace(_BOS, self.bos)

    @property
    def lead(self) -> str:
        """The BOS the template writes first, as a Go action; none when the runner adds BOS itself (the GGUF's
        add_bos_token), since Ollama tokenizes the prompt with the model's own special-token rule."""
        return _go(self.bos) if self.writes_bos and not self.add_bos else ""

    def need(self, messages: list[dict[str, str]], generation: bool = True) -> str:
        text = self.render(messages, generation)
        if text is None:
            raise ExportError(f"the chat template refuses a plain {'/'.join(m['role'] for m in messages)} "
                              "conversation")
        return text

    def generation_prompt(self) -> str:
        """What add_generation_prompt adds after a user turn ("" for templates that ignore it)."""
        user = [{"role": "user", "content": _U1}]
        with_prompt, without = self.need(user, True), self.need(user, False)
        if not with_prompt.startswith(without):
            raise ExportError("the chat template's generation prompt is not added at the end")
        return with_prompt[len(without):]

    def around(self, text: str, before: str, marker: str) -> str:
        """The text between `before` and `marker` in `text` (raising when either is missing)."""
        start = text.find(before)
        end = text.find(marker, start + len(before)) if start >= 0 else -1
        if end < 0:
            raise ExportError(f"the chat template does not render {marker[:40]!r} where expected")
        return text[start + len(before):end]


def _chatml(p: _Probe) -> str:
    plain = p.need([{"role": "user", "content": _U1}], False)
    default = p.around(plain, "", "<|im_start|>user\n" + _U1)  # SmolLM2, Qwen2: a system turn of their own
    p.around(plain, _U1, "<|im_end|>\n")  # the turn closes as ChatML's
    # What opens a final answer being continued: Qwen3 writes an empty think block before it, others nothing.
    answered = p.need([{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}], False)
    opened = p.around(answered, "<|im_start|>assistant\n", _A1)
    lines = [
        p.lead + "{{- range $i, $_ := .Messages }}",
        _LAST,
        "{{- if and (eq $i 0) (ne .Role \"system\") }}" + _go(default) + "{{ end }}" if default else "",
        "{{- \"<|im_start|>\" }}{{ .Role }}" + _go("\n"),  # an action: the `{{-` below would trim a newline
        "{{- if and $last (eq .Role \"assistant\") }}" + _go(opened) + "{{ end }}" if opened else "",
        "{{- .Content }}",
        "{{- if or (ne .Role \"assistant\") (not $last) }}<|im_end|>\n{{ end }}",
        "{{- if and $last (ne .Role \"assistant\") }}" + _go(p.generation_prompt()) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def _llama3(p: _Probe) -> str:
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    plain = p.need([{"role": "user", "content": _U1}], False)
    default = p.around(plain, "", header.format("user"))  # 3.1+: a system turn with the cutoff and the date
    with_system = p.need([{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}], False)
    preamble = p.around(with_system, header.format("system"), _SYS)
    p.around(plain, _U1, "<|eot_id|>")
    lines = [
        p.lead + "{{- range $i, $_ := .Messages }}",
        _LAST,
        "{{- if and (eq $i 0) (ne .Role \"system\") }}" + _go(default) + "{{ end }}" if default else "",
        "{{- \"<|start_header_id|>\" }}{{ .Role }}<|end_header_id|>\n\n"
        + ("{{ if and (eq $i 0) (eq .Role \"system\") }}" + _go(preamble) + "{{ end }}" if preamble else "")
        + "{{ .Content }}",
        "{{- if or (ne .Role \"assistant\") (not $last) }}<|eot_id|>{{ end }}",
        "{{- if and $last (ne .Role \"assistant\") }}" + _go(p.generation_prompt()) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def _system_joint(p: _Probe, turn_start: str) -> str:
    """What separates a system text folded into the first user turn from the user's text: the template's own
    (Gemma 3), else a blank line (Gemma 2 and Mistral refuse system turns; Gemma 3 and Mistral v0.3 fold them
    so)."""
    text = p.render([{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}], False)
    if text is None or _SYS not in text:
        return "\n\n"
    return p.around(text, turn_start + _SYS, _U1)


def _gemma(p: _Probe) -> str:
    plain = p.need([{"role": "user", "content": _U1}], False)
    p.around(plain, "<start_of_turn>user\n", _U1)
    p.around(plain, _U1, "<end_of_turn>\n")
    joint = _system_joint(p, "<start_of_turn>user\n")
    lines = [
        p.lead + "{{- $system := \"\" }}",
        "{{- range $i, $_ := .Messages }}",
        _LAST,
        "{{- if eq .Role \"system\" }}{{ $system = .Content }}{{ continue }}{{ end }}",
        "{{- \"<start_of_turn>\" }}{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ if $system }}{{ $system }}" + _go(joint) + "{{ $system = \"\" }}{{ end }}{{ .Content }}",
        "{{- if or (ne .Role \"assistant\") (not $last) }}<end_of_turn>\n{{ end }}",
        "{{- if and $last (ne .Role \"assistant\") }}" + _go(p.generation_prompt()) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


def _mistral(p: _Probe) -> str:
    one = p.need([{"role": "user", "content": _U1}], False)
    user_open, user_close = p.around(one, "", _U1), one[one.index(_U1) + len(_U1):]
    turns = p.need([{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                    {"role": "user", "content": _U2}], False)
    after_answer = p.around(turns, _A1, user_open + _U2)  # eos, or eos and a space
    joint = _system_joint(p, user_open)
    lines = [
        p.lead + "{{- $system := \"\" }}",
        "{{- range $i, $_ := .Messages }}",
        _LAST,
        "{{- if eq .Role \"system\" }}{{ $system = .Content }}{{ continue }}{{ end }}",
        "{{- if eq .Role \"user\" }}" + _go(user_open)
        + "{{ if $system }}{{ $system }}" + _go(joint) + "{{ $system = \"\" }}{{ end }}{{ .Content }}"
        + _go(user_close),
        "{{- else }}{{ .Content }}{{ if not $last }}" + _go(after_answer) + "{{ end }}",
        "{{- end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


def _phi3(p: _Probe) -> str:
    turns = p.need([{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                    {"role": "user", "content": _U2}], True)
    want = f"<|user|>\n{_U1}<|end|>\n<|assistant|>\n{_A1}<|end|>\n<|user|>\n{_U2}<|end|>\n<|assistant|>\n"
    if turns != want:
        raise ExportError("the chat template does not render Phi-3's turns (<|user|>\\n…<|end|>\\n)")
    system = p.render([{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}], True)
    keeps_system = system is not None and f"<|system|>\n{_SYS}<|end|>\n" in system
    lines = [
        p.lead + "{{- range $i, $_ := .Messages }}",
        _LAST,
        # the first Phi-3 templates drop system turns: the model never saw one, so neither does Ollama's
        "" if keeps_system else "{{- if eq .Role \"system\" }}{{ continue }}{{ end }}",
        "{{- \"<|\" }}{{ .Role }}|>\n{{ .Content }}",
        "{{- if or (ne .Role \"assistant\") (not $last) }}<|end|>\n{{ end }}",
        "{{- if and $last (ne .Role \"assistant\") }}<|assistant|>\n{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def _fallback(p: _Probe) -> str:
    """finemed's own plain template (modeling/template.py), for models trained from a base without one."""
    lines = [
        "{{- range $i, $_ := .Messages }}",
        _LAST,
        "{{- if eq .Role \"system\" }}{{ .Content }}" + _go("\n\n"),
        "{{- else if eq .Role \"user\" }}" + _go("### Question\n") + "{{ .Content }}" + _go("\n\n"),
        "{{- else }}" + _go("### Response\n") + "{{ .Content }}{{ if not $last }}" + _go(p.eos + "\n\n")
        + "{{ end }}",
        "{{- end }}",
        "{{- if and $last (ne .Role \"assistant\") }}" + _go("### Response\n") + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ChatFamily:
    """A chat-template family finemed writes an Ollama TEMPLATE for."""

    name: str
    title: str  # for messages: the models that use it
    detect: Callable[[str], bool]  # is this Jinja template of the family?
    stops: tuple[str, ...]  # end-of-turn and turn-start tokens: Ollama stops generating at them
    build: Callable[[_Probe], str]


# The first family whose test a template passes is its family; the order matters where markers overlap.
FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily("finemed", "finemed's plain template", lambda t: t == FALLBACK_TEMPLATE, ("### Question",),
               _fallback),
    ChatFamily("llama3", "Llama 3.x", lambda t: "<|start_header_id|>" in t,
               ("<|eot_id|>", "<|start_header_id|>"), _llama3),
    ChatFamily("gemma", "Gemma 2/3", lambda t: "<start_of_turn>" in t, ("<end_of_turn>", "<start_of_turn>"),
               _gemma),
    ChatFamily("chatml", "ChatML: Qwen2/2.5/3, SmolLM2", lambda t: "<|im_start|>" in t,
               ("<|im_end|>", "<|im_start|>"), _chatml),
    ChatFamily("phi3", "Phi-3", lambda t: "<|end|>" in t,
               ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"), _phi3),
    ChatFamily("mistral", "Mistral", lambda t: "[INST]" in t, ("[INST]",), _mistral),
)


def chat_family(template: str) -> ChatFamily:
    """The family of a Jinja chat template.

    Raises:
        ExportError: none fits; the message quotes the template's start and says how to write TEMPLATE.
    """
    for family in FAMILIES:
        if family.detect(template):
            return family
    start = " ".join(template.split())[:80]
    raise ExportError(f"finemed cannot write an Ollama TEMPLATE for this chat template ({start!r}…); it knows "
                      f"{', '.join(f.title for f in FAMILIES)}. Write the Modelfile's TEMPLATE by hand in "
                      f"Go template syntax ({TEMPLATE_DOCS})")


def ollama_template(template: str, *, bos: str | None, eos: str | None, add_bos: bool) -> tuple[ChatFamily, str]:
    """(family, Go TEMPLATE text) for a Jinja chat template.

    Args:
        template: the model's Jinja chat template.
        bos, eos: the text of its BOS and EOS tokens (the template's `bos_token`, `eos_token`).
        add_bos: whether the runner adds BOS itself (the GGUF's add_bos_token): the TEMPLATE then omits it.

    Raises:
        ExportError: an unknown family, or a template of a known one that renders unlike it.
    """
    family = chat_family(template)
    try:
        text = family.build(_Probe(template, bos, eos, add_bos))
    except (ExportError, ModelError) as e:
        raise ExportError(f"{e}; its family looked like {family.title}. Write the Modelfile's TEMPLATE by hand "
                          f"({TEMPLATE_DOCS})") from None
    if '"""' in text:
        raise ExportError('the chat template holds """, which ends a Modelfile value; write TEMPLATE by hand')
    return family, text
