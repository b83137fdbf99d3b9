"""The one item runner, for `finemed answer` and every `finemed eval` mode: per item not yet done, TTT on its
neighbours (one at a time, batched, by ggml, or not at all; skipped by the relevance gate), the caller's work on
the adapted model, the record appended as soon as it exists, counted; the model restored before the next.

What differs between the verbs is only the work (generate an answer, score options, score a held-out record):
the caller gives it as `compute(chunk)`, which yields one record (or None) per item of the chunk. Everything
else that travels through the loop travels in one `ItemContext`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.prompts import SYSTEM_PROMPT
from finemed_cli.ttt.update import BatchTTT, TTTResult, ttt_batch_session, ttt_session


@dataclass
class Tally:
    """What the runner has written: records, and of those with a `correct` field, how many are right."""

    written: int = 0
    scored: int = 0
    correct: int = 0


@dataclass
class ItemContext:
    """The state one pass over items carries: the model, the TTT settings, where records go and how progress
    shows.

    Attributes:
        name: the progress bar's label.
        loaded: the `LoadedModel` (TTT trains its torch model; its tokenizer formats the neighbours).
        ttt: the TTT settings (`mode` off: no TTT).
        writer: where records are appended.
        seed: TTT's seed.
        system: the system prompt the neighbours are formatted under, as the items are.
        ttt_batch: LoRA TTT of this many items together (`ttt_batch_session`).
        plain_batch: items per chunk without TTT (the caller's work takes them in one pass).
        ggml: a `ttt.ggml.GgmlEngine`, which then trains each item's adapter on the GGUF.
        progress: show the bar.
        total, done: the bar's size and what was already done before this run (resumed).
        unit, doing: the bar's unit and the phase shown while the work runs (TTT shows as "TTT").
        on_record: called with each record once it is written.
    """

    name: str
    loaded: Any
    ttt: TTTConfig
    writer: JsonlAppender
    seed: int = 0
    system: str | None = SYSTEM_PROMPT
    ttt_batch: int = 1
    plain_batch: int = 1
    ggml: Any = None
    progress: bool = True
    total: int = 0
    done: int = 0
    unit: str = "item"
    doing: str = "scoring"
    on_record: Callable[[dict[str, Any]], None] | None = None
    tally: Tally = field(default_factory=Tally)


@dataclass
class AdaptedChunk:
    """Items the model is adapted to for one iteration of the runner."""

    positions: list[int]  # the items' indices in the runner's list
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


# compute(chunk) -> one record (or None: nothing to write) per position of the chunk, in order
Compute = Callable[[AdaptedChunk], Iterable[dict[str, Any] | None]]


class ItemRunner:
    """The loop, with its progress bar open for the runner's life: `write` records what needs no model (an
    item refused before the loop), `run` does the loop. Use as a context manager."""

    def __init__(self, ctx: ItemContext) -> None:
        from finemed_cli.console import bar as progress_bar

        self.ctx = ctx
        self.bar = progress_bar(total=ctx.total, initial=ctx.done, desc=ctx.name, unit=ctx.unit,
                                progress=ctx.progress)

    def __enter__(self) -> ItemRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record, count it, show it."""
        ctx = self.ctx
        ctx.writer.append(rec)
        ctx.tally.written += 1
        if "correct" in rec:
            ctx.tally.scored += 1
            ctx.tally.correct += int(rec["correct"])
        self.bar.update(1)
        if ctx.on_record is not None:
            ctx.on_record(rec)

    def run(self, neighbours: list[list[CorpusRecord]], scores: list[list[float]], compute: Compute) -> Tally:
        """For each item (its neighbours and their retrieval scores; [] for none), TTT on the neighbours unless
        the gate skips it, then `compute`; the records written as they come."""
        ctx = self.ctx
        train = [[] if ctx.ttt.mode == "off" or ctx.ttt.gated(s) else n
                 for n, s in zip(neighbours, scores, strict=True)]
        adapting = "TTT" if ctx.ttt.mode != "off" else ctx.doing
        # closing: an error mid-chunk still ends its TTT session (the model restored) before it propagates
        with contextlib.closing(adapted_chunks(ctx, train)) as chunks:
            self._phase(adapting)  # the chunk's TTT runs as the loop asks for it
            for chunk in chunks:
                self._phase(ctx.doing)
                for _pos, rec in zip(chunk.positions, compute(chunk), strict=True):
                    if rec is not None:
                        self.write(rec)
                    else:
                        self.bar.update(1)
                self._phase(adapting if chunk.positions[-1] + 1 < len(train) else "done")
        return ctx.tally

    def _phase(self, phase: str) -> None:
        """Show what the run is doing now (TTT or the work) beside the running accuracy."""
        shown = {"phase": phase}
        if self.ctx.tally.scored:
            shown["acc"] = f"{self.ctx.tally.correct}/{self.ctx.tally.scored}"
        self.bar.set_postfix(shown)


def adapted_chunks(ctx: ItemContext, neighbours: list[list[CorpusRecord]]) -> Iterator[AdaptedChunk]:
    """Walk the items (one list of neighbour records each: what TTT trains on) in chunks, the model adapted to
    the chunk's items during the body of each iteration and restored before the next.

    - LoRA TTT with `ctx.ttt_batch` > 1: that many items' adapters train together (`ttt_batch_session`).
    - Other TTT (one at a time, the paper's mode): one item per chunk in its own `ttt_session`, or the ggml
      engine's session.
    - No TTT: `ctx.plain_batch` items per chunk, the model as it is.
    """
    n, config, model, tokenizer = len(neighbours), ctx.ttt, ctx.loaded.model, ctx.loaded.tokenizer
    adapts = config.mode != "off"
    together = config.mode == "lora" and ctx.ttt_batch > 1 and ctx.ggml is None
    size = ctx.ttt_batch if together else (1 if adapts else ctx.plain_batch)
    for lo in range(0, n, max(1, size)):
        positions = list(range(lo, min(n, lo + size)))
        if together and any(neighbours[i] for i in positions):
            with ttt_batch_session(model, tokenizer, [neighbours[i] for i in positions], config,
                                   seed=ctx.seed, system=ctx.system) as batch:
                yield AdaptedChunk(positions, batch.results, batch)
        elif adapts and not together:
            session = (ctx.ggml.session(tokenizer, neighbours[lo], seed=ctx.seed, system=ctx.system)
                       if ctx.ggml is not None else
                       ttt_session(model, tokenizer, neighbours[lo], config, seed=ctx.seed, system=ctx.system))
            with session as result:
                yield AdaptedChunk(positions, [result])
        else:
            yield AdaptedChunk(positions, [TTTResult("off", 0, None, None, 0.0, 0) for _ in positions])
