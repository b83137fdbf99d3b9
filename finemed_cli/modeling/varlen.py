"""Variable-length attention for packed batches: several sequences concatenated into one row, each attending
causally to itself only, with no padding and no (T × T) block-diagonal mask.

transformers routes every attention call through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` and
passes the decoder's keyword arguments down to it. `packed_attention(model)` switches the model to
`finemed_varlen` for the duration of a `with` block; a forward that passes `finemed_lengths=(T1, T2, …)`
(token counts of the packed sequences, summing to the row length) gets plain causal SDPA run on each sequence
in turn. Without `finemed_lengths` it is ordinary SDPA, so anything else run inside the block is unchanged.

Two more keyword arguments serve scoring (`eval.loglik`), where each packed sequence is a tree (a question's
prompt, then every option continuing it, the options blind to each other):
- `finemed_masks=(m1, m2, …)`: sequence i attends by the boolean (Ti × Pi+Ti) mask mi (True: attend)
  instead of causally;
- `finemed_prefix_kv=[(k, v) per layer]`: a shared prefix (e.g. the system prompt), already run, whose keys
  and values every sequence sees first (its P tokens are the first P columns of the masks).

Why not SDPA over a block-diagonal mask (what transformers builds for packed `position_ids`): that computes
all (ΣT)² scores and, with a mask, loses the causal kernel; per-sequence calls compute Σ T² scores.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

NAME = "finemed_varlen"
LENGTHS_KWARG = "finemed_lengths"
MASKS_KWARG = "finemed_masks"
PREFIX_KWARG = "finemed_prefix_kv"


def _varlen_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop(LENGTHS_KWARG, None)
    masks = kwargs.pop(MASKS_KWARG, None)
    prefix = kwargs.pop(PREFIX_KWARG, None)
    if lengths is None or (len(lengths) == 1 and masks is None and prefix is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError("packed attention takes one unpadded row with no mask and no cache")
    kwargs.pop("is_causal", None)
    pk = pv = None
    if prefix is not None:
        if masks is None:  # causal SDPA would align a longer key top-left: the prefix needs explicit masks
            raise ValueError("a shared prefix needs per-sequence masks")
        pk, pv = prefix[module.layer_idx]
    outs = []
    start = 0
    for i, n in enumerate(lengths):  # (1, H, T, D) slices; the output is (1, T, H, D)
        end = start + n
        k, v = key[:, :, start:end], value[:, :, start:end]
        if pk is not None:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if masks is None:
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, None, is_causal=True, **kwargs)
        else:
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, masks[i][None, None],
                                            is_causal=False, **kwargs)
        outs.append(out)
        start = end
    return torch.cat(outs, dim=1), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    # Registered for attention only: transformers builds no mask for an implementation that has no mask
    # function, and causality here is the kernel's, per sequence.
    AttentionInterface.register(NAME, _varlen_sdpa)


def _configs(model: Any) -> list[Any]:
    """The model's config and its sub-configs (each may carry its own attention implementation)."""
    seen, out = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextlib.contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Run `model`'s attention as `finemed_varlen` inside the block (see the module docstring); the
    previous implementation is put back on exit."""
    _register()
    saved = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    try:
        for cfg, _ in saved:
            cfg._attn_implementation = NAME
        yield
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation = impl
