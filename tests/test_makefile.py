"""The set-up logic of the Makefile, by a dry run (`make -n`): with an NVIDIA GPU llama-cpp-python is built
with CUDA before the package is installed, and it says so; without one nothing of that runs."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(tmp_path, **variables: str) -> list[str]:
    args = ["make", "-n", "-C", str(REPO), "setup", f"VENV={tmp_path / 'venv'}",
            *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()


def test_a_gpu_machine_builds_llama_cpp_with_cuda_first(tmp_path) -> None:
    lines = _dry_run(tmp_path, HAS_NVIDIA="1", EXTRAS="dev,gpu")
    cuda = next(i for i, line in enumerate(lines) if 'CMAKE_ARGS="-DGGML_CUDA=on"' in line)
    assert "--no-binary llama-cpp-python" in lines[cuda] and "--no-cache-dir" in lines[cuda]
    assert any("building llama-cpp-python with CUDA" in line for line in lines[:cuda])
    package = next(i for i, line in enumerate(lines) if '-e ".[dev,gpu]"' in line)
    assert cuda < package  # installed first, so the package's requirement is already met by the CUDA build
    assert any('"torch>=2.4"' in line for line in lines)  # the registry's CUDA torch, not the CPU wheel


def test_a_cpu_machine_does_not(tmp_path) -> None:
    lines = _dry_run(tmp_path, HAS_NVIDIA="")
    assert not any("GGML_CUDA" in line for line in lines)
    assert any('"torch==2.13.0"' in line for line in lines)
