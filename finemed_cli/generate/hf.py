"""Generation with transformers `generate` on the live (possibly TTT-adapted) model."""

from __future__ import annotations

import time
from typing import Any

import torch

from finemed_cli.generate.base import GenerationResult
from finemed_cli.generate.prompts import Message, render_chat


class TransformersGenerator:
    """Greedy or seeded sampling with the model's chat template. The LoRA adapter, if any, is already
    attached to the model, so `adapter` is not needed here."""

    backend = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, messages: list[Message], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.95, seed: int = 0, adapter: Any = None) -> GenerationResult:
        start = time.perf_counter()
        prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(next(self.model.parameters()).device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "eos_token_id": self.tokenizer.eos_token_id}
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(text.strip(), int(new.numel()), time.perf_counter() - start, self.backend)
