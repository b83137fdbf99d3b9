"""The architectures finemed exports, one registry entry each: HF config → GGUF hyper-parameters, and HF
tensor → GGUF tensor (names from gguf-py's tensor map).

- Llama 2/3.x (tied or untied, llama3 RoPE scaling as the rope_freqs tensor), SmolLM2, Mistral without a
  sliding window: llama.cpp's `llama` graph uses interleaved ("normal") RoPE, so the HF q/k projections
  (half-split rotary layout) are row-permuted on the way out.
- Qwen2/2.5 (q/k/v biases), Qwen3 (q/k RMSNorms), Gemma 2/3 and Phi-3 use NeoX RoPE and keep them.
- Gemma 2/3: RMSNorm scales by (1 + w), llama.cpp's by w, so every norm weight (q/k norms included) is
  written w + 1. The embedding scale by sqrt(hidden) and the query scale 1/sqrt(head_dim) live in llama.cpp's
  graph (it never reads query_pre_attn_scalar), so a config that differs is refused; the window, Gemma 3's
  layer pattern and local RoPE base, and the soft-capping values are keys. transformers skips Gemma 2's
  attention soft-capping under SDPA, so finemed loads Gemma 2 with eager attention (checkpoints/loading.py).
- Phi-3: fused qkv and gate_up projections are llama.cpp's own layout; partial rotary dimensions are a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finemed_cli.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    """One architecture finemed exports: its gguf-py `MODEL_ARCH`, how its tensors change on the way out, its
    own hyper-parameters, and why llama.cpp cannot run a given config of it (None: it can)."""

    arch: Any  # gguf.MODEL_ARCH member name, e.g. "LLAMA"
    permute_qk: bool = False  # HF half-split rotary layout → llama.cpp's interleaved one (`llama` graph only)
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + w); llama.cpp by w: norms are written w + 1
    extra_hparams: Callable[[Any, dict[str, Any]], None] | None = None
    refusal: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def gguf_arch(self) -> str:
        """The `general.architecture` string, from gguf-py's table (e.g. "llama", "gemma3")."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[self.arch]]

    def tensor_names(self, n_layers: int) -> Any:
        import gguf

        return gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch], n_layers)


def _mistral_refusal(config: dict[str, Any]) -> str | None:
    window = config.get("sliding_window")
    if window and window < int(config.get("max_position_embeddings") or 0):
        return (f"Mistral with a sliding attention window ({window} tokens) runs in llama.cpp's `llama` graph, "
                "which has none: answers past the window would differ from the model's")
    return None


def _gemma_query_refusal(config: dict[str, Any]) -> str | None:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim) (27B-sized models: hidden/heads); a config whose
    `query_pre_attn_scalar` says otherwise would run with the wrong attention temperature."""
    scalar, hd = config.get("query_pre_attn_scalar"), head_dim(config)
    if scalar is None or int(scalar) == hd:
        return None
    if int(config["num_hidden_layers"]) in (46, 62) and int(scalar) == config["hidden_size"] // config[
            "num_attention_heads"]:
        return None  # Gemma 2/3 27B: llama.cpp knows this size
    return f"query_pre_attn_scalar {scalar} is not the head size {hd}, which llama.cpp assumes for this size"


def _gemma2_hparams(writer: Any, config: dict[str, Any]) -> None:
    writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
    writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
    writer.add_sliding_window(int(config["sliding_window"]))


def _gemma3_hparams(writer: Any, config: dict[str, Any]) -> None:
    writer.add_sliding_window(int(config["sliding_window"]))
    per_type = config.get("rope_parameters") or {}
    if isinstance(per_type.get("sliding_attention"), dict):  # transformers 5: rope per layer type
        local = per_type["sliding_attention"].get("rope_theta", 10000.0)
    else:  # hub configs (transformers 4): the global rope_theta is not the local one
        local = config.get("rope_local_base_freq", 10000.0)
    writer.add_rope_freq_base_swa(float(local))
    types = config.get("layer_types")
    if types:  # llama.cpp's default is every sixth layer global; say which, whatever the pattern
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _phi3_refusal(config: dict[str, Any]) -> str | None:
    if rope_params(config)["rope_type"] in ("longrope", "su"):
        return "Phi-3 LongRoPE (the 128k-context models) is not exported by finemed; use a 4k-context model"
    window = config.get("sliding_window")
    if window and window < int(config.get("max_position_embeddings") or 0):
        return f"a sliding window of {window} tokens, shorter than the {config['max_position_embeddings']} context"
    return None


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LLAMA", permute_qk=True),
    "MistralForCausalLM": ArchSpec("LLAMA", permute_qk=True, refusal=_mistral_refusal),
    "Qwen2ForCausalLM": ArchSpec("QWEN2"),
    "Qwen3ForCausalLM": ArchSpec("QWEN3"),
    "Gemma2ForCausalLM": ArchSpec("GEMMA2", norm_offset=True, extra_hparams=_gemma2_hparams,
                                  refusal=_gemma_query_refusal),
    "Gemma3ForCausalLM": ArchSpec("GEMMA3", norm_offset=True, extra_hparams=_gemma3_hparams,
                                  refusal=_gemma_query_refusal),
    "Phi3ForCausalLM": ArchSpec("PHI3", refusal=_phi3_refusal),
}


def arch_of(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    """(HF architecture, its spec).

    Raises:
        ExportError: the architecture is not supported (naming the ones that are), or this config of it is
            one llama.cpp cannot run as transformers does (saying why).
    """
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            spec = ARCHITECTURES[name]
            why = spec.refusal(config) if spec.refusal else None
            if why:
                raise ExportError(f"cannot export this {name}: {why}")
            return name, spec
    raise ExportError(f"cannot export architecture {', '.join(names) or '(none in config.json)'}; finemed "
                      f"exports {', '.join(ARCHITECTURES)}")


def rope_params(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """RoPE settings across transformers versions: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`
    (per layer type for Gemma 3: `layer_type`'s)."""
    params = dict(config.get("rope_parameters") or {})
    if isinstance(params.get(layer_type), dict) or isinstance(params.get("full_attention"), dict):
        params = dict(params.get(layer_type) or {})
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
    writer.add_rope_dimension_count(int(hd * float(config.get("partial_rotary_factor") or 1.0)))  # Phi-3
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
    spec = arch_of(config)[1]
    if spec.extra_hparams is not None:
        spec.extra_hparams(writer, config)


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
