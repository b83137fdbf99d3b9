"""Configuration of the FineMed data pipeline (`finemed synth run CONFIG`, and each `finemed synth STAGE`, whose
options are derived from these fields): every default and help text once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finemed_cli.config.loader import build_dataclass, read_yaml
from finemed_cli.errors import ConfigError


@dataclass
class SynthConfig:
    """The pipeline's inputs, models and rules. Paths in a config file are relative to the file."""

    raw: str = field(default="", metadata={"help": "raw texts to make questions from, {\"id\", \"text\"} per line"})
    out_dir: str = field(default="synth", metadata={
        "help": "the work folder: questions, scored, classified, filtered, corpus and pairs JSONL, with rejects"})
    judge: str | None = field(default=None, metadata={
        "help": "GGUF file of the question writer and judge [default: the embedded SmolLM2-135M-Instruct]"})
    reasoner: str | None = field(default=None, metadata={
        "help": "GGUF writing the o1-style responses (## Thought, ## Summarization) [default: the judge]"})
    base: str | None = field(default=None, metadata={
        "help": "GGUF for the cold-start (rejected) replies of DPO pairs [default: the judge]"})
    complex_above: int = field(default=8, metadata={
        "help": "complexity above this is the 'complex' tier (answered in o1 style by the reasoner)"})
    min_quality: int = field(default=1, metadata={"help": "questions below this quality are rejected"})
    min_relevance: int = field(default=1, metadata={"help": "questions below this relevance are rejected"})
    keep_case_specific: bool = field(default=False, metadata={"help": "do not reject case-specific questions"})
    limit: int | None = field(default=None, metadata={"help": "only the first N input records"})
    retries: int = field(default=3, metadata={"help": "tries per record before it is rejected"})
    respond_max_tokens: int = field(default=1024, metadata={"help": "response token budget"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "the responder's system prompt (respond and pairs stages): TEXT, @FILE, none or model, e.g. the "
                "prompt a reasoner model was trained with [default: finemed's instructions for o1-style answers]"})
    pair_samples: int = field(default=4, metadata={"help": "responses sampled per question with a gold letter"})
    reward_model: str | None = field(default=None, metadata={
        "help": "GGUF that scores both sides of each pair 1-10 ('embedded': the embedded model); pairs whose "
                "chosen side does not win by the margin are rejected [default: no reward scoring]"})
    reward_min_margin: int = field(default=1, metadata={
        "help": "with a reward model: how much higher chosen must score than rejected"})

    def validate(self, pipeline: bool = True) -> list[str]:
        """Every problem, one per item (`pipeline`: the keys a whole run needs are required)."""
        checks = [
            (0 <= self.reward_min_margin <= 9, f"reward_min_margin: scores are 1-10, give 0 to 9, got {self.reward_min_margin}"),
            (not pipeline or bool(self.raw), "raw: required, the JSONL of raw texts ({\"id\", \"text\"} per line)"),
            (not pipeline or bool(self.out_dir), "out_dir: required, the work folder"),
            (1 <= self.complex_above <= 10, f"complex_above: a score from 1 to 10, got {self.complex_above}"),
            (1 <= self.min_quality <= 10, f"min_quality: a score from 1 to 10, got {self.min_quality}"),
            (1 <= self.min_relevance <= 10, f"min_relevance: a score from 1 to 10, got {self.min_relevance}"),
            (self.limit is None or self.limit >= 1, f"limit: at least 1, got {self.limit}"),
            (self.retries >= 1, f"retries: at least 1, got {self.retries}"),
            (self.respond_max_tokens >= 16, f"respond_max_tokens: at least 16, got {self.respond_max_tokens}"),
            (self.pair_samples >= 2, f"pair_samples: at least 2, got {self.pair_samples}"),
        ]
        return [message for ok, message in checks if not ok]


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
        if not p or p == "embedded":
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else path.parent / q)

    for key in ("raw", "out_dir", "judge", "reasoner", "base", "reward_model"):
        setattr(cfg, key, at(getattr(cfg, key)))
    return cfg
