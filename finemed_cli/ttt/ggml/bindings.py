"""ctypes declarations for the ggml that llama-cpp-python ships (`llama_cpp/lib/libggml-base.so`,
`libggml-cpu.so`): the graph ops a Llama layer uses, their backward, AdamW and GGUF reading.

The `ggml-python` package on PyPI (0.0.45) vendors a ggml from before `ggml_build_backward_expand` took
gradient accumulators and before ggml-opt; llama-cpp-python 0.3.36's own ggml has both, and every symbol
below (checked with `nm -D`), so that is the one bound. Signatures follow that release's `ggml.h`.
"""

from __future__ import annotations

import ctypes as C
import functools
import importlib.util
from pathlib import Path
from typing import Any

from finemed_cli.errors import ModelError

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
GGML_ROPE_TYPE_NORMAL = 0  # Llama's GGUF stores q/k permuted for the normal (interleaved-pair) rope


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class GGUFInitParams(C.Structure):
    _fields_ = [("no_alloc", C.c_bool), ("ctx", C.POINTER(C.c_void_p))]


class Tensor(C.Structure):
    """`struct ggml_tensor` (ggml.h of llama-cpp-python 0.3.36: GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""

    _fields_ = [("type", C.c_int), ("buffer", C.c_void_p), ("ne", C.c_int64 * 4), ("nb", C.c_size_t * 4),
                ("op", C.c_int), ("op_params", C.c_int32 * 16), ("flags", C.c_int32),
                ("src", C.c_void_p * 10), ("view_src", C.c_void_p), ("view_offs", C.c_size_t),
                ("data", C.c_void_p), ("name", C.c_char * 64), ("extra", C.c_void_p), ("padding", C.c_char * 8)]


P = C.c_void_p
F = C.c_float
I64 = C.c_int64
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ggml_init": (P, [InitParams]),
    "ggml_free": (None, [P]),
    "ggml_tensor_overhead": (C.c_size_t, []),
    "ggml_graph_overhead_custom": (C.c_size_t, [C.c_size_t, C.c_bool]),
    "ggml_nbytes": (C.c_size_t, [P]),
    "ggml_type_name": (C.c_char_p, [C.c_int]),
    "ggml_get_tensor": (P, [P, C.c_char_p]),
    "ggml_new_tensor_1d": (P, [P, C.c_int, I64]),
    "ggml_new_tensor_2d": (P, [P, C.c_int, I64, I64]),
    "ggml_set_name": (P, [P, C.c_char_p]),
    "ggml_set_param": (None, [P]),
    "ggml_set_loss": (None, [P]),
    "ggml_set_input": (None, [P]),
    "ggml_set_output": (None, [P]),
    "ggml_backend_cpu_buffer_type": (P, []),
    "ggml_gallocr_new": (P, [P]),
    "ggml_gallocr_alloc_graph": (C.c_bool, [P, P]),
    "ggml_gallocr_get_buffer_size": (C.c_size_t, [P, C.c_int]),
    "ggml_gallocr_free": (None, [P]),
    "ggml_get_rows": (P, [P, P, P]),
    "ggml_rms_norm": (P, [P, P, F]),
    "ggml_mul": (P, [P, P, P]),
    "ggml_add": (P, [P, P, P]),
    "ggml_scale": (P, [P, P, F]),
    "ggml_mul_mat": (P, [P, P, P]),
    "ggml_out_prod": (P, [P, P, P]),
    "ggml_silu": (P, [P, P]),
    "ggml_cont": (P, [P, P]),
    "ggml_transpose": (P, [P, P]),
    "ggml_reshape_2d": (P, [P, P, I64, I64]),
    "ggml_reshape_3d": (P, [P, P, I64, I64, I64]),
    "ggml_permute": (P, [P, P, C.c_int, C.c_int, C.c_int, C.c_int]),
    "ggml_rope_ext": (P, [P, P, P, P, C.c_int, C.c_int, C.c_int, F, F, F, F, F, F]),
    "ggml_soft_max_ext": (P, [P, P, P, F, F]),
    "ggml_cross_entropy_loss": (P, [P, P, P]),
    "ggml_opt_step_adamw": (P, [P, P, P, P, P, P]),
    "ggml_new_graph_custom": (P, [P, C.c_size_t, C.c_bool]),
    "ggml_build_forward_expand": (None, [P, P]),
    "ggml_build_backward_expand": (None, [P, P, P]),
    "ggml_graph_get_grad": (P, [P, P]),
    "ggml_graph_dup": (P, [P, P, C.c_bool]),
    "ggml_graph_reset": (None, [P]),
    "ggml_backend_alloc_ctx_tensors": (P, [P, P]),
    "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_tensor_set": (None, [P, P, C.c_size_t, C.c_size_t]),
    "ggml_backend_tensor_get": (None, [P, P, C.c_size_t, C.c_size_t]),
    "ggml_backend_graph_compute": (C.c_int, [P, P]),
    "ggml_backend_free": (None, [P]),
    "gguf_init_from_file": (P, [C.c_char_p, GGUFInitParams]),
    "gguf_free": (None, [P]),
    "gguf_find_key": (I64, [P, C.c_char_p]),
    "gguf_get_val_u32": (C.c_uint32, [P, I64]),
    "gguf_get_val_f32": (F, [P, I64]),
    "gguf_get_val_str": (C.c_char_p, [P, I64]),
    "gguf_get_data_offset": (C.c_size_t, [P]),
    "gguf_get_n_tensors": (I64, [P]),
    "gguf_get_tensor_name": (C.c_char_p, [P, I64]),
    "gguf_find_tensor": (I64, [P, C.c_char_p]),
    "gguf_get_tensor_offset": (C.c_size_t, [P, I64]),
}
_CPU_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ggml_backend_cpu_init": (P, []),
    "ggml_backend_cpu_set_n_threads": (None, [P, C.c_int]),
}


def _lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ModelError("the ggml TTT engine needs llama-cpp-python: pip install 'llama-cpp-python==0.3.36'")
    return Path(spec.origin).parent / "lib"


class Ggml:
    """The two libraries with their declared functions as attributes (`ggml.ggml_mul_mat(...)`)."""

    def __init__(self, lib_dir: Path) -> None:
        mode = C.RTLD_GLOBAL
        self.base = C.CDLL(str(lib_dir / "libggml-base.so"), mode=mode)
        self.cpu = C.CDLL(str(lib_dir / "libggml-cpu.so"), mode=mode)
        for lib, table in ((self.base, _SIGNATURES), (self.cpu, _CPU_SIGNATURES)):
            for name, (res, args) in table.items():
                try:
                    fn = getattr(lib, name)
                except AttributeError as e:  # an older llama-cpp-python: name the missing symbol
                    raise ModelError(f"{lib._name} has no {name}; install llama-cpp-python 0.3.36") from e
                fn.restype, fn.argtypes = res, args
                setattr(self, name, fn)


@functools.cache
def load_ggml() -> Ggml:
    """The bound libraries, loaded once per process."""
    return Ggml(_lib_dir())


def tensor(ptr: int) -> Tensor:
    """The `struct ggml_tensor` at `ptr`, readable and writable (shape, strides, data pointer)."""
    return Tensor.from_address(ptr)
