"""Triton LoRA linear: `y = x Wᵀ + b + s·(x Aᵀ) Bᵀ` with W frozen, A (r, K) and B (N, r) trainable.

One kernel (`matmul.matmul_lowrank`) computes `C = α·(X @ Y) + β·(L @ R) (+ bias)` (or adds it into C)
over arbitrary strides with an fp32 accumulator. The LoRA term rides in the epilogue of the base GEMM's tile, so `W + s·BA` is never
materialised and the low-rank product costs one extra (BLOCK_M × r) @ (r × BLOCK_N) dot per tile:

    forward   xa = x Aᵀ                       (M, r)   saved for backward
              y  = x Wᵀ + s · xa Bᵀ (+ b)     fused
    backward  gb = dy B                       (M, r)
              dx = dy W + s · gb A            fused (W read through its strides, never transposed)
              dA = s · gbᵀ x                  (r, K)
              dB = s · dyᵀ xa                 (N, r)

Saved for backward: x, xa and the references to W, A, B (no dW: W is frozen).

Two designs, chosen by `impl` (default `FINEMED_LORA_IMPL`, else DEFAULT_IMPL):
- fused: as above, the base GEMM is ours, with the low-rank term in its epilogue (y written once).
- split: the base GEMM is cuBLAS (`x @ Wᵀ + b`, `dy @ W` in torch), then one Triton pass adds the low-rank term into its
  output in place (`y += s · xa Bᵀ`, `dx += s · gb A`): cuBLAS's tuned GEMM for one more read and write of y.
xa, gb, dA and dB are computed the same way in both.

Multi-adapter (batched TTT): the tokens come in segments, segment i with its own A[i], B[i] and all sharing
W. The same kernel runs over a table of row tiles aligned to segment starts (no tile straddles two
segments), so a tile loads its segment's A or B slice and the whole batch is still one launch per GEMM
above; only dA[i] and dB[i], which reduce over segment i's tokens, are one small launch per adapter.

Runs compiled on CUDA (tiles autotuned per shape bucket, see matmul.GPU_TILES) and on CPU tensors under
`TRITON_INTERPRET=1` (the tests; fixed small tiles).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch

from .matmul import MAX_RANK, matmul_lowrank
from .reference import _check_segments

IMPLS = ("fused", "split")
# Unmeasured on a GPU: fused is the default because it writes y once, where split writes it twice. The number
# that decides is the `fused/split` column of bench/lora_kernels.py (forward+backward at the Llama-3.1-8B
# projections, 4096 tokens, rank 16, bf16; run by `make bench-gpu`): below 1 everywhere keeps fused; split
# becomes the default if cuBLAS's base GEMM wins on most projections.
DEFAULT_IMPL = "fused"


def pick_impl(impl: str | None = None) -> str:
    """`impl`, else FINEMED_LORA_IMPL, else DEFAULT_IMPL; one of IMPLS.

    Raises:
        ValueError: an unknown name (naming where it came from).
    """
    chosen = impl or os.environ.get("FINEMED_LORA_IMPL") or DEFAULT_IMPL
    if chosen not in IMPLS:
        where = "impl" if impl else "FINEMED_LORA_IMPL"
        raise ValueError(f"{where}={chosen!r}: the LoRA kernel design is one of {', '.join(IMPLS)}")
    return chosen


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float, impl: str | None = None) -> torch.Tensor:
    """`x Wᵀ + b + scaling · (x Aᵀ) Bᵀ` with Triton kernels, differentiable in x, A and B; `impl` fused or
    split (see the module docstring; default `pick_impl`).

    Raises:
        ValueError: shapes that do not chain, a rank above MAX_RANK, an unknown impl.
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"LoRA shapes do not chain: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                         "(one adapter: A is (r, K), B is (N, r))")
    _check_shapes(x, weight, lora_a[None], lora_b[None])
    # One adapter is the one-segment case of the multi-adapter function (plain row tiles, no tile table).
    return LoRALinearFunction.apply(x, weight, bias, lora_a[None], lora_b[None], scaling, None, pick_impl(impl))


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    n, r = lora_a.shape[:2]
    if lora_a.shape != (n, r, x.shape[-1]) or lora_b.shape != (n, weight.shape[0], r) \
            or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"LoRA shapes do not chain: x {tuple(x.shape)}, W {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is above the kernel's maximum {MAX_RANK}")


def _base_plus_lowrank(x: torch.Tensor, w_t: torch.Tensor, low: tuple[torch.Tensor, torch.Tensor], scaling: float,
                       bias: torch.Tensor | None, segments: tuple[int, ...] | None, impl: str) -> torch.Tensor:
    """`x @ w_t + bias + scaling · L @ R`: one fused Triton GEMM, or cuBLAS then the low-rank term added in place."""
    if impl == "fused":
        return matmul_lowrank(x, w_t, low, beta=scaling, bias=bias, segments=segments)
    base = torch.addmm(bias.to(x.dtype), x, w_t) if bias is not None else x @ w_t
    return matmul_lowrank(None, None, low, beta=scaling, segments=segments, out=base)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the LoRA linear: n adapters over token segments (`lora_linear_batched_triton`), or one
    adapter over every token (segments None); gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, segments, impl):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)  # (n, r, K)
        b = lora_b.to(x.dtype)  # (n, N, r)
        xa = matmul_lowrank(x2, a.transpose(1, 2), segments=segments)  # (M, r), each run through its own A
        y = _base_plus_lowrank(x2, weight.t(), (xa, b.transpose(1, 2)), scaling, bias, segments, impl)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.segments = segments
        ctx.impl = impl
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s, segments = ctx.scaling, ctx.segments
        dy2 = dy.reshape(-1, weight.shape[0])
        a = lora_a.to(x2.dtype)
        b = lora_b.to(x2.dtype)
        gb = matmul_lowrank(dy2, b, segments=segments)  # (M, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = _base_plus_lowrank(dy2, weight, (gb, a), s, None, segments, ctx.impl).reshape(ctx.shape)
        # dA[i], dB[i] reduce over segment i's tokens: one small GEMM per adapter (n launches).
        bounds = [0, *itertools.accumulate(segments or (x2.shape[0],))]
        if ctx.needs_input_grad[3]:
            da = torch.zeros_like(lora_a)
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                if hi > lo:
                    da[i] = matmul_lowrank(gb[lo:hi].t(), x2[lo:hi], alpha=s, out_dtype=torch.float32)
        if ctx.needs_input_grad[4]:
            db = torch.zeros_like(lora_b)
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                if hi > lo:
                    db[i] = matmul_lowrank(dy2[lo:hi].t(), xa[lo:hi], alpha=s, out_dtype=torch.float32)
        return dx, None, None, da, db, None, None, None


def lora_linear_batched_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                               segments: Sequence[int], impl: str | None = None) -> torch.Tensor:
    """Multi-adapter LoRA linear (`finemed_kernels.lora_linear_batched_reference`) with Triton kernels: the
    shared base GEMM and each run's low-rank term on row tiles aligned to the segments (fused: one launch;
    split: cuBLAS for the base, one launch for every run's low-rank term).

    Raises:
        ValueError: shapes that do not chain, segments that do not cover the tokens, a rank above MAX_RANK,
            an unknown impl.
    """
    _check_shapes(x, weight, lora_a, lora_b)
    _check_segments(x.numel() // max(x.shape[-1], 1), lora_a.shape[0], segments)
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, tuple(segments), pick_impl(impl))
