"""`finemed synth run PIPELINE.yaml`: every stage in order, each resumable, in one work folder:

    questions.jsonl  scored.jsonl  classified.jsonl  filtered.jsonl  corpus.jsonl  pairs.jsonl
    (each with its .rejects.jsonl) and summary.json (per stage: in, written, rejected, items/s)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from finemed_cli.errors import ConfigError


@dataclass
class SynthPipeline:
    raw: str = ""  # raw texts: {"id", "text"} per line (relative to the config file)
    out_dir: str = "synth"
    judge: str | None = None  # GGUF of the question writer and judge; null: the embedded model
    reasoner: str | None = None  # GGUF writing the o1-style responses; null: the judge
    base: str | None = None  # GGUF of the cold-start (rejected) replies; null: the judge
    complex_above: int = 8
    min_quality: int = 1
    min_relevance: int = 1
    keep_case_specific: bool = False
    limit: int | None = None
    retries: int = 3
    respond_max_tokens: int = 1024
    pair_samples: int = 4
    reward_model: str | None = None  # GGUF scoring both sides of each pair ("embedded"); null: no reward check
    reward_min_margin: int = 1


def load_pipeline(path: Path) -> tuple[SynthPipeline, Path]:
    body = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SynthPipeline)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = SynthPipeline(**body)
    if not 0 <= cfg.reward_min_margin <= 9:
        raise ConfigError(f"{path}: reward_min_margin is {cfg.reward_min_margin}; scores are 1-10, give 0 to 9")
    if not cfg.raw:
        raise ConfigError(f"{path}: 'raw' (the JSONL of raw texts) is required")
    return cfg, path.parent


def run_pipeline(config: Path, progress: bool = True, echo: Any = print) -> Path:
    from finemed_cli.synth import generate, judge
    from finemed_cli.synth.filter import FilterRules, filterer
    from finemed_cli.synth.llm import LlamaCppModel
    from finemed_cli.synth.stage import read_input, run_stage

    cfg, base_dir = load_pipeline(config)

    def at(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    out = at(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str | None, Any] = {}

    def model(name: str | None) -> Any:
        key = str(at(name)) if name and name != "embedded" else None
        if key not in models:
            models[key] = LlamaCppModel(key)
        return models[key]

    summaries = []
    try:
        def stage(name: str, src: Path, dst: str, fn_of: Any, **kw: Any) -> Path:
            records = read_input(src, cfg.limit if name == "questions" else None)
            target = out / dst
            s = run_stage(name, records, target, None, fn_of(records), progress, **kw)
            summaries.append(dataclasses.asdict(s) | {"items_per_s": round(s.per_second, 3)})
            echo(s.line())
            return target

        questions = stage("questions", at(cfg.raw), "questions.jsonl",
                          lambda _: generate.questioner(model(cfg.judge), cfg.retries),
                          done_key=lambda r: f"{r['id']}-q1")
        scored = stage("score", questions, "scored.jsonl", lambda _: judge.scorer(model(cfg.judge), cfg.retries))
        classified = stage("classify", scored, "classified.jsonl",
                           lambda _: judge.classifier(model(cfg.judge), cfg.retries))
        rules = FilterRules(cfg.complex_above, cfg.min_quality, cfg.min_relevance, not cfg.keep_case_specific)
        filtered = stage("filter", classified, "filtered.jsonl", lambda recs: filterer(recs, rules))
        corpus = stage("respond", filtered, "corpus.jsonl",
                       lambda _: generate.responder(model(cfg.reasoner or cfg.judge), max_tokens=cfg.respond_max_tokens))
        stage("pairs", corpus, "pairs.jsonl",
              lambda _: generate.pairer(model(cfg.reasoner or cfg.judge), model(cfg.base or cfg.judge),
                                        cfg.pair_samples, cfg.respond_max_tokens,
                                        generate.rewarder(model(cfg.reward_model), cfg.reward_min_margin,
                                                          cfg.retries) if cfg.reward_model else None))
    finally:
        for m in models.values():
            m.close()
        (out / "summary.json").write_bytes(orjson.dumps(summaries, option=orjson.OPT_INDENT_2))
    return out
