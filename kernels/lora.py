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

Saved for backward: x, xa and the references to W, A, B (no dW: W is frozen). Runs compiled on CUDA and on
CPU tensors under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_RANK = 128
# Triton's CPU interpreter multiplies 16-bit tiles wrongly (bf16 `tl.dot` gave errors of 1e10), so under it
# 16-bit tiles are widened to fp32 before the dot; compiled on a GPU they go to the tensor cores as they are
# (fp32 accumulation either way). fp32 inputs use exact IEEE products, not TF32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _matmul_lowrank(
    x_ptr, y_ptr, l_ptr, r_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    sxm, sxk, syk, syn, slm, slr, srr, srn, scm, scn,
    alpha, beta,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                     mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
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
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        rt = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            lt = lt.to(tl.float32)
            rt = rt.to(tl.float32)
        acc += beta * tl.dot(lt, rt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def matmul_lowrank(x: torch.Tensor, y: torch.Tensor, low: tuple[torch.Tensor, torch.Tensor] | None = None,
                   alpha: float = 1.0, beta: float = 1.0, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`α·(x @ y) + β·(L @ R) + bias` for 2-D x (M, K), y (K, N), L (M, r), R (r, N), any strides."""
    m, k = x.shape
    k2, n = y.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)}, y is {tuple(y.shape)}")
    out = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    lo, ro = low if low is not None else (x, y)  # placeholders, never read when HAS_LOWRANK is False
    r = lo.shape[1] if low is not None else 1
    # tl.dot needs every block dimension >= 16. Blocks stay small: the CPU interpreter runs the tests.
    bm, bn, bk = _block(m, 16, 64), _block(n, 16, 64), _block(k, 16, 32)
    br = _block(r, 16, MAX_RANK)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _matmul_lowrank[grid](
        x, y, lo, ro, bias if bias is not None else x, out,
        m, n, k, r,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), lo.stride(0), lo.stride(1), ro.stride(0),
        ro.stride(1), out.stride(0), out.stride(1),
        float(alpha), float(beta),
        HAS_LOWRANK=low is not None, HAS_BIAS=bias is not None, UPCAST=_INTERPRETED or x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
    )
    return out


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the fused LoRA linear; gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        xa = matmul_lowrank(x2, a.t())  # (M, r)
        y = matmul_lowrank(x2, weight.t(), (xa, b.t()), beta=scaling, bias=bias)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = shape
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, weight.shape[0])
        a = lora_a.to(x2.dtype)
        b = lora_b.to(x2.dtype)
        gb = matmul_lowrank(dy2, b)  # (M, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul_lowrank(dy2, weight, (gb, a), beta=s).reshape(ctx.shape)
        if ctx.needs_input_grad[3]:
            da = matmul_lowrank(gb.t(), x2, alpha=s, out_dtype=torch.float32).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            db = matmul_lowrank(dy2.t(), xa, alpha=s, out_dtype=torch.float32).to(lora_b.dtype)
        return dx, None, None, da, db, None


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`x Wᵀ + b + scaling · (x Aᵀ) Bᵀ` with Triton kernels, differentiable in x, A and B.

    Raises:
        ValueError: shapes that do not chain, or a rank above MAX_RANK.
    """
    r = lora_a.shape[0]
    if lora_a.shape != (r, x.shape[-1]) or lora_b.shape != (weight.shape[0], r) \
            or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"LoRA shapes do not chain: x {tuple(x.shape)}, W {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is above the kernel's maximum {MAX_RANK}")
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling)
