"""`finemed synth run PIPELINE.yaml`: every stage in order, each resumable, in one work folder:

    questions.jsonl  scored.jsonl  filtered.jsonl  classified.jsonl  corpus.jsonl (the complex tier, o1 corpus
    records)  corpus.common.jsonl (the common tier, instruction/output records)  pairs.jsonl
    (each with its .rejects.jsonl) and summary.json (per stage: in, written, rejected, items/s)

A stage whose input came out empty (every record rejected, or no complex-tier question for `pairs`) is
counted with 0 inputs rather than run on a file that does not exist.

Under `torchrun` / `accelerate launch` (parallel.py) each rank runs every stage on every n-th input record
from its rank, into `STAGE.jsonl.parts/rank-R-of-N.jsonl` (with its rejects and common tier beside it), and
rank 0 merges the parts into the stage's file, each record placed by the input record it came from, before
any rank starts the next stage: the files are those one process writes. filter compares all questions, so
rank 0 runs it alone. A rerun resumes every rank's parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.synth import SynthConfig, load_synth_config
from finemed_cli.data.output import OutputLock, check_output, ensure_dir
from finemed_cli.errors import ConfigError
from finemed_cli.parallel import Ranks, gathered, launched, merge_parts, part_path, wait_for_all
from finemed_cli.synth.stage import StageSummary, default_rejects, default_side, read_input
from finemed_cli.synth.stages import STAGES, Models, StageFiles, StageSpec, run_named_stage

logger = logging.getLogger(__name__)


def run_pipeline(config: Path, progress: bool = True) -> tuple[Path, list[StageSummary]]:
    """Run every stage of the config in order; returns the work folder and each stage's summary (under
    torchrun, the ranks' summed)."""
    cfg = load_synth_config(config)
    out, raw = Path(cfg.out_dir), Path(cfg.raw)
    check_output(out, inputs=[raw, config], kind="dir", what="out_dir")
    ranks = launched()
    if ranks is not None:
        _check_parts(out)
    with OutputLock(out) if ranks is None or ranks.main else contextlib.nullcontext():
        read_input(raw)  # a bad raw file stops the run before any model loads or anything is written
        models = Models(cache_dir=out)  # endpoint replies cached in the work folder (one file all ranks share)
        summaries: list[StageSummary] = []
        try:
            source = raw
            for spec in STAGES:
                target = out / spec.output
                if not source.exists():  # the stage before wrote nothing: nothing to do
                    summaries.append(StageSummary(spec.name, 0))
                else:
                    summaries.append(_stage(spec, StageFiles(source, target), cfg, models, (progress, ranks)))
                    logger.debug("%s", summaries[-1].line())
                source = target
        finally:
            models.close()
            if summaries and (ranks is None or ranks.main):
                rows: list[dict[str, Any]] = [dataclasses.asdict(s) | {"items_per_s": round(s.per_second, 3)}
                                              for s in summaries]
                (ensure_dir(out) / "summary.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return out, summaries


def _check_parts(out: Path) -> None:
    """A work folder one process began is continued by one process: its files hold records no part has."""
    first = out / STAGES[0].output
    if first.exists() and not part_path(first, Ranks(0, 1)).parent.is_dir():
        raise ConfigError(f"{out} was begun by one process: continue it with one process, or give torchrun "
                          "another out_dir (its ranks write parts beside each stage's file and merge them)")


def _stage(spec: StageSpec, files: StageFiles, cfg: SynthConfig, models: Models,
           how: tuple[bool, Ranks | None]) -> StageSummary:
    """One stage of the pipeline: in this process, or this rank's share into its part and then (rank 0) the
    parts merged into the stage's files, every rank waiting for the merge."""
    progress, ranks = how
    limit = cfg.limit if spec.name == "questions" else None
    if ranks is None:
        return run_named_stage(spec.name, files, cfg, models, progress, limit=limit)
    alone = spec.name == "filter"  # it compares every question with every other: rank 0 runs it whole
    summary = StageSummary(spec.name, 0)
    part = part_path(files.output, ranks)
    if ranks.main or not alone:
        part.parent.mkdir(parents=True, exist_ok=True)
        summary = run_named_stage(spec.name, StageFiles(files.source, part), cfg, models, progress and ranks.main,
                                  limit=limit,
                                  share=None if alone else ranks)
    every = gathered(summary, ranks)
    if ranks.main:
        _merge(spec, files, ranks, [r["id"] for r in read_input(files.source, limit)])
    wait_for_all(ranks)
    return StageSummary(spec.name, sum(s.inputs for s in every), sum(s.written for s in every),
                        sum(s.rejected for s in every), sum(s.resumed for s in every),
                        max(s.seconds for s in every))


def _origin(spec: StageSpec) -> Any:
    """The input id an output record of `spec` came from: questions carry their text's as `source_id`; every
    other stage's records (and every reject) keep their input's id."""
    if spec.name == "questions":
        return lambda rec: str(rec.get("source_id", rec["id"]))
    return lambda rec: str(rec["id"])


def _merge(spec: StageSpec, files: StageFiles, ranks: Ranks, order: list[str]) -> None:
    """The ranks' parts into the stage's output, rejects and (respond) common-tier files, in input order; a
    file no rank wrote to is not made, as one process would not make it."""
    parts = [part_path(files.output, Ranks(r, ranks.world)) for r in range(ranks.world)]
    for kind in (lambda p: p, default_rejects, default_side):
        if kind is default_side and spec.name != "respond":
            continue
        found = [kind(p) for p in parts if kind(p).exists()]
        if found:
            merge_parts(found, kind(files.output), order, origin=_origin(spec))
