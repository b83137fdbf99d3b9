"""Training examples for TTT, built from retrieved corpus records."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.prompts import (
    SUMMARY_SEPARATOR,
    SYSTEM_PROMPT,
    example_messages,
    tokenize_prompt_completion,
)

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainingExample:
    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T), IGNORE where no loss
    attention_mask: torch.Tensor | None = None  # only when padded
    # Packed examples (`pack_examples`): positions restart at 0 per sequence; `lengths` are the sequences'
    # token counts, in order (run under `varlen.packed_attention`).
    position_ids: torch.Tensor | None = None
    lengths: tuple[int, ...] | None = None

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def lora_examples(tokenizer: Any, records: list[CorpusRecord], max_length: int,
                  system: str | None = SYSTEM_PROMPT, loss_on: str = "response",
                  context: Sequence[CorpusRecord] = ()) -> list[TrainingExample]:
    """One unpadded example per record, under the run's system prompt; loss on the assistant's Thought and
    Summarization tokens (`loss_on="response"`) or the Thought only (`"reasoning"`), never the prompt.
    `context`: worked examples shown before each record (the in-context variants of `eval --mode perplexity`).

    Longer examples keep their prompt and lose the end of the response.
    """
    out = []
    for r in records:
        prompt, completion = example_messages(r, system, context)
        cut = SUMMARY_SEPARATOR if loss_on == "reasoning" else None
        ids, n_prompt, n_learn = tokenize_prompt_completion(tokenizer, prompt, completion, cut)
        if len(ids) > max_length:
            ids = ids[:max_length]
        if n_prompt >= min(len(ids), n_learn) - 1:
            logger.warning("neighbour %s: prompt fills the %d-token budget; skipped", r.id, max_length)
            continue
        labels = list(ids)
        labels[:n_prompt] = [IGNORE] * n_prompt
        labels[n_learn:] = [IGNORE] * max(0, len(labels) - n_learn)  # `reasoning`: the Summarization unlearned
        out.append(TrainingExample(torch.tensor([ids]), torch.tensor([labels])))
    return out


def paper_examples(tokenizer: Any, records: list[CorpusRecord], pad_to: int,
                   system: str | None = SYSTEM_PROMPT) -> list[TrainingExample]:
    """The reference procedure's examples: the whole retrieved text as the target, right-padded to
    `pad_to` tokens (truncated there too), padding excluded from the loss; pad_to=0 turns padding off."""
    out = []
    for r in records:
        prompt, completion = example_messages(r, system)
        ids, _, _ = tokenize_prompt_completion(tokenizer, prompt, completion)
        if pad_to:
            ids = ids[:pad_to]
        n = len(ids)
        pad = pad_to - n if pad_to else 0
        input_ids = ids + [tokenizer.pad_token_id] * pad
        labels = ids + [IGNORE] * pad
        mask = [1] * n + [0] * pad
        out.append(TrainingExample(torch.tensor([input_ids]), torch.tensor([labels]), torch.tensor([mask])))
    return out


def pack_examples(examples: list[TrainingExample]) -> TrainingExample:
    """Concatenate unpadded examples into one (1, ΣT) row: no padding, positions restarting per example,
    and no loss on an example's first token (the previous example's last position would predict it).

    Right-padding 4 neighbours of 449-536 tokens into a (4, 536) batch added 11% tokens, and each phase
    of TTT paid for them (frozen-prefix pass 2.42 s against 2.19 s one question at a time; embedded model,
    2 cores). Packed, the same work takes what the questions take one at a time (5.14-5.27 s against
    5.16-5.38 s for a training step's forward and backward).
    """
    ids = torch.cat([e.input_ids[0] for e in examples])
    labels = torch.cat([e.labels[0] for e in examples])
    lengths = tuple(int(e.input_ids.shape[1]) for e in examples)
    positions = torch.cat([torch.arange(n) for n in lengths])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE
    return TrainingExample(ids[None], labels[None], None, positions[None], lengths)
