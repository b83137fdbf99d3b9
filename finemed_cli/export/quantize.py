"""K-quants (Q4_K_M, Q5_K_M, Q6_K) by llama.cpp's own quantizer, called in-process through llama-cpp-python:
gguf-py has no K-quant encoder, and llama.cpp's mixes (which tensors get more bits) are what users expect."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from finemed_cli.data.output import atomic_file
from finemed_cli.errors import ExportError
from finemed_cli.gguf.constants import OUTTYPES, file_type

# What llama.cpp's quantizer is asked for here: every quantized outtype (gguf-py's LlamaFileType numbers are
# llama.h's llama_ftype).
QUANTIZED = tuple(t for t in OUTTYPES if t.startswith("q"))


def quantize_gguf(source: str | os.PathLike[str], output: str | os.PathLike[str], outtype: str,
                  threads: int = 0) -> Path:
    """Quantize an F16/F32 GGUF into `outtype` with `llama_model_quantize`."""
    from finemed_cli.backends import require_llama_cpp

    llama_cpp = require_llama_cpp()
    if outtype not in QUANTIZED:
        raise ExportError(f"llama.cpp quantization to {outtype!r} is not offered; use {', '.join(QUANTIZED)}")
    output = Path(output)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(outtype))
    params.nthread = threads
    with atomic_file(output) as tmp:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"llama.cpp failed to quantize {source} to {outtype} (code {rc})")
    return output
