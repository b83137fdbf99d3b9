"""`ggml_session`: the ggml engine behind the same context manager shape as `ttt.update.ttt_session`, its
adapter a LoRA GGUF path that `generate.llamacpp.LlamaCpp.adapter_applied` takes as it is."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.examples import lora_examples
from finemed_cli.modeling.prompts import SYSTEM_PROMPT
from finemed_cli.ttt.ggml.engine import GgmlTTT, write_lora_gguf
from finemed_cli.ttt.ggml.model import open_gguf
from finemed_cli.ttt.update import TTTResult


class GgmlEngine:
    """One GGUF opened for ggml TTT for a whole run (`with GgmlEngine(path, config) as engine`)."""

    def __init__(self, gguf: str | Path, config: TTTConfig, n_threads: int | None = None) -> None:
        self.weights = open_gguf(gguf)
        self.engine = GgmlTTT(self.weights, config, n_threads)
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="finemed-ggml-lora-")

    def __enter__(self) -> GgmlEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.close()
        self.weights.close()
        self._tmp.cleanup()

    @contextlib.contextmanager
    def session(self, tokenizer: Any, neighbours: list[CorpusRecord], seed: int = 0, *,
                system: str | None = SYSTEM_PROMPT) -> Iterator[TTTResult]:
        """Train a fresh adapter on the neighbours; the result's `adapter` is its LoRA GGUF (removed on exit).
        TTT off or no neighbours: no adapter, as `ttt_session`."""
        if self.config.mode == "off" or not neighbours:
            yield TTTResult("off", 0, None, None, 0.0, 0)
            return
        start = time.perf_counter()
        examples = [(e.input_ids[0].tolist(), e.labels[0].tolist()) for e in
                    lora_examples(tokenizer, neighbours, self.config.max_length, system, self.config.loss_on)]
        res = self.engine.train(examples, seed)
        path = None
        if res.adapter:
            path = write_lora_gguf(res, Path(self._tmp.name) / "adapter.gguf")
        try:
            yield TTTResult("lora", res.steps, res.loss_before, res.loss_after, time.perf_counter() - start,
                            res.tokens, path)  # type: ignore[arg-type]  # a .gguf path: LlamaCpp applies it
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
