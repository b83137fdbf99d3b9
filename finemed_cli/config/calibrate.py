"""Configuration of `finemed ttt-calibrate` (pipeline/calibrate.py): the dev data, the candidates tried and the
time budget (the CLI's options are derived from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# From the default up: more steps, a higher rate, more layers, more neighbours, a larger adapter, the Thought
# only; a budget cuts the list from its end, so the cheap and likely settings run first.
DEFAULT_CANDIDATES = ("ttt", "ttt(steps=4)", "ttt(lr=1e-2)", "ttt(steps=4,lr=1e-2)", "ttt(layers=all)",
                      "ttt(steps=4,layers=all)", "ttt(k=3)", "ttt(steps=4,loss_on=reasoning)",
                      "ttt(steps=4,lr=1e-2,rank=16,alpha=32)", "ttt(steps=8,lr=1e-2,layers=all)")


@dataclass
class CalibrateConfig:
    inputs: list[Path]
    out: Path
    index: Path
    model: str | None = None
    mode: str = field(default="auto", metadata={
        "help": "perplexity (dev corpus records: bits per token of their reasoning), loglik (benchmark "
                "questions: accuracy) or auto (perplexity when the file has reasoning)"})
    candidates: str | None = field(default=None, metadata={
        "help": "comma-separated TTT variants to try, e.g. 'ttt(steps=4),ttt(lr=1e-2,layers=all)' "
                f"[default: {len(DEFAULT_CANDIDATES)} settings from the default up]"})
    limit: int | None = field(default=None, metadata={"help": "at most this many dev items per file"})
    max_minutes: float = field(default=60.0, metadata={
        "help": "time budget: no candidate is started that would end past it (by the last one's time)"})
    seed: int = field(default=0, metadata={"help": "seeds TTT and the bootstrap"})
    oracle: bool = field(default=True, metadata={
        "help": "also run each candidate on every item's own gold answer (oracle-ttt): how much it can transfer, "
                "beside how much it does with real neighbours (doubles the time)"})
    device: str = "auto"
    dtype: str = "auto"
    system_prompt: str | None = None
    progress: bool = True
