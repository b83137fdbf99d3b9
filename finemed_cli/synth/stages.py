"""The synth stages by name: which model each uses, what it writes, and the one function that runs a stage
(used by `finemed synth STAGE` and by `finemed synth run`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.config.endpoint import EndpointConfig, role_concurrency
from finemed_cli.config.synth import SynthConfig
from finemed_cli.errors import ConfigError
from finemed_cli.parallel import Ranks
from finemed_cli.synth.generate import questions_done_key
from finemed_cli.synth.stage import (
    StageSummary,
    StageWalk,
    default_side,
    read_input,
    run_stage,
    stage_outputs,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    name: str
    output: str  # its file in a pipeline's work folder
    done_key: Callable[[dict[str, Any]], str] | None = None  # the output id that marks an input record done


# The reference's order: questions are written, scored and filtered (one per text, with its tier), the texts
# of those kept are classified (the reference classifies raw texts; after the filter it is one text per kept
# question), and then answered by tier.
STAGES = [StageSpec("questions", "questions.jsonl", questions_done_key),
          StageSpec("score", "scored.jsonl"), StageSpec("filter", "filtered.jsonl"),
          StageSpec("classify", "classified.jsonl"), StageSpec("respond", "corpus.jsonl"),
          StageSpec("pairs", "pairs.jsonl")]
BY_NAME = {s.name: s for s in STAGES}


@dataclass(frozen=True)
class StageFiles:
    """The files of one stage run: its input, its output, its rejects (None: OUTPUT stem + .rejects.jsonl) and,
    for respond, the common tier's side file (None: OUTPUT stem + .common.jsonl)."""

    source: Path
    output: Path
    rejects: Path | None = None
    side: Path | None = None
JUDGE_CONTEXT = 4096  # questions, scores, departments: a source text is cut to fit, a longer question rejected
PROMPT_ROOM = 4096  # respond and pairs: room for the prompt (question and source text) besides the budget


class Models:
    """GGUF models loaded once each, by path (None and "embedded": the embedded model), and one client per
    endpoint (its response cache in `cache_dir`); closed together. A GGUF wanted with a longer context than it
    was opened with is opened again with it."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._loaded: dict[str | None, Any] = {}
        self.clients: dict[EndpointConfig, Any] = {}
        self.cache_dir = cache_dir

    def get(self, name: str | EndpointConfig | None, n_ctx: int = JUDGE_CONTEXT) -> Any:
        from finemed_cli.synth.llm import LlamaCppModel

        if isinstance(name, EndpointConfig):
            return self._endpoint(name, n_ctx)
        if isinstance(name, str) and name.startswith(("http://", "https://")):
            raise ConfigError(f"{name}: a server is given in a synth config, as {{url: {name}, model: NAME}} "
                              "(finemed synth run CONFIG); a stage command's --model takes a GGUF")
        key = None if name in (None, "embedded") else name
        if key in self._loaded and self._loaded[key].context_length < n_ctx:
            self._loaded.pop(key).close()
        if key not in self._loaded:
            self._loaded[key] = LlamaCppModel(key, n_ctx=n_ctx)
        return self._loaded[key]

    def many(self, wanted: list[tuple[str | None, int]]) -> list[Any]:
        """Several models at once, each opened with the longest context any of its uses needs."""
        longest: dict[str | None, int] = {}
        for name, n_ctx in wanted:
            key = None if name in (None, "embedded") else name
            longest[key] = max(n_ctx, longest.get(key, 0))
        return [self.get(name, longest[None if name in (None, "embedded") else name]) for name, _ in wanted]

    def _endpoint(self, cfg: EndpointConfig, n_ctx: int) -> Any:
        from finemed_cli.synth.endpoint import CACHE_NAME, EndpointClient, EndpointModel, ResponseCache

        if cfg not in self.clients:
            self.clients[cfg] = EndpointClient(cfg, ResponseCache(Path(self.cache_dir or ".") / CACHE_NAME))
        return EndpointModel(self.clients[cfg], n_ctx)

    def close(self) -> None:
        for m in [*self._loaded.values(), *self.clients.values()]:
            m.close()
        self._loaded.clear()
        self.clients.clear()


def responder_prompt(cfg: SynthConfig) -> str | None:
    """The reasoner's system prompt: finemed's o1 instructions unless `system_prompt` says otherwise."""
    from finemed_cli.modeling.prompts import resolve_system_prompt
    from finemed_cli.synth.prompts import RESPOND_SYSTEM

    return RESPOND_SYSTEM if cfg.system_prompt is None else resolve_system_prompt(cfg.system_prompt)


def stage_function(name: str, cfg: SynthConfig, models: Models, records: list[dict[str, Any]]) -> Any:
    """The per-record function of stage `name` (filter sees all records first: it compares questions)."""
    from finemed_cli.synth import generate, judge
    from finemed_cli.synth.filter import FilterRules, filterer
    from finemed_cli.synth.respond import responder

    reasoner, reward = cfg.reasoner or cfg.judge, cfg.reward_model or cfg.judge
    complex_ctx = cfg.complex_max_tokens + PROMPT_ROOM
    if name in ("questions", "score", "classify"):
        warn_embedded_judge(cfg.judge)
        fn = {"questions": generate.questioner, "score": judge.scorer, "classify": judge.classifier}[name]
        return fn(models.get(cfg.judge), cfg.retries)
    if name == "filter":
        rules = FilterRules(cfg.complex_above, cfg.min_quality, cfg.min_relevance, not cfg.keep_case_specific,
                            cfg.seed)
        return filterer(records, rules)
    if name == "respond":
        common_ctx = cfg.common_max_tokens + PROMPT_ROOM
        instruct, think, rm = models.many([(cfg.judge, common_ctx), (reasoner, complex_ctx), (reward, common_ctx)])
        return responder(instruct, think, rm, common_max_tokens=cfg.common_max_tokens,
                         complex_max_tokens=cfg.complex_max_tokens, system=responder_prompt(cfg), retries=cfg.retries,
                         seed=cfg.seed)
    if name == "pairs":
        wanted = [(reasoner, complex_ctx), (cfg.base or cfg.judge, complex_ctx)]
        think, base, *rm = models.many(wanted + ([(reward, complex_ctx)] if cfg.reward_pairs else []))
        check = generate.rewarder(rm[0], cfg.reward_min_margin, cfg.retries) if rm else None
        return generate.pairer(think, base, cfg.pair_samples, cfg.complex_max_tokens, check,
                               system=responder_prompt(cfg))
    raise ValueError(f"unknown synth stage {name!r}")


@functools.cache  # once per process: `synth run` judges in three stages
def warn_embedded_judge(judge: str | EndpointConfig | None) -> None:
    """The embedded models judge the schema right and the content not at all: say so before they judge."""
    from finemed_cli.checkpoints.embedded import DEFAULT_MODEL_NAME, embedded_caution

    if isinstance(judge, EndpointConfig):
        return
    name = DEFAULT_MODEL_NAME if judge in (None, "embedded") else embedded_caution(Path(judge))
    if name:
        logger.warning("the judge is the embedded %s: its scores and departments carry no signal (bench/"
                       "judge_quality.py, README: nearly every question one department, complexity in 2-3 values, "
                       "AUC 0.43-0.70 on 30 questions); it checks the plumbing. "
                       "For real data pass a 7-8B instruct GGUF: --model JUDGE.gguf (judge: in a synth config)", name)


def run_named_stage(name: str, files: StageFiles, cfg: SynthConfig, models: Models, progress: bool = True,
                    limit: int | None = None, share: Ranks | None = None) -> StageSummary:
    """Stage `name` from `files.source` into `files.output` (and its rejects; respond also writes the common
    tier into `files.side`): outputs checked and locked, the input read, the models loaded (after that, not
    before), every record accounted for; resumable. `share`: only every n-th input record from this rank's
    (a rank's share under torchrun; not for filter, which compares all records)."""
    spec = BY_NAME[name]
    source, output, rejects = files.source, files.output, files.rejects
    side = (files.side or default_side(output)) if name == "respond" else None
    models_used = [m for m in (cfg.judge, cfg.reasoner, cfg.base, cfg.reward_model)
                   if isinstance(m, str) and m != "embedded"]
    with stage_outputs([source, *map(Path, models_used)], output, rejects, side) as rejects_path:
        records = read_input(source, limit)
        if share is not None:
            records = records[share.rank::share.world]
        models.cache_dir = models.cache_dir or output.parent  # endpoint replies are cached beside the outputs
        fn = stage_function(name, cfg, models, records)
        kwargs = {"done_key": spec.done_key} if spec.done_key else {}
        return run_stage(name, records, output, rejects_path, fn,
                         StageWalk(progress, side=side, workers=role_concurrency(*stage_roles(name, cfg)), **kwargs))


def stage_roles(name: str, cfg: SynthConfig) -> list[Any]:
    """The models stage `name` asks (as stage_function picks them)."""
    reasoner, reward = cfg.reasoner or cfg.judge, cfg.reward_model or cfg.judge
    return {"questions": [cfg.judge], "score": [cfg.judge], "classify": [cfg.judge], "filter": [],
            "respond": [cfg.judge, reasoner, reward],
            "pairs": [reasoner, cfg.base or cfg.judge, *([reward] if cfg.reward_pairs else [])]}[name]
