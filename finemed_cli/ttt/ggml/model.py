"""A Llama GGUF opened for ggml graphs: the frozen weights are the file's own bytes (memory-mapped, at the
file's type: F32, Q8_0, Q4_K…, never dequantised), and a forward graph over them with LoRA terms.

The graph follows llama.cpp's `llm_build_llama` (rms_norm, rope in normal mode on the GGUF's permuted q/k,
grouped-query attention by mul_mat broadcasting, silu·up MLP), so an adapter trained on it is an adapter
for what llama.cpp runs.
"""

from __future__ import annotations

import ctypes as C
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finemed_cli.errors import ModelError
from finemed_cli.ttt.ggml.bindings import GGML_ROPE_TYPE_NORMAL, GGUFInitParams, load_ggml, tensor

# HF projection names (TTTConfig.targets) → llama.cpp's tensor names in a block
GGUF_TARGETS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters a Llama graph needs, read from the GGUF's `llama.*` keys."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_rot: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class GGUFWeights:
    """The GGUF's tensors as ggml tensors whose data points into a read-only memory map of the file."""

    path: Path
    shape: LlamaShape
    ctx: int
    gguf: int
    tensors: dict[str, int] = field(default_factory=dict)
    _map: np.memmap | None = None

    def get(self, name: str) -> int | None:
        return self.tensors.get(name)

    def weight(self, name: str) -> int:
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: no tensor {name}")
        return t

    def type_name(self, name: str) -> str:
        """The ggml type a tensor is stored at (`f32`, `q8_0`, `q4_K`…)."""
        return load_ggml().ggml_type_name(tensor(self.weight(name)).type).decode()

    def out_shape(self, name: str) -> tuple[int, int]:
        """(in, out) features of a 2-D weight: ggml's ne0, ne1."""
        t = tensor(self.weight(name))
        return int(t.ne[0]), int(t.ne[1])

    def close(self) -> None:
        g = load_ggml()
        if self.gguf:
            g.gguf_free(self.gguf)
            g.ggml_free(self.ctx)
            self.gguf = self.ctx = 0
        self._map = None


def _read_shape(g, gctx: int, path: Path) -> LlamaShape:
    arch_id = g.gguf_find_key(gctx, b"general.architecture")
    arch = g.gguf_get_val_str(gctx, arch_id).decode() if arch_id >= 0 else "?"
    if arch != "llama":
        raise ModelError(f"{path}: the ggml TTT engine supports the llama architecture, not {arch!r}")

    def u32(key: str, default: int | None = None) -> int:
        i = g.gguf_find_key(gctx, f"llama.{key}".encode())
        if i < 0:
            if default is None:
                raise ModelError(f"{path}: no llama.{key}")
            return default
        return int(g.gguf_get_val_u32(gctx, i))

    def f32(key: str, default: float) -> float:
        i = g.gguf_find_key(gctx, f"llama.{key}".encode())
        return float(g.gguf_get_val_f32(gctx, i)) if i >= 0 else default

    n_embd, n_head = u32("embedding_length"), u32("attention.head_count")
    return LlamaShape(u32("block_count"), n_embd, u32("feed_forward_length"), n_head,
                      u32("attention.head_count_kv", n_head), u32("rope.dimension_count", n_embd // n_head),
                      u32("context_length", 4096), f32("rope.freq_base", 10000.0),
                      f32("attention.layer_norm_rms_epsilon", 1e-5))


def open_gguf(path: str | Path) -> GGUFWeights:
    """Open a Llama GGUF: metadata parsed by ggml's own reader, tensor data mapped, not copied (the pages
    are the page cache's, shared with a llama.cpp that has the same file open)."""
    g = load_ggml()
    path = Path(path)
    ctx = C.c_void_p()
    gctx = g.gguf_init_from_file(str(path).encode(), GGUFInitParams(True, C.pointer(ctx)))
    if not gctx:
        raise ModelError(f"{path}: not a GGUF file ggml can read")
    try:
        shape = _read_shape(g, gctx, path)
    except ModelError:
        g.gguf_free(gctx)
        g.ggml_free(ctx.value)
        raise
    weights = GGUFWeights(path, shape, ctx.value, gctx)
    weights._map = np.memmap(path, dtype=np.uint8, mode="r")
    base = weights._map.ctypes.data + g.gguf_get_data_offset(gctx)
    n = g.gguf_get_n_tensors(gctx)
    for i in range(n):
        name = g.gguf_get_tensor_name(gctx, i)
        t = g.ggml_get_tensor(ctx.value, name)
        tensor(t).data = base + g.gguf_get_tensor_offset(gctx, i)
        weights.tensors[name.decode()] = t
    return weights


@dataclass
class LoRATensors:
    """One adapted projection's trainable tensors in a graph: A (ggml ne [in, r]) and B (ne [r, out])."""

    a: int
    b: int
    scaling: float


class LlamaGraph:
    """Builds a Llama forward over `weights` in the ggml context `ctx`; `lora` maps a GGUF tensor name
    (`blk.3.attn_q.weight`) to its adapter."""

    def __init__(self, weights: GGUFWeights, ctx: int, lora: dict[str, LoRATensors]) -> None:
        self.g, self.w, self.ctx, self.lora = load_ggml(), weights, ctx, lora
        self.hp = weights.shape

    def linear(self, name: str, x: int) -> int:
        g, ctx = self.g, self.ctx
        y = g.ggml_mul_mat(ctx, self.w.weight(name), x)
        ad = self.lora.get(name)
        if ad is not None:
            low = g.ggml_mul_mat(ctx, ad.b, g.ggml_mul_mat(ctx, ad.a, x))
            y = g.ggml_add(ctx, y, g.ggml_scale(ctx, low, ad.scaling))
        return y

    def norm(self, x: int, weight: str) -> int:
        g = self.g
        return g.ggml_mul(self.ctx, g.ggml_rms_norm(self.ctx, x, self.hp.rms_eps), self.w.weight(weight))

    def attention(self, i: int, h: int, pos: int, mask: int, n_tokens: int) -> int:
        g, ctx, hp = self.g, self.ctx, self.hp
        hd, p = hp.head_dim, f"blk.{i}."
        freqs = self.w.get("rope_freqs.weight") or None  # Llama 3.x's frequency factors, when present

        def rope(x: int, heads: int) -> int:
            x = g.ggml_reshape_3d(ctx, x, hd, heads, n_tokens)
            return g.ggml_rope_ext(ctx, x, pos, freqs, hp.n_rot, GGML_ROPE_TYPE_NORMAL, hp.n_ctx_train,
                                   hp.rope_base, 1.0, 0.0, 1.0, 32.0, 1.0)

        q = g.ggml_permute(ctx, rope(self.linear(p + "attn_q.weight", h), hp.n_head), 0, 2, 1, 3)
        k = g.ggml_permute(ctx, rope(self.linear(p + "attn_k.weight", h), hp.n_head_kv), 0, 2, 1, 3)
        v = g.ggml_reshape_3d(ctx, self.linear(p + "attn_v.weight", h), hd, hp.n_head_kv, n_tokens)
        v = g.ggml_cont(ctx, g.ggml_permute(ctx, v, 1, 2, 0, 3))  # [T, hd, n_kv]
        kq = g.ggml_mul_mat(ctx, k, q)  # [T_k, T_q, n_head]; k broadcast over each group of heads
        kq = g.ggml_soft_max_ext(ctx, kq, mask, 1.0 / math.sqrt(hd), 0.0)
        out = g.ggml_permute(ctx, g.ggml_mul_mat(ctx, v, kq), 0, 2, 1, 3)  # [hd, n_head, T]
        out = g.ggml_reshape_2d(ctx, g.ggml_cont(ctx, out), hp.n_embd, n_tokens)
        return self.linear(p + "attn_output.weight", out)

    def layer(self, i: int, x: int, pos: int, mask: int, n_tokens: int) -> int:
        g, ctx, p = self.g, self.ctx, f"blk.{i}."
        x = g.ggml_add(ctx, x, self.attention(i, self.norm(x, p + "attn_norm.weight"), pos, mask, n_tokens))
        h = self.norm(x, p + "ffn_norm.weight")
        act = g.ggml_mul(ctx, g.ggml_silu(ctx, self.linear(p + "ffn_gate.weight", h)),
                         self.linear(p + "ffn_up.weight", h))
        return g.ggml_add(ctx, x, self.linear(p + "ffn_down.weight", act))

    def embed(self, ids: int) -> int:
        return self.g.ggml_get_rows(self.ctx, self.w.weight("token_embd.weight"), ids)

    def logits(self, x: int) -> int:
        """The LM head on hidden states `x` (the tied embedding when the GGUF has no output.weight)."""
        head = self.w.get("output.weight") or self.w.weight("token_embd.weight")
        return self.g.ggml_mul_mat(self.ctx, head, self.norm(x, "output_norm.weight"))
