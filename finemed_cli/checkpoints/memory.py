"""Memory planned, not discovered: the peak a run will need, estimated from the model's tensor shapes before
anything loads, held against what the device has; a plan that does not fit is refused in one line naming the
option that makes it fit, or, under `--quantize auto`, the smaller plan is taken with a notice.

The coefficients are measured (`python bench/scale.py`, random-weight models of SmolLM2-135M, Llama-3.2-1B and
-3B shapes on the 2-core CI machine): the estimate is printed beside the measured peak there.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finemed_cli.checkpoints.files import open_safetensors
from finemed_cli.checkpoints.quantized import NF4_BYTES_PER_WEIGHT
from finemed_cli.errors import ConfigError

logger = logging.getLogger(__name__)

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Mean bytes per parameter of a whole GGUF (embeddings and output included) by outtype, from the files of the
# Llama-3.2-1B/3B shapes (bench/scale.py) and llama.cpp's published mixes; K-quants keep some tensors at 6 bits.
GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q6_k": 0.8203, "q5_k_m": 0.72,
              "q4_k_m": 0.65, "q4_0": 0.5625}  # q4_k_m: 803 MB for the 1B shape, 2,015 MB for the 3B
# What a process holds besides weights: Python, torch, transformers, tokenizers, the embedder (CPU: 0.73 GB of
# RSS measured when the model starts to load, plus glibc's slack); on a GPU the CUDA contexts of torch and
# llama.cpp.
RUNTIME_BYTES = {"cpu": 0.85 * GiB, "cuda": 0.9 * GiB}
# llama.cpp's compute and output buffers for a 512-token batch, about two vocabulary-wide fp32 rows per token
# (measured: loading the 3B shape's Q4_K_M GGUF added 3.0 GB of RSS for a 2.0 GB file and a 0.47 GB cache)
LLAMA_BATCH = 512
# An NF4 base streamed from its checkpoint keeps this much per quantized weight more than its packed size
# (measured after loading: 4.1 GB against 3.5 GB of runtime and weights at the 3B shape; the allocator's
# retention of the per-tensor read buffers)
NF4_LOAD_SLACK = 0.3
HEADROOM = 1.1  # a plan fits when its estimate plus 10% does (bench/scale.py: estimates within -2%..+18%)
# Activation elements saved per token and per hidden unit of a decoder layer that TTT backpropagates through
# (attention inputs, q/k/v, MLP gate/up/act at the model's intermediate ratio), fitted on bench/scale.py.
ACTIVATION_PER_TOKEN_HIDDEN = 24
KV_BYTES = 2  # llama.cpp's default F16 cache
N_CTX = 4096  # llama.cpp context finemed opens for answering


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts by role, read from the checkpoint's headers (no weights loaded)."""

    layer_linear: int  # weights of the decoder layers' linear projections: what NF4 quantizes
    embedding: int  # input embeddings
    head: int  # the LM head when untied (0 when tied to the embeddings)
    other: int  # norms, biases, rotary tables
    layers: int
    hidden: int
    kv_dim: int  # key/value width per layer (heads × head size)
    vocab: int

    @property
    def total(self) -> int:
        return self.layer_linear + self.embedding + self.head + self.other


@dataclass(frozen=True)
class Plan:
    """How a run holds the model: the torch copy's base weights and the generator (a GGUF for llama.cpp, or
    None: transformers generates on the torch copy itself, or nothing generates)."""

    quantize: str  # none | nf4
    gguf_type: str | None

    def describe(self) -> str:
        base = "a 4-bit base (nf4)" if self.quantize == "nf4" else "full-precision weights"
        if self.gguf_type == "given":
            return base + " and the given GGUF on llama.cpp"
        return base + (f" and a {self.gguf_type} llama.cpp generator" if self.gguf_type else "")


@dataclass(frozen=True)
class Need:
    """A plan's estimated peak on the device that runs the model, by part (bytes)."""

    plan: Plan
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def model_shape(model_dir: str | os.PathLike[str]) -> ModelShape | None:
    """Counts by role from config.json and the safetensors headers (the weights themselves are not read); None
    when they cannot be told (no safetensors, e.g. a `pytorch_model.bin` checkpoint, or a config without sizes):
    then the run loads as asked, unplanned."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not list(model_dir.glob("*.safetensors")):
            return None
        return shape_from_tensors(config, _tensor_shapes(model_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shape_from_tensors(config: dict, tensors: list[tuple[str, list[int]]]) -> ModelShape:
    """Counts by role from a config.json's values and the checkpoint's (name, shape) pairs."""
    config = config.get("text_config", config) if "hidden_size" not in config else config
    counts = {"layer_linear": 0, "embedding": 0, "head": 0, "other": 0}
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        counts[_role(name, shape)] += n
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    kv_dim = int(config.get("num_key_value_heads", heads)) * head_dim
    return ModelShape(**counts, layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                      kv_dim=kv_dim, vocab=int(config["vocab_size"]))


def _tensor_shapes(model_dir: Path) -> list[tuple[str, list[int]]]:
    files = sorted(model_dir.glob("*.safetensors"))
    shapes = []
    for f in files:
        with open_safetensors(f) as st:
            shapes += [(k, list(st.get_slice(k).get_shape())) for k in st.keys()]  # noqa: SIM118
    return shapes


_LAYER_LINEAR = re.compile(r"\.layers\.\d+\..*(proj|fc\d?|dense|query_key_value|wqkv|w\d)\.weight$")


def _role(name: str, shape: list[int]) -> str:
    if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
        return "embedding"
    if name.startswith("lm_head") or name.endswith("output.weight"):
        return "head"
    if len(shape) == 2 and _LAYER_LINEAR.search(name):
        return "layer_linear"
    return "other"


@dataclass(frozen=True)
class Workload:
    """What the run does with the model, as far as memory goes."""

    device: str  # cpu | cuda...
    dtype_bytes: int  # compute dtype
    ttt_mode: str  # lora | paper | off
    ttt_tokens: int  # tokens per neighbour TTT reads (lora: max_length; paper: pad_to)
    ttt_layers: int  # decoder layers TTT backpropagates through
    loss_chunk: int
    gguf_on_device: bool = True  # llama.cpp's weights live where the torch copy does (CPU, or all layers offloaded)
    gguf_bytes: int | None = None  # a GGUF given whole (its size, whatever the plan's type)
    generate_tokens: int = 0  # prompt + new tokens a transformers generator caches (0: it does not generate)


def estimate(shape: ModelShape, plan: Plan, work: Workload) -> Need:
    """The plan's peak on `work.device`, by part."""
    b = work.dtype_bytes
    base_bytes = NF4_BYTES_PER_WEIGHT if plan.quantize == "nf4" else b
    parts: dict[str, float] = {
        "runtime": RUNTIME_BYTES["cuda" if work.device.startswith("cuda") else "cpu"],
        "torch weights": shape.layer_linear * base_bytes + (shape.embedding + shape.head + shape.other) * b,
    }
    if plan.quantize == "nf4" and not work.device.startswith("cuda"):
        parts["4-bit load slack"] = shape.layer_linear * NF4_LOAD_SLACK
    tokens = work.ttt_tokens
    if work.ttt_mode == "paper":
        # an fp32 working copy, its gradients and Adam's two moments, for every parameter
        parts["paper working copy + Adam"] = shape.total * 16
        parts["activations"] = tokens * shape.hidden * shape.layers * ACTIVATION_PER_TOKEN_HIDDEN * 4
        parts["logits"] = tokens * shape.vocab * 4 * 3
    elif work.ttt_mode == "lora":
        parts["activations"] = tokens * shape.hidden * (work.ttt_layers * ACTIVATION_PER_TOKEN_HIDDEN + 2) * b
        parts["logits"] = work.loss_chunk * shape.vocab * 4 * 3
        if plan.quantize == "nf4":  # one projection dequantized at a time, forward or backward
            parts["dequantized layer"] = 2 * shape.layer_linear / max(shape.layers, 1) / 3 * b
    if plan.gguf_type is not None:
        weights = work.gguf_bytes if plan.gguf_type == "given" else shape.total * GGUF_BYTES[plan.gguf_type]
        if work.gguf_on_device:
            parts["llama.cpp weights + KV cache"] = (weights + N_CTX * shape.layers * 2 * shape.kv_dim * KV_BYTES
                                                     + LLAMA_BATCH * shape.vocab * 4 * 2)
    elif work.generate_tokens:
        parts["transformers KV cache"] = work.generate_tokens * shape.layers * 2 * shape.kv_dim * b
    return Need(plan, parts)


def available_bytes(device: str) -> int | None:
    """Memory the run may use on `device`: `FINEMED_MEMORY` (e.g. `12GB`) when set, else free GPU memory, or
    the RAM Linux calls available; None when it cannot be told (then nothing is refused)."""
    given = os.environ.get("FINEMED_MEMORY")
    if given:
        return parse_size(given)
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_size(text: str) -> int:
    """`12GB`, `12G`, `12GiB`, `800MB`, `1.5T` or bytes → bytes (binary units: what tools report)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"FINEMED_MEMORY={text!r} is not a size; write it like 12GB or 800MB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def gb(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def choose_plan(shape: ModelShape | None, work: Workload, quantize: str, gguf_type: str | None,
                what: str = "the model", quiet: bool = False) -> Need:
    """The first plan that fits `available_bytes(work.device)`, from most to least memory: full precision with
    an F16 GGUF, a 4-bit base with a Q4_K_M GGUF, a 4-bit base generating itself (one copy of the model); or
    only the plans `quantize` (none|nf4) and an explicit `gguf_type` allow. `gguf_type` None: llama.cpp is
    not used. Raises ConfigError, in one line with the option that fits, when none does."""
    if work.ttt_mode == "paper" and quantize == "nf4":
        raise ConfigError("--ttt-mode paper updates every weight, which a 4-bit base cannot hold; use --ttt-mode "
                          "lora with --quantize nf4, or --quantize none")
    plans = _ladder(quantize, gguf_type, work.ttt_mode)
    if shape is None:  # nothing to size it by: the largest plan asked for, as before plans existed
        logger.info("memory: %s cannot be sized (no safetensors headers); loading it unplanned", what)
        return Need(plans[0], {})
    needs = [estimate(shape, p, work) for p in plans]
    budget = available_bytes(work.device)
    for need in needs:
        if budget is None or need.total * HEADROOM <= budget:
            if need is not needs[0] and budget is not None and not quiet:
                logger.info("memory: %s needs about %s with %s, more than the %s available on %s: using %s "
                            "(about %s)", what, gb(needs[0].total * HEADROOM), needs[0].plan.describe(),
                            gb(budget), work.device, need.plan.describe(), gb(need.total * HEADROOM))
            return need
    raise ConfigError(_refusal(what, shape, needs, work, budget or 0, quantize))


def _ladder(quantize: str, gguf_type: str | None, ttt_mode: str) -> list[Plan]:
    """The plans `quantize` and `gguf_type` allow, largest first (`auto` values leave the choice open)."""
    full = "f16" if gguf_type == "auto" else gguf_type  # "given": a GGUF file the user named
    small = "q4_k_m" if gguf_type == "auto" else gguf_type
    plans = []
    if quantize in ("auto", "none"):
        plans.append(Plan("none", full))
    if quantize in ("auto", "nf4") and ttt_mode != "paper":
        plans.append(Plan("nf4", small))
        if gguf_type == "auto":  # the generator `auto` may also be transformers on the 4-bit copy itself
            plans.append(Plan("nf4", None))
    return plans


def _refusal(what: str, shape: ModelShape, needs: list[Need], work: Workload, budget: int, quantize: str) -> str:
    need = needs[-1]
    biggest = max(need.parts, key=need.parts.__getitem__)
    head = (f"{what} needs about {gb(need.total * HEADROOM)} on {work.device} with {need.plan.describe()} ({biggest} "
            f"{gb(need.parts[biggest])}), and {gb(budget)} is available")
    if work.ttt_mode == "paper":
        return head + ("; --ttt-mode paper copies every weight in fp32 with Adam's state: use --ttt-mode lora "
                       "(add --quantize nf4 on a small card)")
    if quantize == "none":
        for plan in _ladder("nf4", "auto" if need.plan.gguf_type else None, work.ttt_mode):
            small = estimate(shape, plan, work)
            if small.total * HEADROOM <= budget:
                fix = "--quantize nf4" + (f" --outtype {plan.gguf_type}" if plan.gguf_type else
                                          " --generator transformers" if need.plan.gguf_type else "")
                return head + f"; --quantize auto (or {fix}) fits in about {gb(small.total * HEADROOM)}"
    return head + ("; free memory, use a smaller model, or run on the CPU (--device cpu)"
                   if work.device.startswith("cuda") else "; free memory or use a smaller model")
