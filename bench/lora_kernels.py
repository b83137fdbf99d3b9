"""Forward+backward time and peak memory of finemed's Triton LoRA linear against peft's LoRA layer and the
pure-torch reference, at Llama-3.1-8B projection shapes (hidden 4096, MLP 14336), bf16.

    python bench/lora_kernels.py                       # on a CUDA GPU: tokens 512-4096, ranks 16 and 64
    python bench/lora_kernels.py --device cpu --tokens 64 --shapes 1024x1024   # a CPU smoke run

On CPU there is no compiled Triton: the "triton" row is skipped unless TRITON_INTERPRET=1 (correctness only,
never a timing). Appends bench/results/lora_kernels.csv with the GPU name, versions and date.
"""

from __future__ import annotations

import argparse
import functools
import time

from results_csv import append_results

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}


def _time(fn, device: str, repeat: int) -> tuple[float, float]:
    """Median seconds of fn() and peak memory (MB, CUDA only) over `repeat` runs after a warm-up."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def _step(impl: str, x, w, a, b, peft_layer, dy) -> None:
    """One forward+backward of a LoRA linear by `impl`."""
    import finemed_kernels

    if impl == "peft":
        y = peft_layer(x)
    elif impl == "reference":
        y = finemed_kernels.lora_linear_reference(x, w, None, a, b, 2.0)
    else:
        from finemed_kernels.lora import lora_linear_triton

        y = lora_linear_triton(x, w, None, a, b, 2.0)
    y.backward(dy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--shapes", default=None, help="INxOUT,... instead of the 8B projections")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    import finemed_kernels

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on one, or pass --device cpu for a smoke run")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = SHAPES if args.shapes is None else {
        s: tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")}
    impls = ["peft", "reference"]
    if device == "cuda" or finemed_kernels.triton_available():
        impls.append("triton")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for name, (k, n) in shapes.items():
        for r in (int(x) for x in args.ranks.split(",")):
            for m in (int(x) for x in args.tokens.split(",")):
                x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
                dy = torch.randn(m, n, device=device, dtype=dtype)
                base = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(device, dtype)
                peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
                lin = peft_model.base_model.model[0]
                w = lin.base_layer.weight.detach()
                a = torch.randn(r, k, device=device, requires_grad=True)
                b = torch.randn(n, r, device=device, requires_grad=True)

                fns = {i: functools.partial(_step, i, x, w, a, b, lin, dy) for i in impls}
                res = {i: _time(fns[i], device, args.repeat) for i in impls}
                line = "  ".join(f"{i} {res[i][0] * 1e3:8.2f} ms {res[i][1]:8.0f} MB" for i in impls)
                speed = res["peft"][0] / res["triton"][0] if "triton" in res else float("nan")
                print(f"{name:9} K={k:5} N={n:5} r={r:3} M={m:5}  {line}  peft/triton {speed:.2f}x")
                for i in impls:
                    rows.append([gpu, str(dtype).removeprefix("torch."), name, k, n, r, m, i,
                                 f"{res[i][0] * 1e3:.3f}", f"{res[i][1]:.0f}"])
    append_results("lora_kernels", ["device", "dtype", "proj", "k", "n", "rank", "tokens", "impl", "ms",
                                    "peak_mb"], rows)


if __name__ == "__main__":
    main()
