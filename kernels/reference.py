"""Pure-torch LoRA linear: the CPU path and the test oracle for the Triton kernels.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ      W: (N, K) frozen, A: (r, K), B: (N, r) trainable

`W + s·BA` is never materialised: the low-rank path costs O(M·r·(K+N)) next to the base O(M·N·K).
"""

from __future__ import annotations

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
    base = F.linear(x, weight, bias)
    a = lora_a.to(x.dtype)
    b = lora_b.to(x.dtype)
    return base + F.linear(F.linear(x, a), b) * scaling


def lora_linear_batched_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Multi-adapter LoRA linear: one frozen W shared by every row, each row with its own adapter.

        y[i] = x[i] Wᵀ + b + s · (x[i] A[rows[i]]ᵀ) B[rows[i]]ᵀ

    Args:
        x: (R, T, K), a batch of R rows (sequences).
        lora_a: (n, r, K) and lora_b: (n, N, r), n adapters (fp32 masters are cast to x's dtype).
        rows: (R,) long, the adapter of each row.

    Rows of different adapters never mix, so each adapter's gradient is exactly what training it alone on
    its rows would give.
    """
    base = F.linear(x, weight, bias)
    a = lora_a.to(x.dtype)[rows]  # (R, r, K)
    b = lora_b.to(x.dtype)[rows]  # (R, N, r)
    return base + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scaling
