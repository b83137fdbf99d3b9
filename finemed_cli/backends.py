"""Optional backends, detected once: llama-cpp-python (GGUF generation, K-quants, `finemed chat`), and what it
can offload to a GPU."""

from __future__ import annotations

import functools
import logging
from typing import Any

from finemed_cli.errors import FinemedError

logger = logging.getLogger("finemed_cli.llama_cpp")

_INSTALL = ("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp from source, "
            "about 5 minutes on 2 cores; `make setup` does it)")


@functools.cache
def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def require_llama_cpp() -> Any:
    """The `llama_cpp` module with its C log routed to Python logging (DEBUG), or a FinemedError saying how
    to install it. llama.cpp otherwise prints hundreds of lines per model load or quantization."""
    if not llama_cpp_available():
        raise FinemedError(_INSTALL)
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    require_llama_cpp._callback = _log  # a live reference: ctypes callbacks must outlive their use
    llama_cpp.llama_log_set(_log, None)
    return llama_cpp


def default_gpu_layers() -> int:
    """Every layer on the GPU where llama.cpp was built with GPU support (CUDA, Metal, …), else none."""
    return -1 if bool(require_llama_cpp().llama_supports_gpu_offload()) else 0
