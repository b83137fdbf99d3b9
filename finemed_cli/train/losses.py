"""The training losses: per-sequence NLL over packed rows (SFT), sequence log-probabilities of preference
pairs and the sigmoid DPO loss, and the held-out SFT loss. Sequences are packed into one row with no padding
and attend per sequence (`modeling.varlen`); the LM head runs only on labelled tokens (`modeling.loss`)."""

from __future__ import annotations

from typing import Any

import torch

from finemed_cli.train import fsdp
from finemed_cli.train.data import Encoded
from finemed_cli.train.distributed import Dist


def pack(seqs: list[Encoded]) -> Any:
    from finemed_cli.modeling.examples import TrainingExample, pack_examples

    return pack_examples([TrainingExample(torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in seqs])


def sequence_nll(model: Any, seqs: list[Encoded]) -> torch.Tensor:
    """Per-sequence sums of NLL over labelled tokens, the sequences packed into one row."""
    from finemed_cli.modeling.loss import rows_nll

    return rows_nll(model, pack(seqs))


@torch.no_grad()
def evaluate_sft(model: Any, items: list[Encoded], batch_size: int, dist: Dist = Dist()) -> float | None:
    """Mean token NLL over held-out sequences (each rank scores its share)."""
    if not items:
        return None
    mine = fsdp.my_share(items, dist.rank, dist.world, fsdp.is_sharded(model), items[0])
    total = tokens = 0.0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        nll = sequence_nll(model, [e for e, _ in chunk])
        total += float(nll[torch.tensor([real for _, real in chunk], device=nll.device)].sum())
        tokens += sum(e.target_tokens for e, real in chunk if real)
    total, tokens = dist.sum_floats(total, tokens)
    return total / tokens


def pair_logps(model: Any, pairs: list[tuple[Encoded, Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected responses."""
    nll = sequence_nll(model, [e for pair in pairs for e in pair])
    return -nll[0::2], -nll[1::2]




def dpo_loss(model: Any, pairs: list[tuple[Encoded, Encoded]], beta: float, reference: list[list[float]],
             indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair, the implicit reward margin, and whether chosen wins. `reference` holds the
    reference model's (chosen, rejected) log-probabilities of the pairs' split, `indices` the pairs' positions
    in it."""
    pc, pr = pair_logps(model, pairs)
    ref = torch.tensor([reference[i] for i in indices], device=pc.device)
    margin = beta * ((pc - ref[:, 0]) - (pr - ref[:, 1]))
    return -torch.nn.functional.logsigmoid(margin), margin.detach(), (margin > 0).float()
