"""The synth stages by name: which model each uses, what it writes, and the one function that runs a stage
(used by `finemed synth STAGE` and by `finemed synth run`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.synth.config import SynthConfig
from finemed_cli.synth.stage import StageSummary, read_input, run_stage, stage_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    name: str
    output: str  # its file in a pipeline's work folder
    done_key: Callable[[dict[str, Any]], str] | None = None  # the output id that marks an input record done


STAGES = [StageSpec("questions", "questions.jsonl", lambda r: f"{r['id']}-q1"),
          StageSpec("score", "scored.jsonl"), StageSpec("classify", "classified.jsonl"),
          StageSpec("filter", "filtered.jsonl"), StageSpec("respond", "corpus.jsonl"),
          StageSpec("pairs", "pairs.jsonl")]
BY_NAME = {s.name: s for s in STAGES}


class Models:
    """GGUF models loaded once each, by path (None and "embedded": the embedded model); closed together."""

    def __init__(self) -> None:
        self._loaded: dict[str | None, Any] = {}

    def get(self, name: str | None) -> Any:
        from finemed_cli.synth.llm import LlamaCppModel

        key = None if name in (None, "embedded") else name
        if key not in self._loaded:
            self._loaded[key] = LlamaCppModel(key)
        return self._loaded[key]

    def close(self) -> None:
        for m in self._loaded.values():
            m.close()
        self._loaded.clear()


def responder_prompt(cfg: SynthConfig) -> str | None:
    """The responder's system prompt: finemed's o1 instructions unless `system_prompt` says otherwise."""
    from finemed_cli.modeling.prompts import resolve_system_prompt
    from finemed_cli.synth.prompts import RESPOND_SYSTEM

    return RESPOND_SYSTEM if cfg.system_prompt is None else resolve_system_prompt(cfg.system_prompt)


def stage_function(name: str, cfg: SynthConfig, models: Models, records: list[dict[str, Any]]) -> Any:
    """The per-record function of stage `name` (filter sees all records first: it compares questions)."""
    from finemed_cli.synth import generate, judge
    from finemed_cli.synth.filter import FilterRules, filterer

    reasoner = cfg.reasoner or cfg.judge
    if name in ("questions", "score", "classify"):
        warn_embedded_judge(cfg.judge)
    if name == "questions":
        return generate.questioner(models.get(cfg.judge), cfg.retries)
    if name == "score":
        return judge.scorer(models.get(cfg.judge), cfg.retries)
    if name == "classify":
        return judge.classifier(models.get(cfg.judge), cfg.retries)
    if name == "filter":
        rules = FilterRules(cfg.complex_above, cfg.min_quality, cfg.min_relevance, not cfg.keep_case_specific)
        return filterer(records, rules)
    if name == "respond":
        return generate.responder(models.get(reasoner), max_tokens=cfg.respond_max_tokens,
                                  system=responder_prompt(cfg))
    if name == "pairs":
        reward = (generate.rewarder(models.get(cfg.reward_model), cfg.reward_min_margin, cfg.retries)
                  if cfg.reward_model else None)
        return generate.pairer(models.get(reasoner), models.get(cfg.base or cfg.judge), cfg.pair_samples,
                               cfg.respond_max_tokens, reward, system=responder_prompt(cfg))
    raise ValueError(f"unknown synth stage {name!r}")


@functools.cache  # once per process: `synth run` judges in three stages
def warn_embedded_judge(judge: str | None) -> None:
    """The embedded models judge the schema right and the content not at all: say so before they judge."""
    from finemed_cli.models.embedded import DEFAULT_MODEL_NAME, embedded_caution

    name = DEFAULT_MODEL_NAME if judge in (None, "embedded") else embedded_caution(Path(judge))
    if name:
        logger.warning("the judge is the embedded %s: its scores and departments carry no signal (bench/"
                       "judge_quality.py: every question the same department, AUC 0.5-0.6); it checks the plumbing. "
                       "For real data pass a 7-8B instruct GGUF: --model JUDGE.gguf (judge: in a synth config)", name)


def run_named_stage(name: str, source: Path, output: Path, rejects: Path | None, cfg: SynthConfig, models: Models,
                    progress: bool = True, limit: int | None = None) -> StageSummary:
    """Stage `name` from `source` into `output` (and its rejects): outputs checked and locked, the input read,
    the models loaded (after that, not before), every record accounted for; resumable."""
    spec = BY_NAME[name]
    models_used = [m for m in (cfg.judge, cfg.reasoner, cfg.base, cfg.reward_model) if m and m != "embedded"]
    with stage_outputs([source, *map(Path, models_used)], output, rejects) as rejects_path:
        records = read_input(source, limit)
        fn = stage_function(name, cfg, models, records)
        kwargs = {"done_key": spec.done_key} if spec.done_key else {}
        return run_stage(name, records, output, rejects_path, fn, progress, **kwargs)
