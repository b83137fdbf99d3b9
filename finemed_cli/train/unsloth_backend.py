"""The unsloth backend of `finemed train` (CUDA, `pip install 'finemed[gpu]'`).

unsloth loads the model (4-bit NF4 for `method: qlora`) and swaps in its fused attention, MLP, RMSNorm and
LoRA kernels; finemed's own loop (`trainer.Trainer`) trains it exactly as on the transformers backend: the
same packed rows, the same loss, optimizer, schedule, checkpoints and metrics. Only loading and adapter
creation differ, so the two backends share every line that decides what is learned.

Packed rows reach unsloth's attention through `packed_seq_lengths`, the argument its padding-free path
reads (our `modeling.varlen` attention interface is not used there: unsloth replaces the attention forward).
An architecture whose attention unsloth leaves to transformers is refused rather than trained with
sequences attending across each other.

A 4-bit base cannot absorb an adapter exactly, so unsloth runs chain the stages with one adapter
(`model.lora.between_stages: continue`) and the final merge loads the 16-bit base afresh
(`backend.merge_final`): the merged model carries no quantization error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from finemed_cli.config.train import TrainConfig
from finemed_cli.errors import ConfigError

logger = logging.getLogger(__name__)

# Set on models loaded here; `modeling.loss` passes packed sequence lengths under this argument name.
PACKED_KWARG = "packed_seq_lengths"


def fast_language_model() -> Any:
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise ConfigError(f"model.backend unsloth: unsloth cannot be imported ({e}); "
                          "pip install 'finemed[gpu]'") from None
    return FastLanguageModel


def load(cfg: TrainConfig, dtype: torch.dtype) -> Any:
    """The model of `cfg` through unsloth, frozen; 4-bit for qlora, trainable weights for full."""
    from finemed_cli.checkpoints.loading import resolve_model_source

    # Always a local HF directory: a GGUF model.name arrives dequantised into safetensors, which unsloth loads
    # like any checkpoint (and quantises to 4 bits itself for qlora).
    _, source, _ = resolve_model_source(cfg.model.name)
    flm = fast_language_model()
    model, _ = flm.from_pretrained(
        model_name=source,
        max_seq_length=max(s.max_length for s in cfg.stages),
        dtype=dtype,
        load_in_4bit=cfg.model.method == "qlora",
        full_finetuning=cfg.model.method == "full",
        use_gradient_checkpointing="unsloth" if cfg.model.gradient_checkpointing else False,
        random_state=cfg.seed,
    )
    if _fast_attention(model):
        model.finemed_packed_kwarg = PACKED_KWARG
    elif unsloth_device() != "cpu":
        raise ConfigError(f"model.name {cfg.model.name}: unsloth leaves this architecture's attention to "
                          "transformers, where finemed's packed rows need backend: transformers")
    # (unsloth's CPU fallback is stock transformers + peft: there `modeling.varlen` packs as on that backend.)
    if cfg.model.method != "full":
        model.requires_grad_(False)
    logger.info("unsloth loaded %s (%s)", source, "4-bit" if cfg.model.method == "qlora" else dtype)
    return model


def unsloth_device() -> str:
    import unsloth

    return str(getattr(unsloth, "DEVICE_TYPE", "cuda"))


def _fast_attention(model: Any) -> bool:
    """Whether unsloth replaced the model's attention forward (which reads `packed_seq_lengths`)."""
    forward = type(model.get_decoder().layers[0].self_attn).forward
    return getattr(forward, "__module__", "").startswith("unsloth")


def add_lora(model: Any, cfg: TrainConfig, seed: int) -> Any:
    """unsloth's LoRA (its fused LoRA kernels where dropout is 0) with the config's rank, alpha and targets."""
    lora = cfg.model.lora
    peft_model = fast_language_model().get_peft_model(
        model,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        use_gradient_checkpointing="unsloth" if cfg.model.gradient_checkpointing else False,
        random_state=seed,
    )
    if getattr(model, "finemed_packed_kwarg", None):
        peft_model.finemed_packed_kwarg = model.finemed_packed_kwarg
    return peft_model
