"""Data parallel for the per-item verbs under `torchrun` / `accelerate launch` (one process per GPU, or several
CPU processes; several nodes through torchrun's rendezvous, with the output on a shared file system).

Each rank takes every n-th item (in `synth run`, every n-th input record of a stage) from its own rank (as
`--shard r/n` does), appends its records to its own part, `OUTPUT.parts/rank-R-of-N.jsonl` (resumable like any answer file: a rerun after a rank died picks up where each
part stopped), and when every rank has finished its part, rank 0 writes OUTPUT: the parts' records in input
order (a synth stage writes 0..n records per input: they are ordered by the input record each came from). The
parts stay: they are what a rerun resumes from, and merging them again gives the same OUTPUT.

`finemed merge` does the same merge for parts made by `--shard i/n` under a scheduler (Slurm arrays).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.data.output import atomic_file
from finemed_cli.errors import DataError

logger = logging.getLogger(__name__)

# How long a rank waits for the others at the end: a share of a large file can take days on a slow device.
WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> Ranks | None:
    """The rank and world size torchrun and `accelerate launch` set (RANK, WORLD_SIZE), or None when this
    process runs alone (not launched, or a world of one)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return Ranks(rank, world) if world > 1 and 0 <= rank < world else None


def part_path(output: Path, ranks: Ranks) -> Path:
    """Where rank `ranks.rank` appends its records."""
    return Path(f"{output}.parts") / f"rank-{ranks.rank}-of-{ranks.world}.jsonl"


def share_limit(limit: int | None, ranks: Ranks) -> int | None:
    """How many of its share a rank answers so that together the ranks answer the first `limit` items, as
    one process would: rank r's share of items[:limit] is items[r:limit:n]."""
    return None if limit is None else len(range(ranks.rank, limit, ranks.world))


def join(ranks: Ranks) -> None:
    """Join the launched ranks' process group (gloo: it needs no GPU), once; with GPUs, each rank's torch work
    goes to the GPU of its local rank ("cuda" means the current device)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=WAIT)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", ranks.rank)) % torch.cuda.device_count())


def wait_for_all(ranks: Ranks) -> None:
    """Return when every rank has reached this point."""
    import torch.distributed as dist

    join(ranks)
    dist.barrier()


def agreed(value: Any, ranks: Ranks | None) -> Any:
    """Rank 0's `value` on every rank (a decision that must not differ between them, e.g. one taken on
    time); `value` itself when running alone."""
    if ranks is None:
        return value
    import torch.distributed as dist

    join(ranks)
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (e.g. each rank's count of what it did)."""
    import torch.distributed as dist

    join(ranks)
    box: list[Any] = [None] * ranks.world
    dist.all_gather_object(box, value)
    return box


def read_parts(paths: list[Path]) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
    """The records of the parts by id, and each part's ids in its order; the same id in two parts is an error
    naming both (parts of one run never overlap, so that is two runs mixed)."""
    import orjson

    found: dict[str, dict[str, Any]] = {}
    per_part: list[list[str]] = []
    where: dict[str, str] = {}
    for path in paths:
        per_part.append([])
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                rid = str(rec["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: not an answer record (JSON with an \"id\"); merge only the part "
                                "files a sharded run wrote") from None
            if rid in found:
                raise DataError(f"{path}:{n}: id {rid!r} is also in {where[rid]}; the parts come from different "
                                "runs: merge the parts of one run") from None
            found[rid], where[rid] = rec, f"{path}:{n}"
            per_part[-1].append(rid)
    return found, per_part


def _own_id(record: dict[str, Any]) -> str:
    return str(record["id"])


def merge_parts(parts: list[Path], output: Path, order: list[str] | None = None, base: Path | None = None,
                origin: Callable[[dict[str, Any]], str] = _own_id) -> int:
    """Write the parts' records to `output` (atomically), in `order` (the input's ids: each record placed by
    the input it came from, `origin(record)`, by default its own id; records from one input keep their order
    in their part, and records from no input in `order` follow in part order); without `order`, round robin
    over the parts, which is input order for the parts of `--shard 0/n … n-1/n` given in shard order. `base`:
    a file whose records are kept where no part has their id (what a one-process run, or an earlier merge,
    wrote). Returns the number of records written."""
    import orjson

    records, per_part = read_parts(parts)
    if base is not None and base.is_file():
        kept, _ = read_parts([base])
        per_part.insert(0, [i for i in kept if i not in records])
        records = {**{i: kept[i] for i in per_part[0]}, **records}
    if order is not None:
        place = {i: k for k, i in reversed(list(enumerate(order)))}  # an id given twice: its first place
        ids = sorted((i for lst in per_part for i in lst), key=lambda i: place.get(origin(records[i]), len(place)))
    else:
        ids = [lst[k] for k in range(max(map(len, per_part), default=0)) for lst in per_part if k < len(lst)]
    with atomic_file(output) as tmp:
        tmp.write_bytes(b"".join(orjson.dumps(records[i]) + b"\n" for i in ids))
    logger.info("merged %d records from %d parts into %s", len(ids), len(parts), output)
    return len(ids)


def done_ids(path: Path) -> list[str]:
    """The ids of the records in `path` (none when it does not exist)."""
    if not path.is_file():
        return []
    return list(read_parts([path])[0])
