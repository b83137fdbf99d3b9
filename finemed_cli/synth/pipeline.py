"""`finemed synth run PIPELINE.yaml`: every stage in order, each resumable, in one work folder:

    questions.jsonl  scored.jsonl  filtered.jsonl  classified.jsonl  corpus.jsonl (the complex tier, o1 corpus
    records)  corpus.common.jsonl (the common tier, instruction/output records)  pairs.jsonl
    (each with its .rejects.jsonl) and summary.json (per stage: in, written, rejected, items/s)

A stage whose input came out empty (every record rejected, or no complex-tier question for `pairs`) is
counted with 0 inputs rather than run on a file that does not exist.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.synth import load_synth_config
from finemed_cli.data.output import OutputLock, check_output, ensure_dir
from finemed_cli.synth.stage import StageSummary, read_input
from finemed_cli.synth.stages import STAGES, Models, StageFiles, run_named_stage

logger = logging.getLogger(__name__)


def run_pipeline(config: Path, progress: bool = True) -> tuple[Path, list[StageSummary]]:
    """Run every stage of the config in order; returns the work folder and each stage's summary."""
    cfg = load_synth_config(config)
    out, raw = Path(cfg.out_dir), Path(cfg.raw)
    check_output(out, inputs=[raw, config], kind="dir", what="out_dir")
    with OutputLock(out):
        read_input(raw)  # a bad raw file stops the run before any model loads or anything is written
        models = Models()
        summaries: list[StageSummary] = []
        try:
            source = raw
            for spec in STAGES:
                target = out / spec.output
                if not source.exists():  # the stage before wrote nothing: nothing to do
                    summaries.append(StageSummary(spec.name, 0))
                    source = target
                    continue
                summary = run_named_stage(spec.name, StageFiles(source, target), cfg, models, progress,
                                          limit=cfg.limit if spec.name == "questions" else None)
                logger.debug("%s", summary.line())
                summaries.append(summary)
                source = target
        finally:
            models.close()
            if summaries:
                rows: list[dict[str, Any]] = [dataclasses.asdict(s) | {"items_per_s": round(s.per_second, 3)}
                                              for s in summaries]
                (ensure_dir(out) / "summary.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return out, summaries
