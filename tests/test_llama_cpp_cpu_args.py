"""scripts/llama_cpp_cpu_args.sh, which `make setup` runs after installing: a llama.cpp build that dies on a
two-token prompt on a CPU advertising AMX is rebuilt without AMX, naming the CPU's other features; a build that
works, or a CPU without AMX, is left alone."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "llama_cpp_cpu_args.sh"
AMX_CPU = "flags\t\t: fpu sse4_2 fma f16c bmi2 avx avx2 avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni amx_tile amx_int8\n"
pytestmark = pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")


def _args(tmp_path, cpu: str, python_exit: str) -> str:
    (tmp_path / "cpuinfo").write_text(cpu)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncat > /dev/null\n{python_exit}\n")  # reads the check's code, then ends as told
    fake.chmod(0o755)
    proc = subprocess.run(["sh", str(SCRIPT), str(fake)], capture_output=True, text=True, check=True,
                          env={"CPUINFO": str(tmp_path / "cpuinfo"), "PATH": "/usr/bin:/bin"})
    return proc.stdout.strip()


def test_a_crashing_build_on_an_amx_cpu_is_rebuilt_without_amx(tmp_path) -> None:
    args = _args(tmp_path, AMX_CPU, "kill -SEGV $$").split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AMX_TILE=OFF" in args
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_FMA=ON"} <= set(args)
    assert "-DGGML_AVX512_BF16=ON" not in args  # not in this CPU's flags


def test_a_working_build_or_a_cpu_without_amx_is_left_alone(tmp_path) -> None:
    assert _args(tmp_path, AMX_CPU, "exit 0") == ""
    assert _args(tmp_path, AMX_CPU, "exit 1") == ""  # an ordinary failure is not the AMX crash
    assert _args(tmp_path, AMX_CPU.replace(" amx_tile amx_int8", ""), "kill -SEGV $$") == ""
