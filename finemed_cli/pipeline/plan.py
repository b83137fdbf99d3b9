"""The memory plan of a run that loads a model (answer, eval, serve): its workload from the run's settings,
then `models.memory.choose_plan`, before anything loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.checkpoints.memory import Need, Workload, choose_plan, gb, model_shape
from finemed_cli.config.answer import AnswerConfig, TTTConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLoad:
    """What a run loads and how it generates, as far as memory goes."""

    model: str | None  # as `load_model` names it
    device: str
    dtype: str
    quantize: str  # auto | none | nf4
    backend: str  # the generator asked for: auto | llama.cpp | transformers | none (scoring only)
    gguf_type: str  # auto or an outtype
    gguf_file: Path | None = None  # a GGUF given whole (`--gguf`, or a .gguf model)
    generate_tokens: int = 0  # prompt + new tokens per answer


def plan_run(run: RunLoad, ttt: TTTConfig, ttt_tokens: int | None = None, *, quiet: bool = False) -> Need:
    """The plan that fits for `run` with TTT `ttt` on `ttt_tokens` tokens per question (None: the most
    `ttt` allows, k × max_length); logged in one line unless `quiet`. Raises ConfigError when none fits."""
    import torch

    from finemed_cli.checkpoints.loading import pick_device, pick_dtype, resolve_model_source

    name, source, _ = resolve_model_source(run.model)
    dev = pick_device(run.device)
    shape = model_shape(source)
    layers = shape.layers if shape is not None else 1
    paper = ttt.mode == "paper"
    if ttt_tokens is None:
        ttt_tokens = ttt.k * ((ttt.pad_to or ttt.max_length) if paper else ttt.max_length)
    gguf_given = run.gguf_file is not None and run.gguf_file.is_file()
    llama = run.backend in ("auto", "llama.cpp") and not paper and _llama_cpp()
    work = Workload(device=dev, dtype_bytes=torch.finfo(pick_dtype(run.dtype, dev)).bits // 8, ttt_mode=ttt.mode,
                    ttt_tokens=ttt_tokens, ttt_layers=layers if paper else ttt.resolved_layers(layers),
                    loss_chunk=ttt.loss_chunk, gguf_on_device=dev == "cpu" or _offloads_all(),
                    gguf_bytes=run.gguf_file.stat().st_size if gguf_given else None,
                    generate_tokens=run.generate_tokens if run.backend != "none" else 0)
    gguf_type = ("given" if gguf_given else run.gguf_type) if llama else None
    if run.backend == "llama.cpp" and gguf_type == "auto":
        gguf_type = "q4_k_m" if run.quantize == "nf4" else "f16"  # llama.cpp asked for: never transformers
    need = choose_plan(shape, work, run.quantize, gguf_type, what=name, quiet=quiet)
    if not quiet:
            logger.info("memory plan: %s, about %s on %s (%s)", need.plan.describe(), gb(need.total), dev,
                    ", ".join(f"{k} {gb(v)}" for k, v in need.parts.items() if v >= 0.05 * 1024**3))
    return need


def _llama_cpp() -> bool:
    from finemed_cli.backends import llama_cpp_available

    return llama_cpp_available()


def _offloads_all() -> bool:
    from finemed_cli.backends import default_gpu_layers

    return _llama_cpp() and default_gpu_layers() == -1


def planned_answer(config: AnswerConfig, neighbours_of: list[list[Any]] | None) -> AnswerConfig:
    """`config` with `quantize`, the GGUF type and the generator the memory plan chose (`pipeline.plan`): the
    TTT workload is the longest question's neighbours as TTT will read them, counted by the tokenizer
    (`neighbours_of` None: no TTT tokens, the least the run can need; checked quietly)."""
    import dataclasses

    from finemed_cli.checkpoints.loading import load_tokenizer
    from finemed_cli.modeling.examples import lora_examples

    gen, ttt = config.generation, config.ttt
    tokens = 0 if neighbours_of is None else None
    if ttt.mode == "lora" and neighbours_of and any(neighbours_of):
        tokenizer = load_tokenizer(config.model)
        length: dict[str, int] = {}  # each distinct neighbour tokenized once
        for n in (n for nbrs in neighbours_of for n in nbrs if n.record.id not in length):
            length[n.record.id] = sum(e.input_ids.shape[1] for e in lora_examples(
                tokenizer, [n.record], ttt.max_length, loss_on=ttt.loss_on))
        per_question = sorted(sum(length[n.record.id] for n in nbrs) for nbrs in neighbours_of)
        tokens = sum(per_question[-config.batch_size:])  # a batch trains its questions' tokens in one pass
    gguf_file = gen.gguf or (Path(config.model) if (config.model or "").endswith(".gguf") else None)
    need = plan_run(RunLoad(config.model, config.device, config.dtype, config.quantize, gen.backend,
                            gen.gguf_type, gguf_file, gen.max_new_tokens + 1024), ttt, tokens,
                    quiet=neighbours_of is None)
    plan = need.plan
    backend = "transformers" if plan.gguf_type is None and gen.backend == "auto" else gen.backend
    gguf_type = plan.gguf_type if plan.gguf_type not in (None, "given") else gen.gguf_type
    if gguf_type == "auto":
        gguf_type = "q4_k_m" if plan.quantize == "nf4" else "f16"
    return dataclasses.replace(config, quantize=plan.quantize,
                               generation=dataclasses.replace(gen, backend=backend, gguf_type=gguf_type))
