"""llama.cpp (llama-cpp-python) in finemed: one front end (`LlamaCpp`) for every verb that runs a GGUF.

The base GGUF is loaded once. For each question the adapter TTT trained (in torch) is written as a LoRA
GGUF, loaded with `llama_adapter_lora_init`, set on the context with `llama_set_adapters_lora`, used, then
cleared and freed: the base is never reloaded.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.backends import default_gpu_layers, require_llama_cpp
from finemed_cli.config.answer import DEFAULT_CONTEXT
from finemed_cli.errors import ModelError
from finemed_cli.generate.base import GenerationResult, budgeted_generate
from finemed_cli.gguf.constants import SYSTEM_PROMPT_KEY
from finemed_cli.gguf.header import gguf_context_length
from finemed_cli.modeling.prompts import prompt_ids
from finemed_cli.modeling.template import FALLBACK_TEMPLATE, Message, check_template, render_template

logger = logging.getLogger(__name__)


def context_size(path: str | os.PathLike[str], n_ctx: int | None) -> int:
    """The context to open on a GGUF: `n_ctx` as asked, refused past the context the model was trained on
    (llama.cpp would allocate it: --ctx 1,000,000 on the 135M embedded model took 23 GB before the first
    token); None: 4096, or the trained context when shorter.

    Raises:
        ModelError: `n_ctx` is longer than the GGUF's `<arch>.context_length`, naming --ctx-size and that maximum.
    """
    trained = gguf_context_length(path)
    if n_ctx is None:
        return min(DEFAULT_CONTEXT, trained or DEFAULT_CONTEXT)
    if trained is not None and n_ctx > trained:
        raise ModelError(f"--ctx-size {n_ctx}: {Path(path).name} was trained on a context of {trained:,} tokens; "
                         f"pass --ctx-size {trained} or less")
    return n_ctx


def _defer_llama_cpp_templates(llama_cpp: Any) -> None:
    """Keep llama-cpp-python from compiling the GGUF's chat templates when a model opens: finemed renders them
    itself, bounded (`modeling.template`), while llama-cpp-python's own sandbox folds a constant such as
    `'x' * 10**10` while compiling (10 GB at load) and raises a syntax error past finemed's error handling.
    Its chat handler is compiled when first called instead, which finemed never does."""
    formatters = llama_cpp.llama_chat_format
    original = formatters.Jinja2ChatFormatter
    if getattr(original, "deferred_by_finemed", False):
        return

    class Deferred(original):
        deferred_by_finemed = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._given = (args, kwargs)

        def to_chat_handler(self) -> Any:
            args, kwargs = self._given
            return lambda *a, **k: original(*args, **kwargs).to_chat_handler()(*a, **k)

    formatters.Jinja2ChatFormatter = Deferred


def open_gguf(path: str | os.PathLike[str], *, n_ctx: int = DEFAULT_CONTEXT, threads: int | None = None,
              exact: bool = False, logits_all: bool = False, n_gpu_layers: int | None = None) -> Any:
    """A `llama_cpp.Llama` on a GGUF file, quiet.

    Args:
        n_gpu_layers: layers offloaded to the GPU (-1: all); None: `default_gpu_layers()`.
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
    _defer_llama_cpp_templates(llama_cpp)
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, logits_all=logits_all,
                               n_gpu_layers=default_gpu_layers() if n_gpu_layers is None else n_gpu_layers,
                               verbose=False, **kwargs)
    except ValueError as e:
        if "llama_context" in str(e):  # the model loaded; its context (KV cache, buffers) could not be made
            trained = gguf_context_length(path)
            most = f"at most {trained:,}, the context it was trained on" if trained else "a smaller one"
            raise ModelError(f"llama.cpp cannot allocate a context of {n_ctx:,} tokens for {path} (--ctx-size); pass "
                             f"{most}") from None
        raise ModelError(f"{path}: llama.cpp cannot load it ({e}); is it a GGUF model file?") from None


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy at temperature 0, else seeded sampling. finemed's own generation
    samples by temperature and top-p alone (`top_k=0, min_p=0`); the synth judge keeps llama-cpp-python's
    chat defaults (top-k 40, min-p 0.05) that its runs were measured with."""

    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"temp": 0.0}
        return {"temp": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}


class LlamaCpp:
    """finemed's one llama.cpp front end: a loaded GGUF, its chat template rendered by finemed's renderer
    (`modeling.template`, the same text as the HF tokenizer gives), token streaming that stops on every
    end-of-generation token the model declares, optional grammar (JSON schemas), and LoRA adapters swapped
    in per call without reloading the model. `answer`, `chat` and `synth` build on it."""

    def __init__(self, gguf_path: str | os.PathLike[str], *, n_ctx: int = DEFAULT_CONTEXT,
                 threads: int | None = None, exact: bool = False, logits_all: bool = False,
                 model_config: dict[str, Any] | None = None, n_gpu_layers: int | None = None) -> None:
        """
        Args:
            gguf_path: the model's GGUF.
            n_ctx, threads, exact, logits_all, n_gpu_layers: as `open_gguf`.
            model_config: the HF config.json of the base (names an adapter's tensors); None when no finemed
                adapter will be given.
        """
        self.llama_cpp = require_llama_cpp()
        self.gguf_path = Path(gguf_path)
        self.llm = open_gguf(gguf_path, n_ctx=n_ctx, threads=threads, exact=exact, logits_all=logits_all,
                             n_gpu_layers=n_gpu_layers)
        self.model_config = model_config
        self._vocab = self.llama_cpp.llama_model_get_vocab(self.llm.model)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="finemed-lora-")
        from gguf import Keys

        meta = self.llm.metadata
        self.template = meta.get(Keys.Tokenizer.CHAT_TEMPLATE) or FALLBACK_TEMPLATE
        self.special_tokens = {"bos_token": self._token_text(meta.get(Keys.Tokenizer.BOS_ID)),
                               "eos_token": self._token_text(meta.get(Keys.Tokenizer.EOS_ID))}
        self.trained_system_prompt: str | None = meta.get(SYSTEM_PROMPT_KEY)  # finemed-trained models'
        self.general_name: str = meta.get(Keys.General.NAME) or ""
        try:  # a broken template named now, with its GGUF, not at the first turn or request
            check_template(self.template, origin=self.gguf_path, **self.special_tokens)
        except ModelError:
            self.close()
            raise

    def _token_text(self, tid: Any) -> str:
        if tid is None:
            return ""
        return self.llm.detokenize([int(tid)], special=True).decode("utf-8", errors="replace")

    @property
    def context_length(self) -> int:
        """llama.cpp's context (prompt + response must fit)."""
        return int(self.llm.n_ctx())

    def close(self) -> None:
        self.llm.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- prompts ------------------------------------------------------------------------------------------
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The conversation through the GGUF's own chat template."""
        return render_template(self.template, messages, add_generation_prompt, origin=self.gguf_path,
                               **self.special_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text: special tokens parsed, no BOS added (the template writes its own)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def is_eog(self, token: int) -> bool:
        return bool(self.llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # --- decoding -----------------------------------------------------------------------------------------
    def stream(self, ids: list[int], budget: int, sampling: Sampling = Sampling(), grammar: Any = None,
               reuse_prefix: bool = True) -> Iterator[int]:
        """Up to `budget` new token ids after `ids`, ending before the first end-of-generation token.

        With `reuse_prefix` the KV cache of the prefix shared with the last call is kept (a chat's earlier
        turns are not evaluated again). Without it the whole prompt is evaluated afresh, so the answer does not
        depend on what came before: the cached prefix and a freshly evaluated one differ in rounding (the
        suffix runs in a smaller batch), and on a quantized model that flipped a greedy token within 20 tokens
        (embedded SmolLM2 Q4_1, the same request twice). The server wants that independence.
        """
        if budget <= 0:
            return
        if len(ids) + budget > self.context_length:
            raise ModelError(f"prompt ({len(ids)} tokens) + budget ({budget}) exceed the context of "
                             f"{self.context_length} tokens; lower the token budget or shorten the prompt")
        if not reuse_prefix:
            self.llm.reset()
        self.llm.set_seed(sampling.seed)
        for count, token in enumerate(self.llm.generate(ids, reset=True, repeat_penalty=1.0, grammar=grammar,
                                                        **sampling.kwargs()), start=1):
            if self.is_eog(token):
                return
            yield token
            if count >= budget:
                return

    def complete_text(self, ids: list[int], budget: int, sampling: Sampling = Sampling(), grammar: Any = None,
                      stop: list[str] | None = None) -> str:
        """The text of up to `budget` tokens after `ids`, cut before the first of `stop` (strings)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        for token in self.stream(ids, budget, sampling, grammar):
            text += decoder.decode(self.llm.detokenize([token]))
            cut = min((i for i in (text.find(s) for s in stop or ()) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
        return text + decoder.decode(b"", final=True)

    # --- adapters -----------------------------------------------------------------------------------------
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
        from finemed_cli.export.lora_gguf import export_lora_gguf

        if self.model_config is None:
            raise ModelError("a LoRA adapter needs the base model's config to be exported for llama.cpp")
        path = Path(self._tmpdir.name) / "adapter.gguf"
        return export_lora_gguf(adapter, self.model_config, path, "f32")

    def evaluate(self, ids: list[int], reuse_prefix: bool = False) -> None:
        """Run `ids` through the model (with `logits_all`, every position's logits land in `llm.scores`); with
        `reuse_prefix`, the KV cache (and the logits rows) of the prefix shared with what the context holds are
        kept, and only the rest is evaluated (the last token always is)."""
        llm, n = self.llm, 0
        if reuse_prefix:
            held = llm.input_ids[: llm.n_tokens]
            while n < min(len(held), len(ids) - 1) and held[n] == ids[n]:
                n += 1
        llm.reset()
        llm.n_tokens = n
        llm.eval(ids[n:])

    def logprobs(self, ids: list[int]) -> Any:
        """Normalised next-token log-probabilities (numpy, len(ids) × vocab) at every position; needs
        `logits_all=True` (parity tests)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(axis=-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


class LlamaCppGenerator(LlamaCpp):
    """`finemed answer`'s llama.cpp generator: prompts tokenized by the HF tokenizer that TTT used (so both
    generators see the same prompt ids), the question's TTT adapter applied per call."""

    backend = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike[str], tokenizer: Any, model_config: dict[str, Any] | None,
                 **kwargs: Any) -> None:
        super().__init__(gguf_path, model_config=model_config, **kwargs)
        self.tokenizer = tokenizer

    def continue_ids(self, prefix: list[int], budget: int, temperature: float = 0.0, top_p: float = 0.95,
                     seed: int = 0) -> tuple[list[int], bool]:
        """Up to `budget` new tokens after `prefix`; returns (new ids without the end-of-generation token,
        whether it stopped there)."""
        new = list(self.stream(prefix, budget, Sampling(temperature, top_p, seed=seed)))
        return new, len(new) < budget

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
