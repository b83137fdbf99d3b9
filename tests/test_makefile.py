"""The set-up logic of the Makefile, by a dry run (`make -n`): with an NVIDIA GPU llama-cpp-python is built
with CUDA before the package is installed, and it says so; without one nothing of that runs. And `make
bench-gpu`'s acceptance script, by its own dry run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

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


def test_bench_gpu_runs_the_acceptance_script_whose_dry_run_lists_every_step(tmp_path) -> None:
    make = subprocess.run(["make", "-n", "-C", str(REPO), "bench-gpu", f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, check=True).stdout
    assert [line for line in make.splitlines() if "bench/" in line] == [f"{tmp_path / 'venv'}/bin/python "
                                                                       "bench/gpu_acceptance.py"]
    dry = subprocess.run([sys.executable, "bench/gpu_acceptance.py", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    listed = [line for line in dry.splitlines() if re.match(r"\d+\. ", line)]
    steps = [line.split(" ")[1] for line in listed]
    assert steps == ["cuda-tests", "kernel-tests", "kernel-bench", "ttt-batch", "unsloth-qlora", "fsdp-one-process",
                     "llama-cpp-offload"]
    limits = [int(re.search(r"\(limit (\d+) s\)", line).group(1)) for line in listed]
    assert sum(limits) <= 480  # the whole run fits 8 minutes
    for needle in ("-m cuda", "tests/kernels", "bench/lora_kernels.py --device cuda", "--batch-sizes 4,8,16",
                   "model.backend=unsloth", "model.method=qlora", "--nproc-per-node 1", "model.fsdp=true",
                   "--n-gpu-layers -1"):
        assert needle in dry, needle
    only = subprocess.run([sys.executable, "bench/gpu_acceptance.py", "--dry-run", "--only", "ttt-batch,nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert only.returncode == 2 and "no step nope" in only.stderr
