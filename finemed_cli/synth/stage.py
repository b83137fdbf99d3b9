"""One synth stage: JSONL in, JSONL out, every input accounted for. Each input record either becomes an
output record or a reject record (`{"id", "stage", "reason", "record"}`) in the rejects file; both are
appended as they are made, so a rerun skips every id already in either file and resumes."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.data.jsonl import JsonlAppender, iter_jsonl
from finemed_cli.data.output import check_output, guarded_outputs
from finemed_cli.errors import DataError
from finemed_cli.synth.llm import StructuredError

logger = logging.getLogger(__name__)


class Reject(Exception):
    """Raised by a stage function for a record it cannot use; the message is the reason kept."""


@dataclass(frozen=True)
class ToSide:
    """A stage function's result that belongs in the stage's side file (respond: the common tier's records,
    which are not o1 corpus records, beside the complex tier's corpus)."""

    record: dict[str, Any]


@dataclass
class StageSummary:
    stage: str
    inputs: int
    written: int = 0
    rejected: int = 0
    resumed: int = 0  # already in the output or rejects from an earlier run
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        done = self.written + self.rejected
        return done / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.stage}: {self.inputs} in -> {self.written} written, {self.rejected} rejected"
                + (f", {self.resumed} already done" if self.resumed else "")
                + (f" ({self.per_second:.2f} items/s)" if self.seconds else ""))


def default_rejects(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")


def default_side(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".common.jsonl")


@contextlib.contextmanager
def stage_outputs(inputs: list[Path], output: Path, rejects: Path | None = None,
                  side: Path | None = None) -> Iterator[Path]:
    """Check a stage's output, rejects and side files (not an input, not each other, writable) and hold their
    locks for the block; yields the rejects path. Nothing is created here: the files are made at their first
    line."""
    rejects = rejects or default_rejects(output)
    check_output(output, inputs=inputs)
    check_output(rejects, inputs=[*inputs, output], what="rejects file")
    if side is not None:
        check_output(side, inputs=[*inputs, output, rejects], what="common-tier file")
    with guarded_outputs([output, rejects, *([side] if side else [])]):
        yield rejects


def read_input(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records with a string id, every bad line reported at once; an input without records is an error."""
    records, errors, seen = [], [], {}
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            errors.append(f"{path}:{line}: expected a JSON object with a string 'id'")
        elif obj["id"] in seen:
            errors.append(f"{path}:{line}: duplicate id {obj['id']!r} (first at line {seen[obj['id']]})")
        else:
            seen[obj["id"]] = line
            records.append(obj)
    if errors:
        raise DataError("\n".join(errors[:20]))
    if not records:
        raise DataError(f"{path}: no records (the file is empty); write one JSON object per line")
    return records[:limit] if limit else records


def outcomes(fn: Callable[[dict[str, Any]], Any], todo: list[dict[str, Any]], workers: int = 1
             ) -> Iterator[tuple[dict[str, Any], Any]]:
    """(record, what `fn` returned or the Reject/StructuredError it raised) in input order, with up to
    `workers` records in flight on threads (a server answers several requests at once); any other error stops
    the stage, the records not yet started cancelled."""

    def call(rec: dict[str, Any]) -> Any:
        try:
            return fn(rec)
        except (Reject, StructuredError) as e:  # StructuredError: no valid reply, or too long for the model
            return e

    if workers <= 1:
        yield from ((rec, call(rec)) for rec in todo)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="synth") as pool:
        window: collections.deque[tuple[dict[str, Any], Future[Any]]] = collections.deque()
        try:
            for rec in todo:
                window.append((rec, pool.submit(call, rec)))
                if len(window) >= 2 * workers:  # keep every worker busy while the oldest record finishes
                    head, future = window.popleft()
                    yield head, future.result()
            while window:
                head, future = window.popleft()
                yield head, future.result()
        finally:
            for _, future in window:
                future.cancel()


def _by_id(record: dict[str, Any]) -> str:
    return record["id"]


@dataclass(frozen=True)
class StageWalk:
    """How a stage walks its records: a progress bar or not, what marks a record done (its id, by default),
    the side file (respond's common tier) and how many records are in flight at once (endpoint roles)."""

    progress: bool = True
    done_key: Callable[[dict[str, Any]], str] = _by_id
    side: Path | None = None
    workers: int = 1


def run_stage(name: str, records: list[dict[str, Any]], output: Path, rejects: Path | None,
              fn: Callable[[dict[str, Any]], Any], walk: StageWalk = StageWalk()) -> StageSummary:
    """Apply `fn` to every record not yet done (its `walk.done_key` in the output or side file, or its id in
    the rejects), `walk.workers` records at a time, writing in input order; `fn` returns the output record (or a
    list of them, written in one piece), a `ToSide` record for the side file, or raises Reject."""
    from finemed_cli.console import bar as progress_bar

    progress, done_key, side, workers = walk.progress, walk.done_key, walk.side, walk.workers

    rejects = rejects or default_rejects(output)
    summary = StageSummary(name, len(records))
    with JsonlAppender(output) as out, JsonlAppender(rejects) as bad, \
            (JsonlAppender(side) if side else contextlib.nullcontext()) as aside:
        done = out.done_ids | (aside.done_ids if aside else set())
        todo = [r for r in records if done_key(r) not in done and r["id"] not in bad.done_ids]
        summary.resumed = len(records) - len(todo)
        t0 = time.perf_counter()
        for rec, result in progress_bar(outcomes(fn, todo, workers), total=len(todo), desc=f"synth {name}",
                                        unit="item", progress=progress):
            if isinstance(result, (Reject, StructuredError)):
                bad.append({"id": rec["id"], "stage": name, "reason": str(result), "record": rec})
                summary.rejected += 1
                continue
            if isinstance(result, ToSide):
                aside.append(result.record)  # type: ignore[union-attr]  # a stage that returns ToSide has a side
                summary.written += 1
            elif isinstance(result, list):
                out.append_many(result)
                summary.written += len(result)
            else:
                out.append(result)
                summary.written += 1
        summary.seconds = time.perf_counter() - t0
    return summary
