"""Resumable checkpoints of a training stage: the trainable state, optimizer, scheduler, RNG and step, written
by rank 0 and read back with `weights_only=True` (tensors and plain values: a planted file runs nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finemed_cli.data.output import atomic_file
from finemed_cli.errors import ConfigError
from finemed_cli.train import fsdp
from finemed_cli.train.distributed import Dist


def save_checkpoint(out: Path, model: Any, params: list[torch.Tensor], optimizer: Any, scheduler: Any, step: int,
                    dist: Dist, sharded: bool) -> None:
    """Rank 0 writes `out/checkpoint.pt` (sharded: gathered from every rank first, a collective), atomically."""
    if sharded:
        state = {"model": fsdp.full_state_dict(model), "optimizer": fsdp.full_optimizer_state(model, optimizer)}
    elif dist.main:
        state = {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict()}
    if not dist.main:
        return
    with atomic_file(out / "checkpoint.pt") as tmp:
        torch.save({**state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step,
                    "world": dist.world}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable checkpoint, read with `weights_only=True`: tensors and plain Python values only, so a
    planted file cannot run code (torch's full unpickler would run whatever the file names)."""
    import pickle

    try:
        # mmap: the ranks of one machine share the file's pages rather than each holding a copy
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a checkpoint finemed can load safely ({first[:160]}); delete it to rerun "
                          "the stage from its start") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= state.keys():
        raise ConfigError(f"{path}: not a finemed checkpoint (missing keys); delete it to rerun the stage")
    return state
