"""Training examples for TTT, built from retrieved corpus records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from finemed_cli.data.records import CorpusRecord
from finemed_cli.generate.prompts import example_messages, tokenize_prompt_completion

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainingExample:
    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T), IGNORE where no loss
    attention_mask: torch.Tensor | None = None  # only when padded

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def lora_examples(tokenizer: Any, records: list[CorpusRecord], max_length: int) -> list[TrainingExample]:
    """One unpadded example per record; loss on the assistant (Thought + Summarization) tokens only.

    Longer examples keep their prompt and lose the end of the response.
    """
    out = []
    for r in records:
        prompt, completion = example_messages(r)
        ids, n_prompt = tokenize_prompt_completion(tokenizer, prompt, completion)
        if len(ids) > max_length:
            ids = ids[:max_length]
        if n_prompt >= len(ids) - 1:
            logger.warning("neighbour %s: prompt fills the %d-token budget; skipped", r.id, max_length)
            continue
        labels = list(ids)
        labels[:n_prompt] = [IGNORE] * n_prompt
        out.append(TrainingExample(torch.tensor([ids]), torch.tensor([labels])))
    return out


def paper_examples(tokenizer: Any, records: list[CorpusRecord], pad_to: int) -> list[TrainingExample]:
    """The reference procedure's examples: the whole retrieved text as the target, right-padded to
    `pad_to` tokens (truncated there too), padding excluded from the loss; pad_to=0 turns padding off."""
    out = []
    for r in records:
        prompt, completion = example_messages(r)
        ids, _ = tokenize_prompt_completion(tokenizer, prompt, completion)
        if pad_to:
            ids = ids[:pad_to]
        n = len(ids)
        pad = pad_to - n if pad_to else 0
        input_ids = ids + [tokenizer.pad_token_id] * pad
        labels = ids + [IGNORE] * pad
        mask = [1] * n + [0] * pad
        out.append(TrainingExample(torch.tensor([input_ids]), torch.tensor([labels]), torch.tensor([mask])))
    return out


def pad_batch(examples: list[TrainingExample], pad_id: int) -> TrainingExample:
    """Right-pad unpadded examples into one (R, T) batch; padding gets no loss and no attention. With
    causal attention and right padding, every real token sees exactly what it saw unpadded."""
    width = max(e.input_ids.shape[1] for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = e.input_ids.shape[1]
        ids[i, :n] = e.input_ids[0]
        labels[i, :n] = e.labels[0]
        mask[i, :n] = 1
    return TrainingExample(ids, labels, mask)
