"""finemed's own LoRA layers: attached to a frozen model for one question, then detached.

Attaching swaps each targeted `nn.Linear` for a `LoRALinear` that holds the original module and calls
`finemed_kernels.lora_linear`; detaching puts the original modules back. The base weights are never
written, so they stay bit-identical however the adapter is trained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

import finemed_kernels
from finemed_cli.config.answer import DEFAULT_TARGETS
from finemed_cli.errors import ConfigError


class LoRALinear(nn.Module):
    """`base(x) + scaling · (x Aᵀ) Bᵀ` with the base frozen and A, B trainable (kept in fp32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # As peft: A ~ kaiming-uniform(a=√5), B = 0, so the adapter starts as the identity change.
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight` of projections (dtype, device)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finemed_kernels.lora_linear(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b,
                                           self.scaling)


@dataclass
class LoRAAdapter:
    """A set of LoRA layers attached to a model; `detach()` restores the original modules."""

    rank: int
    alpha: float
    layers: dict[str, LoRALinear] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.lora_a
            yield layer.lora_b

    def detach(self) -> None:
        for parent, name, original in reversed(self._originals):
            setattr(parent, name, original)
        self._originals.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft-style names: `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A.weight"] = layer.lora_a.detach()
            out[f"{name}.lora_B.weight"] = layer.lora_b.detach()
        return out


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else 1 << 30  # modules outside the layer stack count as topmost


def attach_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    seed: int = 0,
    first_layer: int = 0,
) -> LoRAAdapter:
    """Wrap every `nn.Linear` whose attribute name is in `targets` with a fresh LoRA layer.

    With `first_layer` > 0, only projections inside decoder layers `first_layer` and above (module names
    `….layers.<i>.…`) are adapted.

    Raises:
        ConfigError: no module matches the targets (naming the linear layer names the model has).
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}")
    targets = tuple(targets)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter = LoRAAdapter(rank, alpha)
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        and _layer_index(name) >= first_layer
    ]
    if not matches:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"no linear layer named {', '.join(targets)}; this model's are: {', '.join(names)}")
    for name, module in matches:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, rank, alpha, generator=gen if module.weight.device.type == "cpu" else None)
        setattr(parent, attr, layer)
        adapter._originals.append((parent, attr, module))
        adapter.layers[name] = layer
    return adapter
