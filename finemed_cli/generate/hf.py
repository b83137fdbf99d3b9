"""Generation with transformers `generate` on the live (possibly TTT-adapted) model."""

from __future__ import annotations

import time
from typing import Any

import torch

from finemed_cli.generate.base import GenerationResult, budgeted_generate
from finemed_cli.modeling.prompts import Message, end_of_generation_ids, prompt_ids


class TransformersGenerator:
    """Greedy or seeded sampling with the model's chat template. The LoRA adapter, if any, is already
    attached to the model, so `adapter` is not needed here."""

    backend = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int | None:
        """The positions the model was trained for (prompt + response must fit)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.inference_mode()
    def generate(self, messages: list[Message], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.95, seed: int = 0, adapter: Any = None,
                 thought_tokens: int | None = None) -> GenerationResult:
        start = time.perf_counter()
        ids = prompt_ids(self.tokenizer, messages)
        device = next(self.model.parameters()).device
        eog = end_of_generation_ids(self.tokenizer, self.model)
        kwargs: dict[str, Any] = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eog}
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        def cont(prefix: list[int], budget: int) -> tuple[list[int], bool]:
            x = torch.tensor([prefix], device=device)
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=budget, **kwargs)
            new = out[0, x.shape[1]:].tolist()
            if new and new[-1] in eog:
                return new[:-1], True
            return new, False

        new = budgeted_generate(cont, self.tokenizer, ids, max_new_tokens, thought_tokens)
        text = self.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(text.strip(), len(new), time.perf_counter() - start, self.backend)
