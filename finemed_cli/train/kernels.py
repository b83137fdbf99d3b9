"""peft's LoRA layers computed by finemed's kernels: `route_through_kernels(peft_model)` replaces the forward
of every peft `lora.Linear` with a call to `finemed_kernels.lora_linear` (fused Triton on CUDA, the torch
reference elsewhere), so `finemed train` and TTT share one LoRA implementation.

The replacement covers the case training runs: one active adapter, not merged, no dropout, no DoRA, no
extra arguments. Anything else (the adapter disabled for DPO's reference, dropout > 0, several adapters)
goes through peft's own forward unchanged, so the routing can never change what is computed, only how.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from finemed_cli.checkpoints.quantized import is_quantized_linear


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or not isinstance(self.lora_dropout[names[0]], nn.Identity) or self.use_dora.get(names[0])):
        return type(self).forward(self, x, *args, **kwargs)
    import finemed_kernels

    name = names[0]
    base = self.get_base_layer()
    return finemed_kernels.lora_linear(x, base.weight, base.bias, self.lora_A[name].weight,
                                       self.lora_B[name].weight, self.scaling[name])


def route_through_kernels(model: nn.Module) -> int:
    """Route `model`'s peft LoRA Linear layers through `finemed_kernels`; returns how many were routed."""
    from peft.tuners.lora import Linear

    count = 0
    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, Linear) else None
        if isinstance(base, nn.Linear) and not is_quantized_linear(base):  # a 4-bit base runs its own forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
