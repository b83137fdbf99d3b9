"""The architectures finemed exports: HF config → GGUF hyper-parameters, and HF tensor → GGUF tensor.

Llama-family (Llama 2/3.x, SmolLM2, Mistral without sliding window) and Qwen2-family. Each differs from
the other in two ways that matter here: llama.cpp's `llama` graph uses interleaved ("normal") RoPE, so the
HF q/k projections (half-split rotary layout) are row-permuted on the way out; `qwen2` uses NeoX RoPE and
keeps them, and has q/k/v biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finemed_cli.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH name, e.g. "llama"
    permute_qk: bool  # HF rotary layout → llama.cpp's interleaved one


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", permute_qk=True),
    "MistralForCausalLM": ArchSpec("llama", permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", permute_qk=False),
}


def arch_of(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    """(HF architecture, its spec).

    Raises:
        ExportError: the architecture is not supported, naming the ones that are.
    """
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            if name == "MistralForCausalLM" and config.get("sliding_window"):
                raise ExportError("Mistral with a sliding attention window is not supported by finemed export")
            return name, ARCHITECTURES[name]
    raise ExportError(f"cannot export architecture {', '.join(names) or '(none in config.json)'}; finemed "
                      f"exports {', '.join(ARCHITECTURES)}")


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings across transformers versions: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def write_hparams(writer: Any, config: dict[str, Any]) -> None:
    """Write the GGUF hyper-parameter keys of a supported architecture."""
    import gguf

    hd = head_dim(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(hd)
    rope = rope_params(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 scaling is the rope_freqs tensor, see llama3_rope_factors
        raise ExportError(f"RoPE scaling {kind!r} is not supported; finemed exports default, linear, yarn "
                          "and llama3")


def llama3_rope_factors(config: dict[str, Any]) -> Any | None:
    """Llama 3.1's frequency-dependent RoPE scaling, as the per-frequency divisors llama.cpp reads from the
    `rope_freqs` tensor; None for other models."""
    import numpy as np

    rope = rope_params(config)
    if rope["rope_type"] != "llama3":
        return None
    base, dim = float(rope["rope_theta"]), head_dim(config)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:  # high frequencies: unscaled
            out.append(1.0)
        elif wavelen > low_wavelen:  # low frequencies: scaled by the full factor
            out.append(factor)
        else:  # a smooth blend between the two
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_rows(w: Any, n_head: int) -> Any:
    """HF's rotary layout (first half, second half of each head) → llama.cpp's interleaved pairs, on the
    output rows of a q/k weight, bias or LoRA B matrix."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
