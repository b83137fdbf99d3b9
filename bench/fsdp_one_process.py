"""`finemed train` with FSDP's sharded code path in ONE process (a one-rank process group), for a machine with
one GPU: `model.fsdp` normally shards only over several processes (one process has nothing to shard and
trains unsharded), so this driver makes the run take the sharded path anyway: FSDP2 units over a one-rank
NCCL group, fp32 master shards gathered in bf16 on the GPU, full state dicts gathered for checkpoints and
final/. What it cannot show is communication between ranks (the CPU test with 2 gloo processes does that).

    torchrun --nproc-per-node 1 bench/fsdp_one_process.py CONFIG [finemed train options]

Used by bench/gpu_acceptance.py; exits non-zero unless the log says the model was sharded and every loss
of the first stage is finite (a few steps of full fine-tuning need not fall monotonically).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass


def main() -> None:
    import torch

    from finemed_cli.cli.main import cli
    from finemed_cli.train import recipe
    from finemed_cli.train.distributed import Dist

    @dataclass(frozen=True)
    class OneRank(Dist):
        @property
        def active(self) -> bool:  # collectives and sharding on, over a group of one
            return True

    def one_rank(device: str) -> Dist:
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend=backend)
        return OneRank(0, 1, 0)

    recipe.init_distributed = one_rank
    sharded = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("FSDP:"):
                sharded.append(record.getMessage())

    watched = logging.getLogger("finemed_cli.train.fsdp")
    watched.addHandler(Watch())
    watched.setLevel(logging.INFO)
    try:
        cli.main(args=["train", *sys.argv[1:]], standalone_mode=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not sharded:
        raise SystemExit("the run never took FSDP's sharded path")
    print(sharded[0])
    runs = [a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")]
    names = [a.split("=", 1)[1] for a in sys.argv if a.startswith("name=")]
    if runs and names:
        from pathlib import Path

        stage = sorted((Path(runs[0]) / names[0]).glob("stage-1-*"))[0]
        losses = [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
        print(f"{stage.name} losses: {', '.join(f'{v:.4f}' for v in losses)}")
        if not losses or not all(math.isfinite(v) for v in losses):
            raise SystemExit(f"{stage}: missing or non-finite losses under FSDP")


if __name__ == "__main__":
    main()
