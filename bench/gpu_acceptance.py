"""Everything finemed has that needs an NVIDIA GPU, in one run sized for under 8 minutes on one H100/H200
(`make bench-gpu`, after `make setup EXTRAS=dev,gpu`):

    python bench/gpu_acceptance.py              # every step
    python bench/gpu_acceptance.py --only kernel-bench,llama-cpp-offload
    python bench/gpu_acceptance.py --dry-run    # print the steps and their commands; needs no GPU

Each step runs as its own process under a time limit, and a failure (or a timeout) does not stop the next
one. At the end a table gives every step's result, exit code and seconds; the exit code is 1 if any step
failed. Each step's full output goes to bench/results/gpu-acceptance/<date>-<gpu>/<step>.log, one row per
step to bench/results/gpu_acceptance.csv, and the benchmarks append their own CSVs as usual. The limits add up
to 8 minutes; they are estimates, not yet measured on a GPU: the first real run will say which are tight.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "build" / "gpu-acceptance"  # each run in WORK/<date>/
PY = sys.executable
FINEMED = [PY, "-m", "finemed_cli"]
TINY = str(REPO / "examples" / "train-tiny.yaml")


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    command: list[str]
    limit_s: int
    env: tuple[tuple[str, str], ...] = ()


def _train(work: Path, name: str, steps: tuple[int, ...], *sets: str) -> list[str]:
    """`finemed train` options for the tiny curriculum into `work`, its stages cut to `steps` optimizer steps."""
    cut = [a for i, n in enumerate(steps) for a in ("--set", f"stages.{i}.max_steps={n}")]
    return [TINY, "--no-progress", "--set", f"output_dir={work / 'runs'}", "--set", f"name={name}", *cut,
            *(a for s in sets for a in ("--set", s))]


def steps(work: Path) -> list[Step]:
    """The steps, writing what they make under `work` (a new folder per run: reruns never collide)."""
    return [
        Step("cuda-tests", "every test marked cuda (compiled kernels at 8B shapes, unsloth curriculum, batched "
             "TTT on CUDA)", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda"], 120),
        Step("kernel-tests", "the LoRA kernel tests compiled (not interpreted): fused and split, fp32/bf16/fp16, "
             "odd shapes, every gradient", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"], 75),
        Step("kernel-bench", "fused vs split vs peft, forward+backward, Llama-3.1-8B projections, rank 16, 4096 "
             "tokens, bf16; chosen tiles printed", [PY, "bench/lora_kernels.py", "--device", "cuda"], 75,
             (("TRITON_PRINT_AUTOTUNING", "1"),)),
        Step("ttt-batch", "batched TTT at B = 1 (sequential), 4, 8, 16 on the embedded model",
             [PY, "bench/ttt_batch.py", "--device", "cuda", "--batch-sizes", "4,8,16", "--repeats", "1"], 60),
        Step("unsloth-qlora", "20 steps of unsloth QLoRA on the tiny curriculum: 3 SFT stages then DPO, "
             "final/ merged", [*FINEMED, "train", *_train(work, "unsloth-qlora", (5, 5, 5, 5), "model.backend=unsloth",
                                                          "model.method=qlora", "model.precision=bf16")], 75),
        Step("fsdp-one-process", "full fine-tuning through FSDP's sharded path in one GPU process (one-rank "
             "NCCL group, bf16 gathers)",
             [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
              "bench/fsdp_one_process.py", *_train(work, "fsdp-one", (2, 1, 1, 2), "model.backend=transformers",
                                                   "model.method=full", "model.fsdp=true",
                                                   *(f"stages.{i}.lr=0.00001" for i in range(4)))],
             45),
        Step("llama-cpp-offload", "finemed answer through llama.cpp with every layer on the GPU",
             ["bash", "-c", f"{shlex.quote(PY)} -c 'import llama_cpp, sys; sys.exit(0 if "
              "llama_cpp.llama_supports_gpu_offload() else \"llama-cpp-python has no GPU offload: make setup on "
              "this machine builds it with CUDA\")' && " + shlex.join(
                  [*FINEMED, "answer", str(REPO / "examples" / "questions.jsonl"), "-o",
                   str(work / "answers.jsonl"), "--no-ttt", "--generator", "llama.cpp", "--n-gpu-layers", "-1",
                   "--limit", "2", "--max-new-tokens", "48", "--no-progress", "--print"])], 30),
    ]


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "no-gpu"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else "no-gpu"


def run_step(step: Step, log: Path) -> tuple[str, int, float]:
    """Run one step to completion or its limit; (result, exit code, seconds). Output goes to `log`."""
    env = {**os.environ, **dict(step.env)}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    start = time.perf_counter()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(step.command)}\n")
        out.flush()
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=step.limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's whole process group (torchrun's workers included)
            proc.wait()
            return "timeout", 124, time.perf_counter() - start
    return ("pass" if code == 0 else "fail"), code, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the steps and commands; run nothing")
    ap.add_argument("--only", default=None, help="comma-separated step names")
    args = ap.parse_args()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = WORK / stamp
    todo = steps(work)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in todo})
        if unknown:
            ap.error(f"--only: no step {', '.join(unknown)}; the steps are {', '.join(s.name for s in todo)}")
        todo = [s for s in todo if s.name in wanted]
    total = sum(s.limit_s for s in todo)
    if args.dry_run:
        print(f"{len(todo)} steps, limits adding up to {total} s (dry run: nothing is run)")
        for i, s in enumerate(todo, 1):
            env = "".join(f"{k}={v} " for k, v in s.env)
            print(f"{i}. {s.name} (limit {s.limit_s} s): {s.what}\n   $ {env}{shlex.join(s.command)}")
        return

    gpu = gpu_name()
    if gpu == "no-gpu":
        print("warning: nvidia-smi finds no GPU; the steps will run and most will fail", file=sys.stderr)
    logs = RESULTS / "gpu-acceptance" / f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"GPU: {gpu}; {len(todo)} steps, limits adding up to {total} s; logs in {logs}", flush=True)
    rows = []
    for s in todo:
        print(f"-- {s.name}: {s.what}", flush=True)
        result, code, seconds = run_step(s, logs / f"{s.name}.log")
        print(f"   {result} (exit {code}) in {seconds:.1f} s", flush=True)
        rows.append([gpu, s.name, result, code, f"{seconds:.1f}", s.limit_s])

    print(f"\n{'step':20} {'result':8} {'exit':>5} {'seconds':>8} {'limit':>6}")
    for _, name, result, code, seconds, limit in rows:
        print(f"{name:20} {result:8} {code:>5} {seconds:>8} {limit:>6}")
    failed = [r[1] for r in rows if r[2] != "pass"]
    spent = sum(float(r[4]) for r in rows)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed, {spent:.0f} s in all"
          + (f"; see {logs}/<step>.log" if failed else ""))
    sys.path.insert(0, str(REPO / "bench"))
    from results_csv import append_results

    append_results("gpu_acceptance", ["gpu", "step", "result", "exit_code", "seconds", "limit_s"], rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
