"""The one item loop: per item, TTT on its retrieved neighbours (one at a time, or batched), then the
caller's work on the adapted model. `finemed answer` generates inside it; every `finemed eval` mode scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.prompts import SYSTEM_PROMPT
from finemed_cli.ttt.update import BatchTTT, TTTResult, ttt_batch_session, ttt_session


@dataclass
class AdaptedChunk:
    """Items the model is adapted to for one iteration of `adapted_chunks`."""

    positions: list[int]  # the items' indices in the caller's list
    results: list[TTTResult]  # each item's TTT ("off" without TTT)
    batch: BatchTTT | None = None  # the batched session, when the items' adapters trained together

    @property
    def batched_adapter(self) -> Any:
        """The multi-adapter LoRA of a batched session (scorers set its segments), else None."""
        return self.batch.adapter if self.batch is not None else None

    def activate(self, j: int) -> Any:
        """Make item j's adapter the live one (the transformers generator reads it from the model); returns
        what a llama.cpp generator is handed for it."""
        if self.batch is not None:
            self.batch.select(j)
        return self.results[j].adapter


def adapted_chunks(model: Any, tokenizer: Any, neighbours: list[list[CorpusRecord]], config: TTTConfig, *,
                   seed: int = 0, ttt_batch: int = 1, plain_batch: int = 1,
                   system: str | None = SYSTEM_PROMPT, ggml: Any = None) -> Iterator[AdaptedChunk]:
    """Walk the items (one list of neighbour records each) in chunks, the model adapted to the chunk's items
    during the body of each iteration and restored before the next.

    - LoRA TTT with `ttt_batch` > 1: that many items' adapters train together (`ttt_batch_session`).
    - Other TTT (one at a time, the paper's mode): one item per chunk in its own `ttt_session`.
    - No TTT: `plain_batch` items per chunk, the model as it is.

    The neighbours are formatted under `system`, the run's system prompt, as the items are. With `ggml` (a
    `ttt.ggml.GgmlEngine`), each item's adapter is trained by ggml on the GGUF, one item at a time.
    """
    n = len(neighbours)
    adapts = config.mode != "off"
    together = config.mode == "lora" and ttt_batch > 1 and ggml is None
    size = ttt_batch if together else (1 if adapts else plain_batch)
    for lo in range(0, n, max(1, size)):
        positions = list(range(lo, min(n, lo + size)))
        if together and any(neighbours[i] for i in positions):
            with ttt_batch_session(model, tokenizer, [neighbours[i] for i in positions], config,
                                   seed=seed, system=system) as batch:
                yield AdaptedChunk(positions, batch.results, batch)
        elif adapts and not together:
            session = ggml.session(tokenizer, neighbours[lo], seed=seed, system=system) if ggml is not None else \
                ttt_session(model, tokenizer, neighbours[lo], config, seed=seed, system=system)
            with session as result:
                yield AdaptedChunk(positions, [result])
        else:
            yield AdaptedChunk(positions, [TTTResult("off", 0, None, None, 0.0, 0) for _ in positions])
