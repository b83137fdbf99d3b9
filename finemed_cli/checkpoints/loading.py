"""Load a causal LM and its tokenizer from the embedded default, an HF directory, a GGUF file or a hub id."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finemed_cli.checkpoints.embedded import (
    DEFAULT_MODEL_NAME,
    EMBEDDED_PREFIX,
    embedded_model,
    embedded_model_dir,
)
from finemed_cli.checkpoints.files import check_safetensors, read_json_object
from finemed_cli.errors import ModelError
from finemed_cli.hub import hub_gguf, hub_snapshot, parse_hub_ref

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    name: str  # what answer records and manifests call it
    source: str  # the directory or id it was loaded from


def pick_device(device: str | None) -> str:
    """`auto`/None → cuda when available, else cpu."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). There bf16 GEMMs run ~2.4x faster than
    fp32 (2-core AMD EPYC with AVX512-BF16: 2048x576 @ 576x1536 in 8.5 ms against 20.2 ms); without it oneDNN
    emulates bf16 on plain AVX512 and is ~5x *slower* (2-core Intel Xeon, AVX512 without BF16, 2026-12-02: 60.1
    ms against 12.2 ms). oneDNN's own `_is_mkldnn_bf16_supported` says yes to both, so ask for the instructions."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # another architecture, or an older torch: fp32 is the safe side
        return False


def cuda_has_bf16(device: str) -> bool:
    """Whether the GPU computes bf16 natively: compute capability 8.0 (Ampere) and up. Older cards (Turing's
    RTX 20xx, T4, V100) emulate it slowly or not at all, and `torch.cuda.is_bf16_supported()` can say yes there."""
    import torch

    index = torch.device(device).index
    major, _ = torch.cuda.get_device_capability(0 if index is None else index)
    return major >= 8


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    """`auto`/None → bf16 on a GPU of compute capability 8.0 and up, fp16 on older GPUs (TTT and training then
    scale the loss: `modeling.loss.loss_scaler`), fp32 on CPU (CPU bf16 matmuls are slower than fp32 on most
    CPUs). An explicit bf16 on an older GPU is refused."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    if table[dtype] == torch.bfloat16 and device.startswith("cuda") and not cuda_has_bf16(device):
        raise ModelError(f"--dtype {dtype}: this GPU ({torch.cuda.get_device_name(device)}, compute capability "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no native bf16; "
                         "use --dtype auto (float16 with loss scaling) or float32")
    return table[dtype]


def resolve_model_source(model: str | None) -> tuple[str, str, dict[str, Any]]:
    """Return (name, source, extra from_pretrained kwargs) for a --model value (None: the embedded default).

    `source` is always a local directory: a hub id (`org/name`, or `org/name:Q4_K_M` for a GGUF in it) is
    taken from the HF cache, or downloaded when the network allows (finemed_cli/hub.py), so transformers itself
    never goes online.

    A GGUF file is dequantised once into a safetensors directory (TTT and training need one); a local
    directory must hold a config.json whose model_type transformers knows; a value written as a path that does
    not exist is reported as a missing path, not as a bad hub id.
    """
    if model is None:
        return DEFAULT_MODEL_NAME, str(embedded_model_dir()), {}
    check_model_value(model)
    if model.startswith(EMBEDDED_PREFIX):
        embedded = embedded_model(model)
        return embedded.name, str(embedded_model_dir(embedded.key)), {}
    p = Path(model).expanduser()
    if p.is_file():
        from finemed_cli.checkpoints.embedded import materialised_gguf

        return p.stem, str(materialised_gguf(p)), {}
    if p.exists():
        return p.name, str(p), {}
    ref = parse_hub_ref(model)
    assert ref is not None  # check_model_value refused every other value
    if ref.gguf:
        from finemed_cli.checkpoints.embedded import materialised_gguf

        return ref.repo_id.split("/")[-1], str(materialised_gguf(hub_gguf(ref))), {}
    snapshot = hub_snapshot(ref, "model")
    if not (snapshot / "config.json").is_file():
        raise ModelError(f"{ref.repo_id} holds no HF model (no config.json); for a GGUF repository name one file "
                         f"or quant, e.g. {ref.repo_id}:Q4_K_M")
    _check_model_dir(snapshot)
    return model, str(snapshot), {}


def check_model_value(model: str | None) -> None:
    """What `resolve_model_source` checks before it materialises, downloads or loads anything: a run with several
    models (eval's `--compare …@MODEL`) checks them all before its first one runs.

    Raises:
        ModelError: no such embedded model, a file that is not a GGUF, a directory transformers cannot load, or
            a path that does not exist.
    """
    if model is None:
        return
    if model.startswith(EMBEDDED_PREFIX):
        embedded_model(model)
        return
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{p}: a file, but not a .gguf model; pass an HF model directory, a .gguf file or "
                             "a hub id")
        return
    if p.exists():
        _check_model_dir(p)
        return
    ref = parse_hub_ref(model)
    if ref is None or model.startswith((".", "/", "~")) or _under_a_local_folder(p) or (
            ":" not in model and model.endswith((".gguf", ".safetensors", ".bin", ".json"))):
        raise ModelError(f"{model}: no such model directory or file; check the path (a hub id is org/name, "
                         "or org/name:FILE.gguf for one GGUF of a repository)")


def resolve_gguf(value: str) -> Path:
    """A GGUF file named by path, hub reference (org/name:Q4_K_M or org/name:FILE.gguf) or `embedded:<key>`."""
    if value.startswith(EMBEDDED_PREFIX):
        return embedded_model(value).gguf()
    p = Path(value).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelError(f"{p}: a directory; pass a .gguf file (make one with `finemed export {p} -o model.gguf`)")
    ref = parse_hub_ref(value)
    if ref is None or value.startswith((".", "/", "~")) or _under_a_local_folder(p) or \
            value.endswith(".gguf") and ":" not in value:
        raise ModelError(f"{value}: no such file; check the path (a hub GGUF is org/name:Q4_K_M)")
    return hub_gguf(ref)


def _under_a_local_folder(p: Path) -> bool:
    """`runs/final` where `runs/` is a folder here: a path with a typo, not the hub id `runs/final` (which would
    download and load whatever that repository holds)."""
    return len(p.parts) > 1 and not p.is_absolute() and Path(p.parts[0]).is_dir()


def _check_model_dir(p: Path) -> None:
    """A local model directory transformers can load: config.json with a known model_type, and weights whose
    headers are whole (checked here, where every verb passes, not where each reader would meet them)."""
    config = p / "config.json"
    if not config.is_file():
        raise ModelError(f"{p}: not a model directory (no config.json); pass an HF model directory, a .gguf "
                         "file or a hub id")
    model_type = read_json_object(config, "re-save the model").get("model_type")
    check_safetensors(sorted(p.glob("*.safetensors")))
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        import transformers

        raise ModelError(f"{config}: model_type {model_type!r} is not known to transformers "
                         f"{transformers.__version__}; check the file, or upgrade transformers if the "
                         "architecture is newer")


def _model_type(source: str) -> str | None:
    import json

    try:
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_error(model: str | None, error: Exception) -> ModelError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return ModelError(f"cannot load model {model!r}: {first[:300]}. Pass a local HF directory, a .gguf file or a "
                      "hub id, or leave --model out for the embedded default")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer(source: str, extra: dict[str, Any], model: str | None) -> Any:
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        # transformers' own words here are "Couldn't instantiate the backend tokenizer from one of: ."
        raise ModelError(f"{source}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}); copy them from the "
                         "base model's folder into it")

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(model, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from finemed_cli.modeling.template import check_template, tokenizer_template

    # every verb loads its tokenizer here: a broken chat template is named with the model the user gave (a GGUF
    # is read through a materialised copy whose folder the user never named)
    check_template(tokenizer_template(tokenizer), origin=model or source, **tokenizer.special_tokens_map)
    return tokenizer


def load_tokenizer(model: str | None = None) -> Any:
    """The tokenizer of `model` alone (as `load_model` names it), without loading any weights."""
    _, source, extra = resolve_model_source(model)
    return _tokenizer(source, extra, model)


def load_model(model: str | None = None, device: str | None = None, dtype: str | None = None,
               quantize: str | None = None) -> LoadedModel:
    """Load a causal LM for TTT and generation, frozen (requires_grad False) and in eval mode.

    Args:
        model: None for the embedded SmolLM2-135M-Instruct; an HF directory, a .gguf file or a hub id.
        device: cpu, cuda, cuda:N or auto.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16; with `quantize` the compute dtype.
        quantize: None/"none" for full precision; "nf4" for a 4-bit frozen base (`checkpoints.quantized`), loaded
            tensor by tensor so the full-precision weights are never held whole.
    """
    name, source, extra = resolve_model_source(model)  # before the heavy imports: a hub miss fails at once
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer = _tokenizer(source, extra, model)
    if _model_type(source) == "gemma2":  # SDPA silently drops Gemma 2's attention soft-capping
        extra = {**extra, "attn_implementation": "eager"}
    lm = None
    if quantize not in (None, "none"):
        from finemed_cli.checkpoints.quantized import load_nf4, nf4_config

        lm = load_nf4(source, torch_dtype, dev)  # tensor by tensor; None: names transformers must map
        # bitsandbytes places the packed weights itself: a model it quantized cannot be moved with .to()
        extra = {**extra, "quantization_config": nf4_config(torch_dtype), "device_map": dev}
    try:
        if lm is None:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(model, e) from None
    if quantize in (None, "none"):
        lm.to(dev)
    else:
        from finemed_cli.checkpoints.quantized import keep_quantized_format

        keep_quantized_format(lm)
    lm.eval()
    lm.requires_grad_(False)
    logger.info("loaded %s from %s on %s as %s%s", name, source, dev, torch_dtype,
                f" (base weights {quantize})" if quantize not in (None, "none") else "")
    return LoadedModel(lm, tokenizer, name, source)
