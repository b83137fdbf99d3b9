"""Triton LoRA linear: `y = x Wᵀ + b + s·(x Aᵀ) Bᵀ` with W frozen, A (r, K) and B (N, r) trainable.

One kernel, `_matmul_lowrank`, computes `C = α·(X @ Y) + β·(L @ R) (+ bias)` over arbitrary strides with an
fp32 accumulator. The LoRA term rides in the epilogue of the base GEMM's tile, so `W + s·BA` is never
materialised and the low-rank product costs one extra (BLOCK_M × r) @ (r × BLOCK_N) dot per tile:

    forward   xa = x Aᵀ                       (M, r)   saved for backward
              y  = x Wᵀ + s · xa Bᵀ (+ b)     fused
    backward  gb = dy B                       (M, r)
              dx = dy W + s · gb A            fused (W read through its strides, never transposed)
              dA = s · gbᵀ x                  (r, K)
              dB = s · dyᵀ xa                 (N, r)

Saved for backward: x, xa and the references to W, A, B (no dW: W is frozen).

Multi-adapter (batched TTT): the tokens come in segments, segment i with its own A[i], B[i] and all sharing
W. The same kernel runs over a table of row tiles aligned to segment starts (no tile straddles two
segments), so a tile loads its segment's A or B slice and the whole batch is still one launch per GEMM
above; only dA[i] and dB[i], which reduce over segment i's tokens, are one small launch per adapter.

Runs compiled on CUDA and on CPU tensors under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import _check_segments

MAX_RANK = 128
# Triton's CPU interpreter multiplies 16-bit tiles wrongly (bf16 `tl.dot` gave errors of 1e10), so under it
# 16-bit tiles are widened to fp32 before the dot; compiled on a GPU they go to the tensor cores as they are
# (fp32 accumulation either way). fp32 inputs use exact IEEE products, not TF32.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _matmul_lowrank(
    x_ptr, y_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, tile_seg_ptr, tile_row_ptr, seg_end_ptr,
    M, N, K, R,
    sxm, sxk, syk, syn, sys, slm, slr, srr, srn, srs, scm, scn,
    alpha, beta,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SEGMENTED:
        # Row tiles never straddle segments (the host's tile table), so one tile has one adapter: its Y and
        # R are that segment's slices (stride 0 for an operand every segment shares).
        seg = tl.load(tile_seg_ptr + pid_m).to(tl.int64)
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(seg_end_ptr + seg)
        y_ptr += seg * sys
        r_ptr += seg * srs
    else:
        row0 = pid_m * BLOCK_M
        row_end = M
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                     mask=(rm[:, None] < row_end) & (kk[None, :] < K), other=0.0)
        yt = tl.load(y_ptr + kk[:, None] * syk + rn[None, :] * syn,
                     mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc += tl.dot(xt, yt, input_precision="ieee")
    acc = acc * alpha
    if HAS_LOWRANK:
        rr = tl.arange(0, BLOCK_R)
        lt = tl.load(l_ptr + rm[:, None] * slm + rr[None, :] * slr,
                     mask=(rm[:, None] < row_end) & (rr[None, :] < R), other=0.0)
        rt = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            lt = lt.to(tl.float32)
            rt = rt.to(tl.float32)
        acc += beta * tl.dot(lt, rt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < row_end) & (rn[None, :] < N))


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=64)
def _tile_table(segments: tuple[int, ...], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row tiles aligned to segment starts: each tile's segment, first row, and every segment's end row."""
    segs, rows, ends, start = [], [], [], 0
    for i, n in enumerate(segments):
        for row in range(start, start + n, block_m):
            segs.append(i)
            rows.append(row)
        start += n
        ends.append(start)
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (segs, rows, ends))


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(row, column, segment) strides of a shared 2-D operand (segment stride 0) or a per-segment 3-D one."""
    return (t.stride(0), t.stride(1), 0) if t.dim() == 2 else (t.stride(1), t.stride(2), t.stride(0))


def matmul_lowrank(x: torch.Tensor, y: torch.Tensor, low: tuple[torch.Tensor, torch.Tensor] | None = None,
                   alpha: float = 1.0, beta: float = 1.0, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """`α·(x @ y) + β·(L @ R) + bias` for 2-D x (M, K), y (K, N), L (M, r), R (r, N), any strides.

    With `segments` (token counts summing to M), rows come in runs and run i uses `y[i]` (K, N) and `R[i]`
    (r, N) where y or R is 3-D (one slice per segment); a 2-D operand is shared by every run.
    """
    m, k = x.shape
    k2, n = y.shape[-2:]
    if k != k2:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)}, y is {tuple(y.shape)}")
    out = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    lo, ro = low if low is not None else (x, y)  # placeholders, never read when HAS_LOWRANK is False
    r = lo.shape[1] if low is not None else 1
    # tl.dot needs every block dimension >= 16. Blocks stay small: the CPU interpreter runs the tests.
    bm = _block(max(segments, default=1) if segments is not None else m, 16, 64)
    bn, bk = _block(n, 16, 64), _block(k, 16, 32)
    br = _block(r, 16, MAX_RANK)
    if segments is not None:
        tiles = _tile_table(tuple(segments), bm, x.device)
        grid_m = tiles[0].numel()
    else:
        tiles = (x, x, x)  # placeholders, never read when SEGMENTED is False
        grid_m = triton.cdiv(m, bm)
    if grid_m == 0 or n == 0:
        return out.zero_()
    syk, syn, sys = _strides3(y)
    srr, srn, srs = _strides3(ro)
    _matmul_lowrank[(grid_m, triton.cdiv(n, bn))](
        x, y, lo, ro, bias if bias is not None else x, out, *tiles,
        m, n, k, r,
        x.stride(0), x.stride(1), syk, syn, sys, lo.stride(0), lo.stride(1), srr, srn, srs,
        out.stride(0), out.stride(1),
        float(alpha), float(beta),
        HAS_LOWRANK=low is not None, HAS_BIAS=bias is not None, UPCAST=INTERPRETED or x.dtype == torch.float32,
        SEGMENTED=segments is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
    )
    return out


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`x Wᵀ + b + scaling · (x Aᵀ) Bᵀ` with Triton kernels, differentiable in x, A and B.

    Raises:
        ValueError: shapes that do not chain, or a rank above MAX_RANK.
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"LoRA shapes do not chain: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                         "(one adapter: A is (r, K), B is (N, r))")
    _check_shapes(x, weight, lora_a[None], lora_b[None])
    # One adapter is the one-segment case of the multi-adapter function (plain row tiles, no tile table).
    return LoRALinearFunction.apply(x, weight, bias, lora_a[None], lora_b[None], scaling, None)


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    n, r = lora_a.shape[:2]
    if lora_a.shape != (n, r, x.shape[-1]) or lora_b.shape != (n, weight.shape[0], r) \
            or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"LoRA shapes do not chain: x {tuple(x.shape)}, W {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is above the kernel's maximum {MAX_RANK}")


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the LoRA linear: n adapters over token segments (`lora_linear_batched_triton`), or one
    adapter over every token (segments None); gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, segments):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)  # (n, r, K)
        b = lora_b.to(x.dtype)  # (n, N, r)
        xa = matmul_lowrank(x2, a.transpose(1, 2), segments=segments)  # (M, r), each run through its own A
        y = matmul_lowrank(x2, weight.t(), (xa, b.transpose(1, 2)), beta=scaling, bias=bias, segments=segments)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.segments = segments
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
            dx = matmul_lowrank(dy2, weight, (gb, a), beta=s, segments=segments).reshape(ctx.shape)
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
        return dx, None, None, da, db, None, None


def lora_linear_batched_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                               segments: Sequence[int]) -> torch.Tensor:
    """Multi-adapter LoRA linear (`finemed_kernels.lora_linear_batched_reference`) with Triton kernels: the
    shared base GEMM and each run's low-rank epilogue in one launch, on row tiles aligned to the segments.

    Raises:
        ValueError: shapes that do not chain, segments that do not cover the tokens, a rank above MAX_RANK.
    """
    _check_shapes(x, weight, lora_a, lora_b)
    _check_segments(x.numel() // max(x.shape[-1], 1), lora_a.shape[0], segments)
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, tuple(segments))
