"""Data-parallel training under `torchrun` / `accelerate launch`: one process per device, each taking its
share of every optimizer step's micro-batches, gradients summed across processes once per step.

Why not wrap the model in `DistributedDataParallel`: DDP all-reduces during every backward, so gradient
accumulation needs `no_sync()` on all micro-batches but the last, and a rank whose share of a short final
step is empty would hang it. With LoRA the trainable gradients are a few MB, so one explicit all-reduce of
one flat buffer per optimizer step costs nothing and keeps the semantics simple: the losses are already
normalised by the *global* token (or pair) count, so the summed gradient is exactly the gradient a single
process with `grad_accum × world` micro-batches computes (a test checks this).

Every rank builds the same data, the same adapter initialisation and the same step stream from the seed;
rank 0 alone writes files. Single-process runs get `Dist()` (world 1) and every method is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks (returns the tensor)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_floats(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_grads(self, params: list[torch.Tensor], bucket_elements: int = 1 << 24) -> None:
        """Sum the gradients of `params` across ranks, in flat fp32 buckets of at most `bucket_elements`
        (64 MiB): a LoRA's gradients go in one all-reduce, a full model's without a second copy of all its
        gradients. A parameter a rank did not reach (its share of the step was empty) contributes zeros."""
        if not self.active:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.numel()
            if size >= bucket_elements or i == len(params) - 1:
                flat = self.sum_(torch.cat([q.grad.reshape(-1).float() for q in bucket]))
                offset = 0
                for q in bucket:
                    q.grad.copy_(flat[offset : offset + q.numel()].view_as(q))
                    offset += q.numel()
                bucket, size = [], 0

    def broadcast_(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere (the adapters are seeded identically; this makes it a guarantee)."""
        if self.active:
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def device(self, device: str) -> str:
        """Each process on its own GPU (`cuda` → `cuda:LOCAL_RANK`)."""
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


def init_distributed(device: str) -> Dist:
    """Join the process group `torchrun` or `accelerate launch` describe in the environment (WORLD_SIZE,
    RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); NCCL on CUDA, gloo on CPU. Without them: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        # On GPUs NCCL for CUDA tensors and gloo for the small CPU ones (`sum_floats`, `gather`): NCCL alone
        # refuses CPU tensors.
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
    logger.info("data parallel: rank %d of %d (local %d)", rank, world, local)
    return Dist(rank, world, local)


def shutdown(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
