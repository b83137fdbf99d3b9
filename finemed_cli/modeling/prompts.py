"""Prompts: the o1-style system prompt, question formatting, and the chat rendering and tokenization that
TTT, training, scoring and generation share (so they all see the same prompt ids)."""

from __future__ import annotations

from typing import Any

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.modeling.template import END_OF_TURN_TOKENS, Message, render_template, tokenizer_template

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


def format_question(q: QuestionRecord) -> str:
    """The user turn for a question: context (PubMedQA), the question, then lettered options."""
    parts = []
    if q.context:
        parts.append(f"Context:\n{q.context.strip()}")
    parts.append(q.question.strip())
    if q.options:
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in q.options.items()))
    return "\n\n".join(parts)


def format_response(reasoning: str, answer: str) -> str:
    """The o1-style assistant turn of a reasoning example: Thought, then Summarization."""
    return f"## Thought\n{reasoning.strip()}\n\n## Summarization\n{answer.strip()}"


def question_messages(q: QuestionRecord, system: str = SYSTEM_PROMPT) -> list[Message]:
    return [{"role": "system", "content": system}, {"role": "user", "content": format_question(q)}]


def example_messages(r: CorpusRecord, system: str = SYSTEM_PROMPT) -> tuple[list[Message], Message]:
    """(prompt messages, assistant message) of a corpus record, for TTT and SFT."""
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": r.question.strip()}]
    return prompt, {"role": "assistant", "content": format_response(r.reasoning, r.answer)}


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's chat template (or the plain fallback), through finemed's one
    sandboxed renderer, with the tokenizer's special tokens as variables (as transformers does)."""
    return render_template(tokenizer_template(tokenizer), messages, add_generation_prompt,
                           **tokenizer.special_tokens_map)


def prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of the generation prompt for `messages` (every generator uses these, so they all see the
    same prompt)."""
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def tokenize_prompt_completion(
    tokenizer: Any, prompt: list[Message], completion: Message
) -> tuple[list[int], int]:
    """Token ids of prompt+completion and the number of prompt tokens.

    The two parts are tokenized separately and concatenated, so the boundary (and the loss mask built from
    it) is exact whatever the tokenizer would merge across it.
    """
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, [*prompt, completion], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        # Templates that restyle earlier turns once an assistant turn follows: fall back to the prefix
        # up to where the completion's content starts.
        cut = full_text.find(completion["content"])
        prompt_text = full_text[:cut] if cut > 0 else prompt_text
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    rest_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids + rest_ids, len(prompt_ids)
