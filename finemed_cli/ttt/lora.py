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
from finemed_cli.checkpoints.quantized import is_quantized_linear
from finemed_cli.config.answer import DEFAULT_TARGETS
from finemed_cli.errors import ConfigError


class _Wrapped(nn.Module):
    """A layer standing in for a frozen `nn.Linear` (`self.base`): model code that reads a projection's
    `.weight` or `.bias` (dtype, device) still finds them. A 4-bit base (`quantized`) is called as a module."""

    base: nn.Linear

    @property
    def quantized(self) -> bool:
        return is_quantized_linear(self.base)


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class LoRALinear(_Wrapped):
    """`base(x) + scaling · (x Aᵀ) Bᵀ` with the base frozen and A, B trainable (kept in fp32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        device = base.weight.device
        # As peft: A ~ kaiming-uniform(a=√5), B = 0, so the adapter starts as the identity change. A is drawn on
        # the CPU from the adapter's own generator and then moved: the same numbers on every device, and a
        # batched adapter i equal to this one (issue 23: CUDA's global generator drew them in another order).
        self.lora_a = nn.Parameter(_uniform((rank, base.in_features), base.in_features, generator).to(device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:  # a 4-bit base computes its own term; the adapter's is added in its compute dtype
            return self.base(x) + finemed_kernels.low_rank_reference(x, self.lora_a, self.lora_b, self.scaling)
        return finemed_kernels.lora_linear(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b,
                                           self.scaling)


class _AttachedLayers:
    """What every set of attached LoRA layers shares: its trainable tensors, and putting the model back."""

    layers: dict[str, nn.Module]
    _originals: list[tuple[nn.Module, str, nn.Module]]

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.lora_a
            yield layer.lora_b

    def detach(self) -> None:
        for parent, name, original in reversed(self._originals):
            setattr(parent, name, original)
        self._originals.clear()

    def _swap(self, model: nn.Module, name: str, module: nn.Module, layer: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
        self._originals.append((parent, attr, module))
        self.layers[name] = layer


@dataclass
class LoRAAdapter(_AttachedLayers):
    """A set of LoRA layers attached to a model; `detach()` restores the original modules."""

    rank: int
    alpha: float
    layers: dict[str, LoRALinear] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

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


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _target_modules(model: nn.Module, targets: Iterable[str], first_layer: int) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules named in `targets`, in decoder layers `first_layer` and above.

    Raises:
        ConfigError: none matches (naming the linear layer names the model has).
    """
    targets = tuple(targets)
    # Phi-3 fuses q/k/v and gate/up into one linear each: adapted when any of their parts is a target
    wanted = set(targets) | {fused for fused, parts in _FUSED.items() if set(parts) & set(targets)}
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
        and _layer_index(name) >= first_layer
    ]
    if not matches:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"no linear layer named {', '.join(targets)}; this model's are: {', '.join(names)}")
    return matches


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
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter = LoRAAdapter(rank, alpha)
    matches = _target_modules(model, targets, first_layer)
    for name, module in matches:
        adapter._swap(model, name, module, LoRALinear(module, rank, alpha, generator=gen))
    return adapter


class BatchedLoRALinear(_Wrapped):
    """`n` LoRA adapters on one frozen linear layer. With `segments` set (n token counts), the input's tokens
    in order are split into n runs and run i uses adapter i (batched TTT on a packed batch: one
    forward/backward trains every question's adapter); with `active` set, every input uses that one adapter
    (generation for one question)."""

    def __init__(self, base: nn.Linear, n: int, rank: int, alpha: float,
                 generators: list[torch.Generator] | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        device = base.weight.device
        # each adapter drawn as `LoRALinear` draws it, on the CPU from its own generator
        a = torch.stack([_uniform((rank, base.in_features), base.in_features, generators[i] if generators else None)
                         for i in range(n)])
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(n, base.out_features, rank, device=device, dtype=torch.float32))
        self.segments: tuple[int, ...] | None = None
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is not None:
            i = self.active
            if self.quantized:
                return self.base(x) + finemed_kernels.low_rank_reference(x, self.lora_a[i], self.lora_b[i],
                                                                         self.scaling)
            return finemed_kernels.lora_linear(x, self.base.weight, self.base.bias, self.lora_a[i],
                                               self.lora_b[i], self.scaling)
        if self.segments is None:
            raise RuntimeError("a batched LoRA layer needs `segments` (each adapter's token count) or `active`")
        if self.quantized:
            return self.base(x) + finemed_kernels.low_rank_batched_reference(x, self.lora_a, self.lora_b,
                                                                             self.scaling, self.segments)
        return finemed_kernels.lora_linear_batched(x, self.base.weight, self.base.bias, self.lora_a,
                                                   self.lora_b, self.scaling, self.segments)


@dataclass
class _AdapterView:
    lora_a: torch.Tensor
    lora_b: torch.Tensor


@dataclass
class BatchedLoRAAdapter(_AttachedLayers):
    """`n` adapters attached together; `detach()` restores the original modules."""

    n: int
    rank: int
    alpha: float
    layers: dict[str, BatchedLoRALinear] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def set_segments(self, segments: tuple[int, ...]) -> None:
        """Adapter i trains on the i-th run of `segments[i]` tokens of every input."""
        for layer in self.layers.values():
            layer.segments, layer.active = segments, None

    def select(self, i: int | None) -> None:
        """Make adapter `i` the one every input uses (None: none until `set_segments`)."""
        for layer in self.layers.values():
            layer.active, layer.segments = i, None

    def view(self, i: int) -> LoRAAdapter:
        """Adapter `i` as a plain adapter (for export to llama.cpp): `layers` of `lora_a`/`lora_b` slices."""
        out = LoRAAdapter(self.rank, self.alpha)
        out.layers = {name: _AdapterView(layer.lora_a[i], layer.lora_b[i])  # type: ignore[misc]
                      for name, layer in self.layers.items()}
        return out


def attach_lora_batched(model: nn.Module, n: int, rank: int = 8, alpha: float = 16.0,
                        targets: Iterable[str] = DEFAULT_TARGETS, seed: int = 0,
                        first_layer: int = 0) -> BatchedLoRAAdapter:
    """`n` fresh adapters on the same modules as `attach_lora`; adapter i starts exactly as
    `attach_lora(..., seed=seed)` would (so batched TTT equals n separate runs)."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}")
    gens = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(n)]
    adapter = BatchedLoRAAdapter(n, rank, alpha)
    for name, module in _target_modules(model, targets, first_layer):
        adapter._swap(model, name, module, BatchedLoRALinear(module, n, rank, alpha, generators=gens))
    return adapter
