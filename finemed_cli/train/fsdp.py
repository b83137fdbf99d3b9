"""Fully sharded full fine-tuning (`model.fsdp: true`, `method: full`, under `torchrun` / `accelerate
launch`): FSDP2's `fully_shard` on every decoder layer and on the model, so each process holds 1/world of
the weights, gradients and AdamW state (~16 bytes per parameter for fp32 masters and Adam: ~128 GB for an
8B model, which no single GPU holds).

What sharding changes in finemed's loop, and why:
- Gradients are *summed* across processes (divide factor 1): the losses are already normalised by the
  global token count, exactly as in the replicated data-parallel path (`distributed.Dist.sum_grads`).
- Every backward reduce-scatters its gradients into the shards, micro-batch by micro-batch: deferring the
  sync to a step's last micro-batch would hold every layer's whole fp32 gradient on each GPU meanwhile.
- Every process must run the same number of forward and backward passes (each one all-gathers a layer's
  weights), so a process whose share of a step (or of the held-out set) is short replays a micro-batch with
  its loss weighted by zero (`my_share`).
- Losses go through the model's own forward (`modeling.loss.rows_nll` with `finemed_fsdp`): only the root
  module's forward gathers the embedding and head weights; the head still runs on labelled positions only
  (`logits_to_keep`).
  Known cost: the head's logits for a micro-batch's labelled positions exist at once (the unsharded path
  computes them in checkpointed chunks): with a 128k vocabulary keep batch_size x max_length moderate.
- Checkpoints and saved weights are the full (gathered) state dicts, written by rank 0; each rank of a
  resumed run maps the checkpoint file (shared pages) and scatters it back into its shards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Set on a sharded model; `modeling.loss.rows_nll` then calls the model's forward rather than its decoder.
FLAG = "finemed_fsdp"


def is_sharded(model: Any) -> bool:
    return bool(getattr(model, FLAG, False))


def shard(model: Any, compute_dtype: torch.dtype | None = None) -> None:
    """Shard `model` in place: each decoder layer is one unit (all-gathered for its forward and backward
    only), the rest (embeddings, final norm, head) the root unit.

    With `compute_dtype` (bf16/fp16 on a GPU) the shards stay the fp32 masters that AdamW updates and are
    gathered in `compute_dtype` for the forward and backward, gradients reduced in fp32: bf16 weights alone
    would round small updates away (the TTT lesson in DESIGN.md).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype \
        else MixedPrecisionPolicy()
    units = [*model.get_decoder().layers, model]
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    for unit in units:  # per unit: neither setting reaches the layers when set on the root
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    setattr(model, FLAG, True)
    logger.info("FSDP: %d decoder layers and the root sharded over %d processes",
                len(model.get_decoder().layers), torch.distributed.get_world_size())


def my_share(items: list[Any], rank: int, world: int, sharded: bool, filler: Any) -> list[tuple[Any, bool]]:
    """Rank `rank`'s items (every world-th), each marked real (True); sharded, padded with replays
    `(filler, False)` to rank 0's count (the longest), so that every rank runs as many passes."""
    mine = [(m, True) for m in items[rank::world]]
    if sharded:
        mine += [(filler, False)] * (len(items[::world]) - len(mine))
    return mine


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The gathered weights on CPU (collective: every process calls it; rank 0 gets them, others {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    # Tied weights (an LM head sharing the embedding) come back as separate copies: keep the first name, as
    # an unsharded save_pretrained does (the 135M embedded model's final/ was 651 MB with both, 538 without).
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for tied in names.values():
        for name in tied[1:]:
            state.pop(name, None)
    return state


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: Any, optimizer: Any, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Scatter full state dicts (as `full_state_dict` / `full_optimizer_state` wrote them) into the shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options()
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the (sharded) gradients to `max_norm` and return the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    full = getattr(norm, "full_tensor", None)  # a DTensor's norm is partial per shard until reduced
    norm = full() if full else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
