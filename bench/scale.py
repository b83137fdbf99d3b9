"""finemed at real sizes: peak memory and seconds per question of `finemed answer` with TTT on random-weight models
of real shapes (memory and time do not depend on the weights' values), per memory plan, in one run.

    python bench/scale.py                              # 135m, 1b and 3b shapes, every plan
    python bench/scale.py --sizes 8b --plans nf4-q4_k_m,nf4   # the paper's shape (needs ~40 GB of disk)

Shapes are those of SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (config values as published,
vocabulary rows included); the tokenizer is the embedded model's. Weights are drawn once in bf16 and saved under
--work; each plan's GGUF is exported once (timed, not counted in the answer's peak). Plans:

    default          today's default: full-precision torch copy (fp32 on CPU) + an F16 GGUF for llama.cpp
    nf4-q4_k_m       4-bit NF4 frozen base under the LoRA + a Q4_K_M GGUF for llama.cpp
    nf4              4-bit NF4 base that also generates (transformers): one copy of the model
    nf4-q4_k_m-bf16  the same two in bf16, the precision a GPU computes in (its embeddings and LM head in bf16)
    nf4-bf16

Each (size, plan) runs the real CLI (`finemed answer --limit N`, examples/ questions and corpus) in its own
process; peak RSS (and on CUDA the device's peak use, sampled) is that process's. The first question is a
warm-up; s/question is the mean over the rest. Prints a table with each plan's ratio to `default` and the
memory plan's estimate beside the measurement, a projection to 8B from the measured 1B→3B slope (labelled as a
projection), and appends the rows to bench/results/scale.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
SHAPES = {  # config.json values of the published models
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                 max_position_embeddings=8192),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               rope_parameters=_LLAMA3_ROPE, max_position_embeddings=131072),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
               rope_parameters=_LLAMA3_ROPE, max_position_embeddings=131072),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072),
}
# plan -> (--quantize, GGUF type or None, --generator, --dtype)
PLANS = {"default": ("none", "f16", "llama.cpp", "auto"), "nf4-q4_k_m": ("nf4", "q4_k_m", "llama.cpp", "auto"),
         "nf4": ("nf4", None, "transformers", "auto"),
         # a GPU's precision (bf16) measured on the CPU: the projection to a 12 GB card uses these
         "nf4-q4_k_m-bf16": ("nf4", "q4_k_m", "llama.cpp", "bfloat16"), "nf4-bf16": ("nf4", None, "transformers",
                                                                                     "bfloat16")}


def build_model(size: str, work: Path) -> Path:
    """A random-weight Llama of `size`'s shape, saved once in bf16 (shards of 2 GB, drawn tensor by tensor so
    even the 8B shape never needs its weights in memory whole), with the embedded model's tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from finemed_cli.checkpoints.embedded import embedded_model_dir

    out = work / f"llama-{size}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[size], bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(set(names.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        names.update(dict.fromkeys(shard, name))
        shard.clear()

    for key, shape in shapes.items():
        t = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shard[key] = t.to(torch.bfloat16)
        if sum(v.numel() * 2 for v in shard.values()) > 2 * GiB:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    config.save_pretrained(tmp)
    src = embedded_model_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    tmp.rename(out)
    return out


def export(model: Path, outtype: str) -> tuple[Path, float]:
    """The model's GGUF of `outtype`, exported once (seconds: 0 when it was already there)."""
    from finemed_cli.export.gguf import export_gguf

    path = model / f"model-{outtype}.gguf"
    if path.is_file():
        return path, 0.0
    start = time.perf_counter()
    export_gguf(model, path, outtype)
    return path, time.perf_counter() - start


def run_plan(model: Path, plan: str, gguf: Path | None, index: Path, args: argparse.Namespace) -> dict:
    """One `finemed answer` in its own process; its peak RSS from wait4, its records' timings."""
    quantize, _, generator, dtype = PLANS[plan]
    out = args.work / f"answers-{model.name}-{plan}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--answer", "--", "answer",
           str(REPO / "examples" / "questions.jsonl"), "-o", str(out), "--index", str(index), "--model", str(model),
           "--limit", str(args.questions), "--max-new-tokens", str(args.max_new_tokens), "--quantize", quantize,
           "--generator", generator, "--dtype", dtype, "--no-progress"]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    # Every plan is measured, including one the planner would refuse for want of headroom: plan for the whole
    # machine, not what happens to be free (the estimates are printed beside the peaks instead).
    env = {"FINEMED_MEMORY": str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), **os.environ,
           "FINEMED_HOME": str(args.work / "home")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{model.name} {plan} failed:\n{log[-3000:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    timed = records[1:] or records
    device_peak = next((float(line.split()[-1]) for line in log.splitlines() if line.startswith("DEVICE_PEAK")),
                       None)
    return {"peak_rss": usage.ru_maxrss * 1024, "device_peak": device_peak, "wall": wall,
            "ttt_s": sum(r["ttt"]["seconds"] for r in timed) / len(timed),
            "gen_s": sum(r["generation"]["seconds"] for r in timed) / len(timed),
            "tokens": max(r["ttt"].get("tokens", 0) for r in records)}


def answer_in_process(argv: list[str]) -> None:
    """`finemed ARGV` in this process; on CUDA, the device's peak use sampled every 20 ms (torch's allocator
    and llama.cpp's buffers alike) printed as DEVICE_PEAK."""
    import threading

    import torch

    from finemed_cli.cli.main import main

    peak = [0]
    stop = threading.Event()
    if torch.cuda.is_available():
        def sample() -> None:
            while not stop.wait(0.02):
                free, total = torch.cuda.mem_get_info()
                peak[0] = max(peak[0], total - free)
        threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["finemed", *argv]
    try:
        main()
    finally:
        stop.set()
        if peak[0]:
            print(f"DEVICE_PEAK {peak[0]}")


def shape_of(size: str):
    """`size`'s parameter counts by role, from its config on the meta device (nothing allocated)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finemed_cli.checkpoints.memory import shape_from_tensors

    config = LlamaConfig(**SHAPES[size])
    with torch.device("meta"):
        state = LlamaForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return shape_from_tensors(config.to_dict(), [(k, list(v.shape)) for k, v in state.items()])


def estimate_for(model: Path | None, plan: str, tokens: int, device: str, shape=None) -> float:
    """The memory plan's estimate (checkpoints/memory.py) for this model (or `shape`), plan and TTT token count."""
    from finemed_cli.checkpoints.memory import Plan, Workload, estimate, model_shape
    from finemed_cli.config.answer import TTTConfig

    shape = shape or model_shape(model)
    quantize, gguf_type, _, dtype = PLANS[plan]
    ttt = TTTConfig()
    work = Workload(device=device, dtype_bytes=2 if device == "cuda" or dtype == "bfloat16" else 4, ttt_mode="lora",
                    ttt_tokens=tokens,
                    ttt_layers=ttt.resolved_layers(shape.layers), loss_chunk=ttt.loss_chunk,
                    generate_tokens=0 if gguf_type else 1024)
    return estimate(shape, Plan(quantize, gguf_type), work).total


def params_of(model: Path) -> int:
    from finemed_cli.checkpoints.memory import model_shape

    return model_shape(model).total


def project(rows: list[dict], plan: str, params_8b: int) -> float | None:
    """Peak at 8B from the measured 1B→3B slope of `plan` (a projection, not a measurement)."""
    pts = {r["size"]: r for r in rows if r["plan"] == plan}
    if "1b" not in pts or "3b" not in pts:
        return None
    a, b = pts["1b"], pts["3b"]
    slope = (b["peak"] - a["peak"]) / (b["params"] - a["params"])
    return b["peak"] + slope * (params_8b - b["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="135m,1b,3b", help="comma-separated of " + ", ".join(SHAPES))
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated of " + ", ".join(PLANS))
    parser.add_argument("--questions", type=int, default=2, help="questions per run (the first is a warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "scale",
                        help="models, GGUFs and answers (the 3B shape needs ~20 GB, 8B ~45 GB)")
    parser.add_argument("--answer", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.answer:
        return answer_in_process([a for a in rest if a != "--"])
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = args.work / "corpus.index"
    if not index.is_dir():
        subprocess.run([sys.executable, "-m", "finemed_cli", "index", "build", str(REPO / "examples" / "corpus.jsonl"),
                        "-o", str(index)], check=True, env={**os.environ, "FINEMED_HOME": str(args.work / "home")})
    rows = []
    for size in args.sizes.split(","):
        start = time.perf_counter()
        model = build_model(size, args.work)
        params = params_of(model)
        print(f"{size}: {params / 1e9:.2f}B parameters ({time.perf_counter() - start:.0f} s to build)", flush=True)
        for plan in args.plans.split(","):
            gguf, export_s = export(model, PLANS[plan][1]) if PLANS[plan][1] else (None, 0.0)
            r = run_plan(model, plan, gguf, index, args)
            peak = r["device_peak"] if device == "cuda" else r["peak_rss"]
            rows.append({"size": size, "plan": plan, "params": params, "peak": peak, **r, "export_s": export_s,
                         "gguf_bytes": gguf.stat().st_size if gguf else 0,
                         "estimate": estimate_for(model, plan, r["tokens"], device)})
            print(f"  {plan:<11} peak {peak / GiB:5.2f} GB ({peak / params:.2f} B/param; plan's estimate "
                  f"{rows[-1]['estimate'] / GiB:.2f} GB)  TTT {r['ttt_s']:.2f} s/q  generation {r['gen_s']:.2f} s/q"
                  + (f"  (GGUF export {export_s:.0f} s)" if export_s else ""), flush=True)
    report(rows, device, args)


def report(rows: list[dict], device: str, args: argparse.Namespace) -> None:
    base = {r["size"]: r for r in rows if r["plan"] == "default"}
    what = "device peak" if device == "cuda" else "peak RSS"
    print(f"\n{'size':<5} {'plan':<11} {what:>10} {'B/param':>8} {'x default':>9} {'TTT s/q':>8} {'x':>6} "
          f"{'gen s/q':>8} {'x':>6} {'estimate':>9}")
    def ratio(r: dict, key: str) -> str:
        b = base.get(r["size"])
        return f"{r[key] / b[key]:.2f}" if b and b[key] else "-"

    for r in rows:
        print(f"{r['size']:<5} {r['plan']:<11} {r['peak'] / GiB:>7.2f} GB {r['peak'] / r['params']:>8.2f} "
              f"{ratio(r, 'peak'):>9} {r['ttt_s']:>8.2f} {ratio(r, 'ttt_s'):>6} {r['gen_s']:>8.2f} "
              f"{ratio(r, 'gen_s'):>6} "
              f"{r['estimate'] / GiB:>6.2f} GB")
    params_8b = 8_030_261_248  # Llama-3.1-8B
    for plan in PLANS:
        p = project(rows, plan, params_8b)
        if p is not None:
            print(f"projection (not a measurement) at 8B, {plan}: {p / GiB:.1f} GB from the 1B→3B slope")
    for plan in ("default", "nf4-q4_k_m", "nf4"):  # what `finemed answer` would plan on a GPU, for 1,000 TTT tokens
        est = estimate_for(None, plan, 1000, "cuda", shape=shape_of("8b"))
        print(f"memory plan's estimate (not a measurement) for Llama-3.1-8B on a GPU in bf16, {plan}: "
              f"{est / GiB:.1f} GB")
    append_results("scale", ["device", "size", "params", "plan", "peak_bytes", "bytes_per_param",
                             "ratio_to_default", "ttt_s_per_q", "gen_s_per_q", "estimate_bytes", "gguf_bytes",
                             "ttt_tokens", "questions"],
                   [[device, r["size"], r["params"], r["plan"], r["peak"], round(r["peak"] / r["params"], 3),
                     round(r["peak"] / base[r["size"]]["peak"], 3) if r["size"] in base else "",
                     round(r["ttt_s"], 3), round(r["gen_s"], 3), int(r["estimate"]), r["gguf_bytes"], r["tokens"],
                     args.questions] for r in rows])


if __name__ == "__main__":
    main()
