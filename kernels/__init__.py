"""finemed's LoRA kernels (installed as `finemed_kernels`).

`lora_linear` dispatches: the Triton kernels on CUDA when they are available, the pure-torch reference
elsewhere. Importing this package never needs Triton or CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .reference import (
    lora_linear_batched_reference,
    lora_linear_reference,
    low_rank_batched_reference,
    low_rank_reference,
)

__all__ = [
    "lora_linear", "lora_linear_batched", "lora_linear_batched_reference", "lora_linear_reference",
    "low_rank_batched_reference", "low_rank_reference", "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when a fused Triton implementation is importable and usable on this machine."""
    try:
        from . import lora as _lora  # noqa: F401  (arrives with the Triton kernels)
    except ImportError:
        return False
    return torch.cuda.is_available()


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`x Wᵀ + b + scaling · (x Aᵀ) Bᵀ`, differentiable in x, A and B."""
    if x.is_cuda and triton_available():
        from .lora import lora_linear_triton

        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)


def lora_linear_batched(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    segments: Sequence[int],
) -> torch.Tensor:
    """Multi-adapter LoRA linear over contiguous token segments (see `lora_linear_batched_reference`):
    Triton on CUDA, the reference elsewhere."""
    if x.is_cuda and triton_available():
        from .lora import lora_linear_batched_triton

        return lora_linear_batched_triton(x, weight, bias, lora_a, lora_b, scaling, segments)
    return lora_linear_batched_reference(x, weight, bias, lora_a, lora_b, scaling, segments)
