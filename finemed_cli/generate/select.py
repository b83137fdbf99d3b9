"""Which generator `finemed answer` uses, and the GGUF llama.cpp needs for it.

`auto` measures both generators once per machine and model (32 greedy tokens each after a warm-up) and
remembers the faster in `$FINEMED_HOME/generators.json`: llama.cpp is several times faster on CPUs, while
transformers on a GPU is faster than a CPU-only llama.cpp build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from finemed_cli.backends import llama_cpp_available
from finemed_cli.config.answer import GenerationConfig
from finemed_cli.errors import ConfigError, ExportError
from finemed_cli.paths import finemed_home

logger = logging.getLogger(__name__)

_PROBE = [{"role": "user", "content": "Name the hormone made by the thyroid gland and say what it does."}]


def model_gguf(source: str, name: str, outtype: str = "f16") -> Path:
    """The GGUF of an HF model directory, exported once into `$FINEMED_HOME/gguf/` and reused while the
    directory's config and weights are unchanged (keyed by their sizes and modification times)."""
    from finemed_cli.export.gguf import export_gguf

    src = Path(source)  # always a local directory: checkpoints/loading.py resolved any hub id
    stamp = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.suffix in (".json", ".safetensors", ".jinja", ".model"):
            st = f.stat()
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    target = finemed_home() / "gguf" / f"{name}-{stamp.hexdigest()[:12]}-{outtype}.gguf"
    if not target.is_file():
        logger.info("exporting %s to %s for llama.cpp (once)", src, target)
        export_gguf(src, target, outtype, name=name)
    return target


def _machine_key(name: str, device: str) -> str:
    return f"{name}|{device}|{platform.machine()}|{os.cpu_count()}"


def _time_generator(generator: Any, tokens: int = 32) -> float:
    generator.generate(_PROBE, max_new_tokens=4)  # warm-up: threads, caches
    start = time.perf_counter()
    result = generator.generate(_PROBE, max_new_tokens=tokens)
    return max(result.tokens, 1) / (time.perf_counter() - start)


def choose_backend(loaded: Any, device: str, make_llama: Any) -> str:
    """`auto`: the faster generator for this model on this machine, measured once and remembered."""
    from finemed_cli.generate.hf import TransformersGenerator

    if not llama_cpp_available():
        logger.info("generator auto: transformers (llama-cpp-python is not installed)")
        return "transformers"
    cache = finemed_home() / "generators.json"
    key = _machine_key(loaded.name, device)
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key]["backend"]
    hf_rate = _time_generator(TransformersGenerator(loaded.model, loaded.tokenizer))
    llama = make_llama()
    llama_rate = _time_generator(llama)
    choice = "llama.cpp" if llama_rate > hf_rate else "transformers"
    logger.info("generator auto: %s (llama.cpp %.1f tokens/s, transformers %.1f tokens/s)", choice,
                llama_rate, hf_rate)
    known[key] = {"backend": choice, "llama.cpp_tokens_per_s": round(llama_rate, 2),
                  "transformers_tokens_per_s": round(hf_rate, 2), "measured": time.strftime("%Y-%m-%d")}
    from finemed_cli.data.output import atomic_write, ensure_parent

    ensure_parent(cache)
    atomic_write(cache, json.dumps(known, indent=1).encode())
    return choice


def make_generator(gen: GenerationConfig, loaded: Any, model_arg: str | None, device: str,
                   ttt_mode: str = "lora") -> Any:
    """The generator a run asked for (resolving `auto`)."""
    from finemed_cli.generate.hf import TransformersGenerator

    backend = gen.backend
    exportable = gen.gguf is not None or (model_arg or "").endswith(".gguf") or \
        (Path(loaded.source) / "config.json").is_file()
    if backend == "auto" and (ttt_mode == "paper" or not exportable):
        backend = "transformers"  # llama.cpp takes LoRA adapters only, and needs a GGUF of the model
    if backend == "llama.cpp" and ttt_mode == "paper":
        raise ConfigError("--ttt-mode paper changes every weight of the model, which llama.cpp cannot take per "
                          "question (only LoRA adapters); use --generator transformers")
    if backend == "transformers":
        return TransformersGenerator(loaded.model, loaded.tokenizer)
    if backend == "llama.cpp" and not llama_cpp_available():
        raise ConfigError("--generator llama.cpp needs llama-cpp-python: pip install llama-cpp-python, or use "
                          "--generator transformers")

    def make_llama() -> Any:
        from finemed_cli.export.gguf import read_config
        from finemed_cli.generate.llamacpp import LlamaCppGenerator, context_size

        if gen.gguf is not None:
            path = Path(gen.gguf)
        elif model_arg is not None and model_arg.endswith(".gguf"):
            path = Path(model_arg)
        else:
            # auto: what the memory plan chose (pipeline/answer.py); unplanned callers (a model given loaded) f16
            path = model_gguf(loaded.source, loaded.name, "f16" if gen.gguf_type == "auto" else gen.gguf_type)
        config = read_config(Path(loaded.source)) if (Path(loaded.source) / "config.json").is_file() else \
            loaded.model.config.to_dict()
        # a context asked for (-c) is checked against the model's trained one; none asked keeps the default
        context = {} if gen.n_ctx is None else {"n_ctx": context_size(path, gen.n_ctx)}
        return LlamaCppGenerator(path, loaded.tokenizer, config, n_gpu_layers=gen.n_gpu_layers, **context)

    if backend == "auto":
        made: list[Any] = []

        def make_once() -> Any:
            made.append(make_llama())
            return made[-1]

        try:
            backend = choose_backend(loaded, device, make_once)
            if backend == "llama.cpp":
                return made[0] if made else make_llama()
        except ExportError as e:  # an architecture llama.cpp cannot run: transformers can
            logger.warning("generator auto: transformers, as llama.cpp cannot take this model (%s)", e)
        for g in made:
            g.close()
        return TransformersGenerator(loaded.model, loaded.tokenizer)
    return make_llama()
