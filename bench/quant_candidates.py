"""The 4-bit frozen base TTT trains under: the candidates side by side on one Llama-3.2-1B-sized projection
(2048 -> 8192, 512 tokens), forward + backward to the input (what LoRA needs), in one run.

    python bench/quant_candidates.py            # pip install hqq for its row (optional)

Candidates: fp32 `nn.Linear` (today's default on CPU; the baseline), bitsandbytes NF4 (finemed's choice),
HQQ 4-bit (group 64) when installed, and GGUF Q4_0 blocks (gguf-py quantizes no K-quant) dequantized by gguf-py every
call (the weights llama.cpp generates with). Prints bytes per weight, the weight's relative error, milliseconds
per forward+backward and the ratio to fp32; appends to bench/results/quant_candidates.csv.
"""

from __future__ import annotations

import argparse
import time

import torch
from results_csv import append_results


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def fwd_bwd(layer_fn, x: torch.Tensor):
    def run() -> None:
        x.grad = None
        layer_fn(x).sum().backward()
    return run


def bnb_nf4(w: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=True, module=layer).to("cpu")
    layer.support_avx512bf16_for_cpu = False  # as finemed runs it (checkpoints/quantized.py)
    deq = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    nbytes = layer.weight.data.numel() + layer.weight.quant_state.absmax.numel() + 4 * w.shape[0] * w.shape[1] / 64 / 256
    return layer, deq, nbytes


def hqq_4bit(w: torch.Tensor):
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    layer = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu")
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    deq = layer.dequantize().float()
    nbytes = w.numel() / 2 + 2 * 2 * w.numel() / 64  # 4-bit codes + an fp16 scale and zero per 64
    return layer, deq, nbytes


def gguf_q4_0(w: torch.Tensor):
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    packed = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0)

    class OnTheFly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            weight = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q4_0).astype(np.float32))
            ctx.save_for_backward(x)
            return x @ weight.t()

        @staticmethod
        def backward(ctx, grad):
            weight = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q4_0).astype(np.float32))
            return grad @ weight

    deq = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q4_0).astype(np.float32))
    return OnTheFly.apply, deq, packed.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(8192, 2048) * 0.02
    x = torch.randn(args.tokens, 2048, requires_grad=True)
    fp32 = torch.nn.Linear(2048, 8192, bias=False)
    fp32.weight.data.copy_(w)
    fp32.requires_grad_(False)
    base_ms = timed(fwd_bwd(fp32, x), args.repeat)
    rows = [["fp32 nn.Linear", 4.0, 0.0, base_ms, 1.0]]
    for name, make in (("bitsandbytes NF4", bnb_nf4), ("HQQ 4-bit g64", hqq_4bit), ("GGUF Q4_0 on the fly", gguf_q4_0)):
        try:
            layer, deq, nbytes = make(w)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        ms = timed(fwd_bwd(layer, x), args.repeat)
        rows.append([name, nbytes / w.numel(), float((deq - w).norm() / w.norm()), ms, ms / base_ms])
    print(f"{'candidate':<22} {'bytes/weight':>12} {'rel. error':>10} {'ms fwd+bwd':>11} {'x fp32':>7}")
    for name, b, err, ms, ratio in rows:
        print(f"{name:<22} {b:>12.3f} {err:>10.4f} {ms:>11.1f} {ratio:>7.2f}")
    append_results("quant_candidates", ["candidate", "bytes_per_weight", "relative_error", "ms_fwd_bwd",
                                        "ratio_to_fp32", "tokens"],
                   [[r[0], round(r[1], 4), round(r[2], 5), round(r[3], 2), round(r[4], 3), args.tokens]
                    for r in rows])


if __name__ == "__main__":
    main()
