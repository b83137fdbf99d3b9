"""What an answer file's records depend on, so that a rerun resumes only answers made the same way.

Every answer record carries `settings`: the model, the TTT settings, the generation settings, the system prompt
(by hash) and the seed where something is random. A rerun with other settings into the same file is refused,
naming what differs, as `finemed eval` refuses results made with other settings: one file holding answers with
TTT and without it (or two system prompts, two seeds) would be reported as one run.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import AnswerConfig
from finemed_cli.config.loader import settings_diff
from finemed_cli.data.jsonl import iter_jsonl
from finemed_cli.errors import ConfigError

logger = logging.getLogger(__name__)


def answer_settings(config: AnswerConfig) -> dict[str, Any]:
    """The settings an answer depends on (not the batch size, the shard, the limit or the device)."""
    ttt, gen = config.ttt, config.generation
    settings: dict[str, Any] = {
        "model": config.model or "embedded",
        "ttt": "off" if ttt.mode == "off" else {
            "mode": ttt.mode, "k": ttt.k, "steps": ttt.resolved_steps(), "lr": ttt.resolved_lr(), "rank": ttt.rank,
            "layers": ttt.layers, "alpha": ttt.alpha, "targets": list(ttt.targets), "max_length": ttt.max_length,
            "pick": ttt.pick, "loss_on": ttt.loss_on, **({"min_sim": ttt.min_sim} if ttt.min_sim is not None else {}),
            **({"engine": ttt.engine} if ttt.engine != "torch" else {})},
        "index": str(Path(config.index).resolve()) if config.index else None,
        "icl": config.icl,
        "generation": {"backend": gen.backend, "max_new_tokens": gen.max_new_tokens,
                       "temperature": gen.temperature, "top_p": gen.top_p if gen.temperature > 0 else None,
                       "thought_tokens": gen.thought_tokens},
        "system_prompt": None if config.system_prompt is None else
        "sha256:" + hashlib.sha256(config.system_prompt.encode()).hexdigest()[:16],
        "dtype": config.dtype, "quantize": config.quantize,
    }
    if ttt.mode != "off" or gen.temperature > 0:  # the seed changes nothing in greedy answers without TTT
        settings["seed"] = config.seed
    return settings


def check_resume(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to append to `path` when its answers were made with other settings (records written before
    answers carried settings are resumed as they are, with a warning)."""
    if not path.is_file():
        return
    legacy = 0
    for line, rec in iter_jsonl(path, errors=[]):  # a torn last line is the appender's to cut, not an error
        old = rec.get("settings") if isinstance(rec, dict) else None
        if not isinstance(old, dict):
            legacy += 1
            continue
        if (diff := settings_diff(old, settings)) is not None:
            was, now = diff
            raise ConfigError(f"{path}:{line}: holds answers made with {was}; this run has {now}. Write to "
                              f"another -o, rerun with the same settings, or delete {path} to start over")
    if legacy:
        logger.warning("%s: %d answers from a finemed that did not record its settings; resuming them as they are",
                       path, legacy)
