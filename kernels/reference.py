"""Pure-torch LoRA linear: the CPU path and the test oracle for the Triton kernels.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ      W: (N, K) frozen, A: (r, K), B: (N, r) trainable

`W + s·BA` is never materialised: the low-rank path costs O(M·r·(K+N)) next to the base O(M·N·K).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """LoRA linear in plain torch; autograd gives dx, dA, dB (and no dW for a frozen W).

    A and B may be kept in fp32 while x is bf16/fp16: they are cast to x's dtype for the matmuls (autograd
    casts the gradients back), so small TTT updates are not lost in low-precision master weights.
    """
    return F.linear(x, weight, bias) + low_rank_reference(x, lora_a, lora_b, scaling)


def low_rank_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter's term alone, `s · (x Aᵀ) Bᵀ`: added to a base layer computed elsewhere (a 4-bit base is a
    module that dequantizes its own blocks, not a matrix to pass in)."""
    return F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling


def lora_linear_batched_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    segments: Sequence[int],
) -> torch.Tensor:
    """Multi-adapter LoRA linear: one frozen W shared by every token, each contiguous segment of tokens with
    its own adapter.

        y[t] = x[t] Wᵀ + b + s · (x[t] A[i]ᵀ) B[i]ᵀ      for t in segment i

    Args:
        x: (..., M, K); the tokens are the rows of `x.reshape(-1, K)` in order.
        lora_a: (n, r, K) and lora_b: (n, N, r), n adapters (fp32 masters are cast to x's dtype).
        segments: n token counts summing to the number of tokens: adapter i owns the i-th run (0 allowed).

    Tokens of different adapters never mix, so each adapter's gradient is exactly what training it alone
    on its tokens would give.
    """
    return F.linear(x, weight, bias) + low_rank_batched_reference(x, lora_a, lora_b, scaling, segments)


def low_rank_batched_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                               segments: Sequence[int]) -> torch.Tensor:
    """The adapters' term alone, segment i through adapter i (see `lora_linear_batched_reference`)."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    _check_segments(flat.shape[0], lora_a.shape[0], segments)
    a = lora_a.to(x.dtype).unbind(0)
    b = lora_b.to(x.dtype).unbind(0)
    low = [F.linear(F.linear(xs, a[i]), b[i]) for i, xs in enumerate(flat.split(list(segments)))]
    return torch.cat(low).view(*x.shape[:-1], lora_b.shape[1]) * scaling


def _check_segments(tokens: int, adapters: int, segments: Sequence[int]) -> None:
    if len(segments) != adapters or sum(segments) != tokens or min(segments, default=0) < 0:
        raise ValueError(f"segments {tuple(segments)} must be {adapters} non-negative token counts summing to "
                         f"the input's {tokens} tokens")
