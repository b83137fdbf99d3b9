"""Log lines with plain prefixes, and the embedded synth judge's warning."""

from __future__ import annotations

import logging

from finemed_cli.console import PlainFormatter
from finemed_cli.synth.stages import warn_embedded_judge


def _line(level: int, name: str = "finemed_cli.pipeline.answer") -> str:
    return PlainFormatter().format(logging.LogRecord(name, level, __file__, 1, "it %s", ("ran",), None))


def test_plain_prefixes() -> None:
    assert _line(logging.INFO) == "it ran"
    assert _line(logging.WARNING) == "warning: it ran"
    assert _line(logging.ERROR) == "error: it ran"
    assert _line(logging.DEBUG) == "debug finemed_cli.pipeline.answer: it ran"


def test_the_embedded_judge_is_called_out(caplog, tmp_path) -> None:
    warn_embedded_judge.cache_clear()
    with caplog.at_level(logging.WARNING):
        warn_embedded_judge(None)
        warn_embedded_judge(None)  # once per process
        warn_embedded_judge(str(tmp_path / "Qwen2.5-7B-Instruct-Q4_K_M.gguf"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "carry no signal" in warnings[0] and "SmolLM2" in warnings[0]
