"""Forward+backward time and peak memory of finemed's two Triton LoRA designs (fused: our GEMM with the low-rank
epilogue; split: cuBLAS base GEMM, then our low-rank add) against peft's LoRA layer and the pure-torch
reference, at the Llama-3.1-8B projections (hidden 4096, MLP 14336, 8 KV heads), bf16.

    python bench/lora_kernels.py                    # a CUDA GPU: 7 projections, rank 16, 4096 tokens
    TRITON_PRINT_AUTOTUNING=1 python bench/lora_kernels.py --tokens 512,4096 --ranks 16,64   # + chosen tiles
    python bench/lora_kernels.py --device cpu       # CPU smoke run: small shapes, peft and the reference

Printed per shape: each implementation's median ms and peak MB (CUDA memory allocated during one step above
what was held before it), and the ratios fused/split (below 1: fused faster; the number that decides
`kernels/lora.py`'s DEFAULT_IMPL), peft/fused and peft/split (above 1: ours faster). Each Triton result is
checked against the reference first. On CPU there is no compiled Triton: fused and split run only under
TRITON_INTERPRET=1, for correctness, and are never timed. Appends bench/results/lora_kernels.csv with the
device name, versions and date.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

from results_csv import append_results

# (in, out) of each Llama-3.1-8B projection.
SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
             "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
SHAPES_CPU = {"q_proj/16": (256, 256), "k_proj/16": (256, 64), "gate_proj/16": (256, 896), "down_proj/16": (896, 256)}
TRITON_IMPLS = ("fused", "split")


def _time(fn, device: str, repeat: int) -> tuple[float, float]:
    """Median seconds of fn() and its peak extra memory (MB, CUDA only) over `repeat` runs after a warm-up."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - held) / 2**20 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def _forward(impl: str, x, w, a, b, scaling, peft_layer):
    import finemed_kernels

    if impl == "peft":
        return peft_layer(x)
    if impl == "reference":
        return finemed_kernels.lora_linear_reference(x, w, None, a, b, scaling)
    from finemed_kernels.lora import lora_linear_triton

    return lora_linear_triton(x, w, None, a, b, scaling, impl=impl)


def _step(impl: str, x, w, a, b, scaling, peft_layer, dy) -> None:
    """One forward+backward of a LoRA linear by `impl` (gradients of x, A and B; W frozen)."""
    x.grad = a.grad = b.grad = None
    _forward(impl, x, w, a, b, scaling, peft_layer).backward(dy)


def _max_error(impl: str, x, w, a, b, scaling, dy) -> float:
    """Largest difference from the reference over the output and the three gradients, relative to its max."""
    import torch

    outs = {}
    for name in (impl, "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        y = _forward(name, leaves[0], w, leaves[1], leaves[2], scaling, None)
        outs[name] = (y, *torch.autograd.grad(y, leaves, dy))
    return max(float((g.detach().float() - r.detach().float()).abs().max() / r.detach().float().abs().max().clamp_min(1e-6))
               for g, r in zip(outs[impl], outs["reference"], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--tokens", default=None, help="comma-separated; default 4096 on CUDA, 64 on CPU")
    ap.add_argument("--ranks", default="16")
    ap.add_argument("--shapes", default=None, help="INxOUT,... instead of the 8B projections (CUDA) or "
                                                   "their 1/16 scale (CPU)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per arm (default 20 CUDA, 5 CPU)")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on one, or pass --device cpu for a smoke run")
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shapes = (SHAPES_8B if on_gpu else SHAPES_CPU) if args.shapes is None else {
        s: tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")}
    tokens = [int(t) for t in (args.tokens or ("4096" if on_gpu else "64")).split(",")]
    repeat = args.repeat or (20 if on_gpu else 5)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    checked = TRITON_IMPLS if on_gpu or interpreted else ()
    timed = ["peft", "reference", *(TRITON_IMPLS if on_gpu else ())]
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"device {name}, {str(dtype).removeprefix('torch.')}, {repeat} timed runs per arm"
          + ("" if on_gpu else "; Triton checked only under TRITON_INTERPRET=1, never timed on CPU"))
    rows = []
    for proj, (k, n) in shapes.items():
        for r in (int(v) for v in args.ranks.split(",")):
            for m in tokens:
                g = torch.Generator(device=device).manual_seed(m + k + n + r)
                x = torch.randn(m, k, device=device, dtype=dtype, generator=g, requires_grad=True)
                dy = torch.randn(m, n, device=device, dtype=dtype, generator=g)
                base = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(device, dtype)
                peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
                lin = peft_model.base_model.model[0]
                w = lin.base_layer.weight.detach()
                # fp32 masters for A and B, as finemed trains them; B nonzero so the low-rank term counts.
                a = (torch.randn(r, k, device=device, generator=g) / k**0.5).requires_grad_(True)
                b = (torch.randn(n, r, device=device, generator=g) / r**0.5).requires_grad_(True)
                errors = {i: _max_error(i, x, w, a, b, 2.0, dy) for i in checked}
                res = {i: _time(functools.partial(_step, i, x, w, a, b, 2.0, lin, dy), device, repeat) for i in timed}
                ratios = {}
                if on_gpu:
                    ratios = {"fused/split": res["fused"][0] / res["split"][0],
                              "peft/fused": res["peft"][0] / res["fused"][0],
                              "peft/split": res["peft"][0] / res["split"][0]}
                line = "  ".join(f"{i} {res[i][0] * 1e3:7.2f} ms {res[i][1]:6.0f} MB" for i in timed)
                extra = "  ".join(f"{key} {v:.2f}x" for key, v in ratios.items())
                errs = "  ".join(f"{i} err {e:.1e}" for i, e in errors.items())
                print(f"{proj:12} K={k:5} N={n:5} r={r:3} M={m:5}  {line}  {extra}  {errs}", flush=True)
                for i in timed:
                    rows.append([name, str(dtype).removeprefix("torch."), proj, k, n, r, m, i,
                                 f"{res[i][0] * 1e3:.3f}", f"{res[i][1]:.0f}",
                                 f"{errors[i]:.2e}" if i in errors else "-"])
                del x, dy, base, peft_model, lin, w, a, b
                if on_gpu:
                    torch.cuda.empty_cache()
    append_results("lora_kernels", ["device", "dtype", "proj", "k", "n", "rank", "tokens", "impl", "ms",
                                    "peak_mb", "max_rel_error"], rows)


if __name__ == "__main__":
    main()
