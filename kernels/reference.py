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
