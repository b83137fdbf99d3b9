"""Configuration of the FineMed data pipeline (`finemed synth run CONFIG`, and each `finemed synth STAGE`, whose
options are derived from these fields): every default and help text once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finemed_cli.config.endpoint import EndpointConfig, endpoint_problems
from finemed_cli.config.loader import build_dataclass, read_yaml
from finemed_cli.errors import ConfigError


@dataclass
class SynthConfig:
    """The pipeline's inputs, models and rules. Paths in a config file are relative to the file."""

    raw: str = field(default="", metadata={
        "help": "raw texts to make questions from, {\"id\", \"text\"} per line (a line with its own \"question\", "
                "\"options\" and \"answer\" is taken as it is)"})
    out_dir: str = field(default="synth", metadata={
        "help": "the work folder: questions, scored, filtered, classified, corpus (+ corpus.common) and pairs "
                "JSONL, with rejects"})
    judge: str | EndpointConfig | None = field(default=None, metadata={
        "help": "GGUF of the instruction model: it writes the questions, scores and classifies them and answers "
                "the common tier [default: the embedded SmolLM2-135M-Instruct]. In a config file, this and every "
                "other model role may instead be a server: {url: http://host:8000/v1, model: NAME} "
                "(config/endpoint.py)"})
    reasoner: str | EndpointConfig | None = field(default=None, metadata={
        "help": "GGUF of the reasoning model answering the complex tier at length in o1 style (## Thought, "
                "## Summarization) [default: the instruction model, judge]"})
    reward_model: str | EndpointConfig | None = field(default=None, metadata={
        "help": "GGUF that scores the common tier's two candidate answers 1-10 to keep the better ('embedded': "
                "the embedded model) [default: the instruction model, judge]"})
    base: str | EndpointConfig | None = field(default=None, metadata={
        "help": "GGUF for the cold-start (rejected) replies of DPO pairs [default: the instruction model, judge]"})
    complex_above: int = field(default=8, metadata={
        "help": "complexity above this is the 'complex' tier (the reasoner), the rest 'common' (the judge)"})
    min_quality: int = field(default=1, metadata={"help": "questions below this quality (1-10) are rejected"})
    min_relevance: int = field(default=1, metadata={"help": "questions below this relevance (1-6) are rejected"})
    keep_case_specific: bool = field(default=False, metadata={"help": "do not reject case-specific questions"})
    seed: int = field(default=0, metadata={
        "help": "seed of the draws that break ties (equal question scores in filter, equal rewards in respond)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N input records"})
    retries: int = field(default=3, metadata={"help": "tries per record before it is rejected"})
    common_max_tokens: int = field(default=2048, metadata={
        "help": "token budget of each of the common tier's two candidate answers (the reference: 4,096 for both)"})
    complex_max_tokens: int = field(default=4096, metadata={
        "help": "token budget of a complex-tier o1 response (the reference's)"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "the reasoner's system prompt (complex tier and pairs): TEXT, @FILE, none or model, e.g. the "
                "prompt a reasoner model was trained with [default: finemed's instructions for o1-style answers]"})
    pair_samples: int = field(default=4, metadata={"help": "responses sampled per question with a gold letter"})
    reward_pairs: bool = field(default=False, metadata={
        "help": "also score both sides of each DPO pair with the reward model and reject pairs whose chosen side "
                "does not win by reward_min_margin (finemed's check; the reference has none)"})
    reward_min_margin: int = field(default=1, metadata={
        "help": "with reward_pairs: how much higher chosen must score than rejected"})

    def validate(self, pipeline: bool = True) -> list[str]:
        """Every problem, one per item (`pipeline`: the keys a whole run needs are required)."""
        checks = [
            (0 <= self.reward_min_margin <= 9, f"reward_min_margin: scores are 1-10, give 0 to 9, got {self.reward_min_margin}"),
            (not pipeline or bool(self.raw), "raw: required, the JSONL of raw texts ({\"id\", \"text\"} per line)"),
            (not pipeline or bool(self.out_dir), "out_dir: required, the work folder"),
            (1 <= self.complex_above <= 10, f"complex_above: a score from 1 to 10, got {self.complex_above}"),
            (1 <= self.min_quality <= 10, f"min_quality: a score from 1 to 10, got {self.min_quality}"),
            (1 <= self.min_relevance <= 6, f"min_relevance: relevance is scored 1 to 6, got {self.min_relevance}"),
            (self.limit is None or self.limit >= 1, f"limit: at least 1, got {self.limit}"),
            (self.retries >= 1, f"retries: at least 1, got {self.retries}"),
            (self.common_max_tokens >= 16, f"common_max_tokens: at least 16, got {self.common_max_tokens}"),
            (self.complex_max_tokens >= 16, f"complex_max_tokens: at least 16, got {self.complex_max_tokens}"),
            (self.pair_samples >= 2, f"pair_samples: at least 2, got {self.pair_samples}"),
        ]
        return [message for ok, message in checks if not ok] + endpoint_problems(self)


def load_synth_config(path: Path) -> SynthConfig:
    """Read and check a pipeline config; every problem is reported at once with its key. Paths in it are made
    relative to the file's folder."""
    body = read_yaml(path)
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (raw:, out_dir:, judge:, …), got "
                          f"{type(body).__name__}")
    errors: list[str] = []
    cfg = build_dataclass(SynthConfig, body, "", errors)
    errors += [e for e in cfg.validate() if not any(e.split(":")[0] == x.split(":")[0] for x in errors)]
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))

    def at(p: str | None) -> str | None:
        if not isinstance(p, str) or not p or p == "embedded":  # an endpoint ({url, model}) is no path
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else path.parent / q)

    for key in ("raw", "out_dir", "judge", "reasoner", "base", "reward_model"):
        setattr(cfg, key, at(getattr(cfg, key)))
    return cfg
