"""Prompts: the o1-style system prompt, question formatting, and the chat rendering and tokenization that
TTT, training, scoring and generation share (so they all see the same prompt ids)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.errors import ConfigError
from finemed_cli.modeling.template import (
    END_OF_TURN_TOKENS,
    FALLBACK_TEMPLATE,
    Message,
    render_template,
    tokenizer_template,
)

SYSTEM_PROMPT = (
    "You are a careful medical expert. Reason step by step before answering. "
    "First write '## Thought' and think the problem through: the key findings, the candidate answers, "
    "and checks of your own reasoning. Then write '## Summarization' and state the conclusion briefly. "
    "For a multiple-choice question, end with: the answer is (X), where X is the letter of the best option."
)



def end_of_generation_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos, the model's (generation) config eos ids (Llama 3
    and Gemma 3 list several), and the chat template's end-of-turn token, which the GGUF export writes as
    llama.cpp's eot, so transformers and llama.cpp stop at the same place."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    if model is not None:
        add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        add(getattr(model.config, "eos_token_id", None))
    template = tokenizer_template(tokenizer)
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in template and token in vocab:
            add(vocab[token])
            break
    return ids


def format_question(q: QuestionRecord | CorpusRecord) -> str:
    """The user turn for a question or a corpus record: context (PubMedQA), the question, then lettered options."""
    return question_text(q.question, q.options, getattr(q, "context", None))


def question_text(question: str, options: dict[str, str] | None = None, context: str | None = None) -> str:
    """A question as every prompt shows it (answering, TTT, training, synth): context, question, options."""
    parts = []
    if context:
        parts.append(f"Context:\n{context.strip()}")
    parts.append(question.strip())
    if options:
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in options.items()))
    return "\n\n".join(parts)


SUMMARY_SEPARATOR = "\n\n## Summarization\n"  # between a response's Thought and its Summarization


def format_response(reasoning: str, answer: str) -> str:
    """The o1-style assistant turn of a reasoning example: Thought, then Summarization."""
    return f"## Thought\n{reasoning.strip()}{SUMMARY_SEPARATOR}{answer.strip()}"


def system_turn(system: str | None) -> list[Message]:
    """The system message for `system`: none for None (the chat template's own default applies)."""
    return [] if system is None else [{"role": "system", "content": system}]


def context_turns(examples: Sequence[CorpusRecord]) -> list[Message]:
    """Retrieved records as earlier turns of the conversation, each its question (with options) and its o1
    response: the worked examples of the in-context variants (`icl`, `ttt+icl`)."""
    turns: list[Message] = []
    for r in examples:
        turns += [{"role": "user", "content": format_question(r)},
                  {"role": "assistant", "content": format_response(r.reasoning, r.answer)}]
    return turns


def question_messages(q: QuestionRecord, system: str | None = SYSTEM_PROMPT,
                      examples: Sequence[CorpusRecord] = ()) -> list[Message]:
    """The prompt of a question: the system turn, any worked examples, the question."""
    return [*system_turn(system), *context_turns(examples), {"role": "user", "content": format_question(q)}]


def example_messages(r: CorpusRecord, system: str | None = SYSTEM_PROMPT,
                     examples: Sequence[CorpusRecord] = ()) -> tuple[list[Message], Message]:
    """(prompt messages, assistant message) of a corpus record, for TTT and SFT (and, with `examples` before
    it, for scoring its response in context)."""
    prompt = [*system_turn(system), *context_turns(examples), {"role": "user", "content": format_question(r)}]
    return prompt, {"role": "assistant", "content": format_response(r.reasoning, r.answer)}


# What `finemed train` writes beside a model it made: the system prompt it trained with (and whether the
# chat template is finemed's fallback), so `answer`, `eval`, `chat` and `export` use them by default.
MODEL_PROMPT_FILE = "finemed.json"


def trained_system_prompt(model_dir: str | Path | None) -> tuple[bool, str | None]:
    """(found, prompt) from a finemed-trained model directory's finemed.json; prompt None means `model`."""
    if model_dir is None:
        return False, None
    path = Path(model_dir) / MODEL_PROMPT_FILE
    if not path.is_file():
        return False, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); retrain, or delete it to use finemed's prompt") \
            from None
    prompt = meta.get("system_prompt") if isinstance(meta, dict) else None
    if isinstance(meta, dict) and "system_prompt" in meta and (prompt is None or isinstance(prompt, str)):
        return True, prompt
    raise ConfigError(f"{path}: no 'system_prompt' string; retrain, or delete it to use finemed's prompt")


def save_prompt(tokenizer: Any, directory: Path, system: str | None) -> None:
    """Save `tokenizer` into a trained model's directory with the chat template it was trained with (finemed's
    fallback when the base had none: else the model would be answered with another prompt format than it
    learned) and `finemed.json` with the system prompt."""
    fallback = not getattr(tokenizer, "chat_template", None)
    if fallback:
        tokenizer.chat_template = FALLBACK_TEMPLATE
    tokenizer.save_pretrained(directory)
    meta = {"system_prompt": system, "chat_template": "finemed fallback" if fallback else "the base model's"}
    (Path(directory) / MODEL_PROMPT_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")


def resolve_system_prompt(value: str | None, model_dir: str | Path | None = None) -> str | None:
    """The system prompt a run uses (None: no system turn).

    Args:
        value: None (the default: what the model was trained with by finemed, else `SYSTEM_PROMPT`),
            `model`, `none`, `finemed`, `@FILE` or the text itself.
        model_dir: the model's local directory, where `finemed train` left its finemed.json.
    """
    if value is None:
        found, prompt = trained_system_prompt(model_dir)
        return prompt if found else SYSTEM_PROMPT
    if value == "model":
        return None
    if value == "none":
        return ""
    if value == "finemed":
        return SYSTEM_PROMPT
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            # bounded: `@/dev/zero` (or any endless stream) once read until MemoryError
            with open(path, "rb") as f:
                data = f.read(MAX_PROMPT_BYTES + 1)
            if len(data) > MAX_PROMPT_BYTES:
                raise ConfigError(f"--system-prompt {value}: {path} holds more than {MAX_PROMPT_BYTES // 1024} KiB; "
                                  "a system prompt is a few paragraphs: point at the prompt's own file")
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--system-prompt {value}: {path} is not UTF-8 text; re-save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"--system-prompt {value}: cannot read {path} ({e.strerror}); check the path") \
                from None
    return value


MAX_PROMPT_BYTES = 256 * 1024  # the longest @FILE system prompt read


def gguf_system_prompt(value: str | None, trained: str | None, embedded: str | None) -> str | None:
    """The system prompt of a conversation with a GGUF (`chat`, `serve`): `value` as `resolve_system_prompt`
    reads it when given; else finemed's own models get their finemed prompt (`trained`: the one a
    finemed-trained model carries in its GGUF; `embedded`: the embedded model's name, which gets the o1
    prompt) and any other GGUF its template's own default (a chat model that never saw finemed's o1 prompt, or
    whose template refuses a system turn, as Gemma 2's, works as made)."""
    if value is not None:
        return resolve_system_prompt(value)
    if trained is not None:
        return trained
    return SYSTEM_PROMPT if embedded else None


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's chat template (or the plain fallback), through finemed's one
    sandboxed renderer, with the tokenizer's special tokens as variables (as transformers does)."""
    return render_template(tokenizer_template(tokenizer), messages, add_generation_prompt,
                           origin=getattr(tokenizer, "name_or_path", None) or None, **tokenizer.special_tokens_map)


def prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the generation prompt for `messages` (every generator uses these, so they all see the
    same prompt)."""
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def tokenize_prompt_completion(
    tokenizer: Any, prompt: list[Message], completion: Message, cut: str | None = None
) -> tuple[list[int], int, int]:
    """Token ids of prompt+completion, the number of prompt tokens, and the number of tokens before `cut`'s
    first occurrence in the completion (all of them when `cut` is None or absent).

    The parts are tokenized separately and concatenated, so the boundaries (and the loss masks built from
    them) are exact whatever the tokenizer would merge across them.
    """
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, [*prompt, completion], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        # Templates that restyle earlier turns once an assistant turn follows: fall back to the prefix
        # up to where the completion's content starts.
        start = full_text.find(completion["content"])
        prompt_text = full_text[:start] if start > 0 else prompt_text
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    rest = full_text[len(prompt_text):]
    at = rest.find(cut) if cut else -1
    if at < 0:
        rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
        return prompt_ids + rest_ids, len(prompt_ids), len(prompt_ids) + len(rest_ids)
    head = tokenizer(rest[:at], add_special_tokens=False)["input_ids"]
    tail = tokenizer(rest[at:], add_special_tokens=False)["input_ids"]
    return prompt_ids + head + tail, len(prompt_ids), len(prompt_ids) + len(head)
