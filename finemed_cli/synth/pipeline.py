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

from finemed_cli.config.loader import build_dataclass, read_yaml
from finemed_cli.data.output import OutputLock, check_output, ensure_dir
from finemed_cli.errors import ConfigError
from finemed_cli.synth.stage import default_rejects


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
    """Read and check a pipeline config; every problem is reported at once with its key."""
    body = read_yaml(path)
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (raw:, out_dir:, judge:, …), got "
                          f"{type(body).__name__}")
    errors: list[str] = []
    cfg = build_dataclass(SynthPipeline, body, "", errors)
    checks = [
        (0 <= cfg.reward_min_margin <= 9, f"reward_min_margin: scores are 1-10, give 0 to 9, got {cfg.reward_min_margin}"),
        (bool(cfg.raw) or any(e.startswith("raw:") for e in errors),
         "raw: required, the JSONL of raw texts ({\"id\", \"text\"} per line)"),
        (bool(cfg.out_dir), "out_dir: required, the work folder"),
        (1 <= cfg.complex_above <= 10, f"complex_above: a score from 1 to 10, got {cfg.complex_above}"),
        (1 <= cfg.min_quality <= 10, f"min_quality: a score from 1 to 10, got {cfg.min_quality}"),
        (1 <= cfg.min_relevance <= 10, f"min_relevance: a score from 1 to 10, got {cfg.min_relevance}"),
        (cfg.limit is None or cfg.limit >= 1, f"limit: at least 1, got {cfg.limit}"),
        (cfg.retries >= 1, f"retries: at least 1, got {cfg.retries}"),
        (cfg.respond_max_tokens >= 16, f"respond_max_tokens: at least 16, got {cfg.respond_max_tokens}"),
        (cfg.pair_samples >= 2, f"pair_samples: at least 2, got {cfg.pair_samples}"),
    ]
    errors += [message for ok, message in checks if not ok]
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return cfg, path.parent


def run_pipeline(config: Path, progress: bool = True, echo: Any = print) -> Path:
    cfg, base_dir = load_pipeline(config)

    def at(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    out = at(cfg.out_dir)
    raw = at(cfg.raw)
    check_output(out, inputs=[raw, config], kind="dir", what="out_dir")
    with OutputLock(out):
        return _run(cfg, out, raw, at, progress, echo)


def _run(cfg: SynthPipeline, out: Path, raw: Path, at: Any, progress: bool, echo: Any) -> Path:
    from finemed_cli.synth import generate, judge
    from finemed_cli.synth.filter import FilterRules, filterer
    from finemed_cli.synth.llm import LlamaCppModel
    from finemed_cli.synth.stage import read_input, run_stage

    read_input(raw)  # a bad raw file stops the run before any model loads or anything is written
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
            for path in (target, default_rejects(target)):
                check_output(path, inputs=[src])
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
        if summaries:
            ensure_dir(out)
            (out / "summary.json").write_bytes(orjson.dumps(summaries, option=orjson.OPT_INDENT_2))
    return out
