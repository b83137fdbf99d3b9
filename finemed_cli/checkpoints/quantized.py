"""The 4-bit frozen base for TTT and QLoRA: bitsandbytes NF4 weights under LoRA adapters kept in fp32.

Why bitsandbytes NF4 (measured with `python bench/quant_candidates.py`, README "TTT at the paper's size"): it
runs on CPU and CUDA from one PyPI wheel, transformers loads a checkpoint straight into it tensor by tensor (the
full-precision model is never held whole), its `Linear4bit` backpropagates to the input (all LoRA needs), and it
is the same 4-bit format unsloth and peft train QLoRA on, so `train` and `answer` share one quantized path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from finemed_cli.errors import ModelError

logger = logging.getLogger(__name__)

# bitsandbytes NF4 with double quantization: 64-weight blocks, an 8-bit absmax per block and an fp32 scale per
# 256 absmaxes: 0.5 + 1/64 + 4/(64*256) = 0.516 bytes per weight (bench/quant_candidates.py counts the same from
# the packed tensors).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
_INSTALL = "pip install 'bitsandbytes>=0.50' (finemed's dependencies include it; CPU and CUDA wheels on PyPI)"


@functools.cache
def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def require_bitsandbytes() -> None:
    if not bitsandbytes_available():
        raise ModelError(f"the 4-bit base (--quantize nf4, method: qlora) needs bitsandbytes: {_INSTALL}")


def nf4_config(compute_dtype: Any) -> Any:
    """transformers' `BitsAndBytesConfig` for an NF4 base computing in `compute_dtype`. The embeddings and the
    LM head stay in `compute_dtype` (transformers keeps the output layer unquantized): TTT's loss reads every
    vocabulary row and llama.cpp's K-quant mixes keep those at higher precision too."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized_linear(module: Any) -> bool:
    """True for a linear layer whose weight is packed k-bit blocks (bitsandbytes `Linear4bit`): its `.weight`
    is not a matrix to multiply by, so LoRA must call the module for the base path."""
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "quant_state", None) is not None


def keep_quantized_format(model: Any) -> int:
    """Stop bitsandbytes from repacking a 4-bit weight in place on its first no-grad forward on a CPU with
    AVX512-BF16 (its absmax cast to bf16, a layout that fails for rows under 64 weights): TTT alternates
    no-grad and grad passes, and the frozen base must be the same bits, in one format, for every question.
    Returns how many layers it set."""
    count = 0
    for module in model.modules():
        if is_quantized_linear(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantized_weights_digest(model: Any) -> str:
    """A hash of every packed 4-bit weight and its quantization statistics: equal before and after TTT shows
    the frozen base was never written (tests)."""
    import hashlib

    h = hashlib.sha256()
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            h.update(name.encode())
            h.update(module.weight.detach().cpu().numpy().tobytes())
            h.update(module.weight.quant_state.absmax.detach().cpu().numpy().tobytes())
    return h.hexdigest()


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: Any) -> Any:
    """(name, tensor) for each tensor of a .safetensors file, read with plain reads into fresh buffers: unlike
    safetensors' mmap, no page of the file stays mapped, so a 16 GB bf16 checkpoint adds one tensor at a time to
    the process's memory, not the whole file (measured on the Llama-3.2-1B shape: 4.86 GB peak RSS through
    transformers' loader against 2.4 GB held after it)."""
    import json
    import struct

    import torch

    from finemed_cli.checkpoints.files import check_safetensors

    check_safetensors([path])  # a file cut short would otherwise read short buffers and fail in reshape
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            buf = bytearray(end - begin)
            f.readinto(buf)
            dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
            yield name, (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(
                info["shape"])


def load_nf4(source: str, dtype: Any, device: str) -> Any | None:
    """An NF4 model streamed from its safetensors tensor by tensor (`read_safetensors`): the decoder layers'
    linear weights quantized as they arrive, the rest cast to `dtype`. None when the checkpoint's names do not
    match the model's one to one (then transformers' own loader is used, which maps renamed keys)."""
    from pathlib import Path

    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from finemed_cli.runtime import release_memory

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        return None
    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            parent, _, attr = name.rpartition(".")
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            setattr(model.get_submodule(parent), attr, layer)
    expected = dict(model.named_parameters())
    for f in files:
        for key, tensor in read_safetensors(f):
            if key not in expected:
                return None
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
                # quantized from the checkpoint's own dtype: no full-precision copy of the matrix is made
                module.weight = bnb.nn.Params4bit(tensor, requires_grad=False, blocksize=64,
                                                  compress_statistics=True, quant_type="nf4",
                                                  module=module).to(device)
                # bf16 -> fp32 is exact, so the codes and absmax are those of an fp32 copy; dequantize to the
                # compute dtype as that copy would (not through the checkpoint's coarser dtype)
                module.weight.quant_state.dtype = dtype
            else:
                set_module_tensor_to_device(model, key, device, value=tensor, dtype=dtype)
            del tensor
    model.tie_weights()
    release_memory()  # the read buffers freed above stay resident in glibc's heap until trimmed
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    return model
