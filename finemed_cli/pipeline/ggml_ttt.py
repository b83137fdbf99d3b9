"""`answer --ttt-engine ggml`: the question's LoRA trained by ggml on the GGUF that llama.cpp generates from
(`ttt/ggml/`), so no torch copy of the model is loaded. A prototype behind the flag: it holds 0.23-0.38x of
the torch engine's peak memory but takes 1.66x (Q8_0) to 2.88x (Q4_K_M) its time per question on a Llama-3.2-1B
shape (bench/ttt_engine.py, 2-core CPU), past the 1.5x the issue allowed for making it a default."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from finemed_cli.config.answer import AnswerConfig
from finemed_cli.errors import ConfigError


def ggml_config(config: AnswerConfig) -> AnswerConfig:
    """`config` for the ggml engine: llama.cpp generates (the adapter is a LoRA GGUF), one question at a time.

    Raises:
        ConfigError: a transformers generator, batched TTT or a 4-bit torch base was asked for.
    """
    gen = config.generation
    if gen.backend == "transformers":
        raise ConfigError("--ttt-engine ggml trains the adapter on the GGUF that llama.cpp generates from: use "
                          "--generator llama.cpp (or auto)")
    if config.batch_size > 1:
        raise ConfigError("--ttt-engine ggml trains one question at a time: drop --batch-size")
    if config.quantize == "nf4":
        raise ConfigError("--ttt-engine ggml loads no torch model; --quantize nf4 quantizes one: pick the GGUF's "
                          "type with --outtype instead")
    gguf_type = "q8_0" if gen.gguf_type == "auto" else gen.gguf_type
    return dataclasses.replace(config, quantize="none",
                               generation=dataclasses.replace(gen, backend="llama.cpp", gguf_type=gguf_type))


def tokenizer_only(model: str | None) -> Any:
    """A `LoadedModel` without weights: the tokenizer (prompts and TTT examples), the name and the source."""
    from finemed_cli.checkpoints.loading import LoadedModel, load_tokenizer, resolve_model_source

    name, source, _ = resolve_model_source(model)
    return LoadedModel(None, load_tokenizer(model), name, source)


@contextlib.contextmanager
def ggml_engine(config: AnswerConfig, generator: Any) -> Iterator[Any]:
    """The ggml engine on the generator's GGUF for the run (None: the torch engine trains)."""
    if config.ttt.engine != "ggml" or config.ttt.mode == "off":
        yield None
        return
    from finemed_cli.ttt.ggml.session import GgmlEngine

    with GgmlEngine(generator.gguf_path, config.ttt) as engine:
        yield engine
