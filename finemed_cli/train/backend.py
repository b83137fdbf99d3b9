"""Where and how a training run computes: the backend (transformers + peft, or unsloth on CUDA), how LoRA
stages chain, the precision (autocast), loading the model for training and the final merge."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from finemed_cli.checkpoints.loading import LoadedModel, cpu_has_fast_bf16, cuda_has_bf16
from finemed_cli.config.train import TrainConfig
from finemed_cli.errors import ConfigError

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_backend(cfg: TrainConfig, forced: str | None = None) -> str:
    """unsloth when CUDA and unsloth are there (or asked for), transformers+peft otherwise."""
    want = forced or cfg.model.backend
    cuda = torch.cuda.is_available()
    if want == "transformers" or (want == "auto" and cfg.model.fsdp):
        return "transformers"
    if want == "unsloth" and not cuda:
        raise ConfigError("model.backend unsloth needs an NVIDIA GPU; use backend: transformers (or auto) here")
    if want in ("unsloth", "auto") and cuda:
        try:
            import unsloth  # noqa: F401
        except ImportError:
            if want == "unsloth":
                raise ConfigError("model.backend unsloth: unsloth is not installed; pip install 'finemed[gpu]'") from None
            return "transformers"
        return "unsloth"
    return "transformers"


def pick_chain(cfg: TrainConfig, backend: str) -> str:
    """How LoRA stages follow each other: `merge` or `continue` (see the module docstring)."""
    want = cfg.model.lora.between_stages
    if want == "auto":
        return "continue" if cfg.model.method == "qlora" or backend == "unsloth" else "merge"
    if want == "merge" and backend == "unsloth":
        raise ConfigError("model.lora.between_stages merge runs on the transformers backend only (unsloth "
                          "patches a model's LoRA layers once); use continue (or auto) with unsloth")
    return want


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """`precision: auto`: bf16 on a GPU of compute capability 8.0 and up or a CPU with native bf16 matmuls,
    fp16 (with loss scaling) on older GPUs, else fp32. bf16 asked for on an older GPU is refused."""
    p = cfg.model.precision
    if device.startswith("cuda") and p in ("auto", "bf16") and not cuda_has_bf16(device):
        if p == "bf16":
            raise ConfigError("model.precision bf16: this GPU has no native bf16 (compute capability below 8.0); "
                              "use auto (fp16 with loss scaling) or fp32")
        return "fp16"
    if p == "auto":
        return "bf16" if device.startswith("cuda") or cpu_has_fast_bf16() else "fp32"
    return p


def autocast(device: str, precision: str) -> Any:
    """Forward passes under autocast for bf16/fp16. On CPU the weights stay fp32 (the masters the merged
    stages accumulate into) and only the matmuls run in bf16; on GPU the weights are loaded in bf16 already."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(kind, dtype=dtype)


def load_for_training(cfg: TrainConfig, backend: str, dev: str, weights: str) -> LoadedModel:
    """The base model to train, on `dev` with `weights` precision (unsloth: its own loader, finemed's tokenizer)."""
    from finemed_cli.checkpoints.loading import load_model, load_tokenizer, resolve_model_source

    if backend != "unsloth":  # qlora here: bitsandbytes NF4 through transformers, as unsloth loads it on CUDA
        return load_model(cfg.model.name, device=dev, dtype=weights,
                          quantize="nf4" if cfg.model.method == "qlora" else None)
    from finemed_cli.train import unsloth_backend

    name, source, _ = resolve_model_source(cfg.model.name)
    # finemed's tokenizer, not unsloth's (which may fix up pad tokens): both backends tokenize the same.
    return LoadedModel(unsloth_backend.load(cfg, WEIGHT_DTYPES[weights]), load_tokenizer(cfg.model.name),
                       name, source)


def merge_final(cfg: TrainConfig, adapter_dir: Path, weights: str) -> Any:
    """The base model loaded afresh (CPU, `weights` dtype) with the adapter in `adapter_dir` merged in: for
    a `continue` run, whose base in training may have been 4-bit."""
    from peft import PeftModel

    from finemed_cli.checkpoints.loading import load_model

    base = load_model(cfg.model.name, device="cpu", dtype=weights)
    return PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload().eval()
