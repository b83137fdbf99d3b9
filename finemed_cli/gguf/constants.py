"""The GGUF outtypes finemed writes: one list, used by the CLI, the exporter and the quantizer."""

from __future__ import annotations

from typing import Any

DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # written by gguf-py, tensor by tensor
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # made from an F16 export by llama.cpp's quantizer
OUTTYPES = DIRECT_TYPES + K_QUANTS
LORA_TYPES = ("f32", "f16")  # LoRA adapters
# finemed's own GGUF key (no standard one exists): the system prompt a finemed-trained model learned with;
# `finemed chat` and `serve` use it by default. llama.cpp ignores keys it does not know.
SYSTEM_PROMPT_KEY = "finemed.system_prompt"

# outtype -> gguf-py's LlamaFileType member (general.file_type; the same numbers as llama.h's llama_ftype)
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def file_type(outtype: str) -> Any:
    """gguf-py's `LlamaFileType` of an outtype."""
    from gguf import LlamaFileType

    return LlamaFileType[_FILE_TYPES[outtype]]
