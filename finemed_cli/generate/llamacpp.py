"""Generation with llama.cpp on a GGUF of the model, the TTT adapter swapped in per question.

The base GGUF is loaded once. For each question the adapter TTT trained (in torch) is written as a LoRA
GGUF, loaded with `llama_adapter_lora_init`, set on the context with `llama_set_adapters_lora`, used, then
cleared and freed: the base is never reloaded. Prompts are tokenized by the HF tokenizer that TTT used, so
both generators see the same prompt ids.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finemed_cli.backends import require_llama_cpp
from finemed_cli.errors import ModelError
from finemed_cli.generate.base import GenerationResult, budgeted_generate
from finemed_cli.generate.prompts import Message, prompt_ids

logger = logging.getLogger(__name__)


def open_gguf(path: str | os.PathLike[str], *, n_ctx: int = 4096, threads: int | None = None,
              exact: bool = False, logits_all: bool = False) -> Any:
    """A `llama_cpp.Llama` on a GGUF file, quiet.

    Args:
        exact: F32 KV cache and no flash attention: with llama.cpp's default F16 cache even an F32 model
            differs from transformers by up to 1.2e-2 in log-probability, with F32 by 5e-5 (DESIGN.md).
        logits_all: keep the logits of every position (for scoring and parity tests).
    """
    llama_cpp = require_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    if threads is None:
        import torch

        # llama.cpp's default is half the cores (1 of 2 here): all of them gave 91 vs 74 tokens/s on the
        # embedded F16 model; torch's count is the physical cores it found.
        threads = torch.get_num_threads()
    kwargs: dict[str, Any] = {}
    if exact:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, logits_all=logits_all,
                               verbose=False, **kwargs)
    except ValueError as e:
        raise ModelError(f"{path}: llama.cpp cannot load it ({e}); is it a GGUF model file?") from None


class LlamaCppGenerator:
    """Greedy or seeded sampling with llama.cpp; LoRA adapters applied per call without reloading."""

    backend = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike[str], tokenizer: Any, model_config: dict[str, Any] | None,
                 *, n_ctx: int = 4096, threads: int | None = None, exact: bool = False,
                 logits_all: bool = False) -> None:
        """
        Args:
            gguf_path: the base model's GGUF.
            tokenizer: the HF tokenizer (prompt rendering and ids, decoding), as TTT uses it.
            model_config: the HF config.json of the base (to name the adapter's tensors); None when no
                adapter will be given.
        """
        self.llama_cpp = require_llama_cpp()
        self.llm = open_gguf(gguf_path, n_ctx=n_ctx, threads=threads, exact=exact, logits_all=logits_all)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.gguf_path = Path(gguf_path)
        self._vocab = self.llama_cpp.llama_model_get_vocab(self.llm.model)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="finemed-lora-")

    @property
    def context_length(self) -> int:
        """llama.cpp's context (prompt + response must fit)."""
        return int(self.llm.n_ctx())

    def close(self) -> None:
        self.llm.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> LlamaCppGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def adapter_applied(self, adapter: Any, scale: float = 1.0) -> Iterator[None]:
        """Apply a LoRA (finemed `LoRAAdapter`, `LoraWeights`, peft dir or a LoRA .gguf) for the block."""
        if adapter is None:
            yield
            return
        lc = self.llama_cpp
        path = self._adapter_gguf(adapter)
        handle = lc.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise ModelError(f"llama.cpp refused the LoRA adapter {path} for {self.gguf_path.name}")
        try:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(scale)
            if lc.llama_set_adapters_lora(self.llm.ctx, arr, 1, scales) != 0:
                raise ModelError("llama.cpp failed to set the LoRA adapter on the context")
            self.llm.reset()  # cached positions were computed without this adapter
            yield
        finally:
            lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            lc.llama_adapter_lora_free(handle)
            self.llm.reset()
            if path.parent == Path(self._tmpdir.name):
                path.unlink(missing_ok=True)

    def _adapter_gguf(self, adapter: Any) -> Path:
        if isinstance(adapter, (str, os.PathLike)) and str(adapter).endswith(".gguf"):
            return Path(adapter)
        from finemed_cli.export.lora import export_lora_gguf

        if self.model_config is None:
            raise ModelError("a LoRA adapter needs the base model's config to be exported for llama.cpp")
        path = Path(self._tmpdir.name) / "adapter.gguf"
        return export_lora_gguf(adapter, self.model_config, path, "f32")

    def _is_eog(self, token: int) -> bool:
        return bool(self.llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def continue_ids(self, prefix: list[int], budget: int, temperature: float = 0.0, top_p: float = 0.95,
                     seed: int = 0) -> tuple[list[int], bool]:
        """Up to `budget` new tokens after `prefix` (the KV cache of a shared prefix is reused); returns
        (new ids without the end-of-generation token, whether it stopped there)."""
        self.llm.set_seed(seed)
        new: list[int] = []
        if budget <= 0:
            return new, False
        if len(prefix) + budget > self.llm.n_ctx():
            raise ModelError(f"prompt ({len(prefix)} tokens) + budget ({budget}) exceed the context of "
                             f"{self.llm.n_ctx()} tokens; lower --max-new-tokens")
        sampling = ({"temp": 0.0} if temperature <= 0 else
                    {"temp": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0})
        for token in self.llm.generate(prefix, reset=True, repeat_penalty=1.0, **sampling):
            if self._is_eog(token):
                return new, True
            new.append(token)
            if len(new) >= budget:
                break
        return new, False

    def generate(self, messages: list[Message], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.95, seed: int = 0, adapter: Any = None,
                 thought_tokens: int | None = None) -> GenerationResult:
        start = time.perf_counter()
        ids = prompt_ids(self.tokenizer, messages)
        with self.adapter_applied(adapter):
            new = budgeted_generate(
                lambda p, b: self.continue_ids(p, b, temperature, top_p, seed),
                self.tokenizer, ids, max_new_tokens, thought_tokens)
        text = self.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(text.strip(), len(new), time.perf_counter() - start, self.backend)

    def logprobs(self, ids: list[int]) -> Any:
        """Normalised next-token log-probabilities (numpy, len(ids) × vocab) at every position; needs
        `logits_all=True` (parity tests)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(axis=-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
