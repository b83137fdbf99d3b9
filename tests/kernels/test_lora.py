"""The Triton LoRA linear, both designs (fused: our GEMM with the low-rank epilogue; split: cuBLAS then our
low-rank add), against a float64 oracle (the merged weight `W + s·BA`) and the pure-torch reference: output
and every gradient, odd shapes, ranks 1-64, fp32, bf16 and fp16, strided inputs. Compiled on a GPU (`cuda`
marker), under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from finemed_kernels import lora_linear_batched_reference, lora_linear_reference  # noqa: E402
from finemed_kernels.lora import (  # noqa: E402
    IMPLS,
    lora_linear_batched_triton,
    lora_linear_triton,
    pick_impl,
)
from finemed_kernels.matmul import MAX_RANK, matmul_lowrank  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Errors relative to the largest magnitude. bf16 keeps 8 mantissa bits, fp16 11; the implementations round
# x·Aᵀ and the output to 16 bits at different points (split rounds the base product once more). Measured
# worst errors over SHAPES (interpreter): bf16 7.6e-3, fp16 7.1e-4, both from split.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7, 5, 1), (7, 33, 17, 8), (129, 65, 31, 64), (40, 100, 70, 16)]


def _inputs(m, n, k, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + m * 1000 + n + k + r)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = torch.randn(r, k, generator=g) * 0.1  # fp32 master weights, as TTT keeps them
    bb = torch.randn(n, r, generator=g) * 0.1
    dy = torch.randn(m, n, generator=g).to(dtype)
    return [t.to(DEVICE) if t is not None else None for t in (x, w, b, a, bb, dy)]


def _close(got, want, dtype) -> None:
    want = want.detach()
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.detach().double().cpu() / scale, want.detach().double().cpu() / scale,
                               **TOLERANCE[dtype])


def _grads(fn, x, w, b, a, bb, dy, s):
    x, a, bb = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    y = fn(x, w, b, a, bb, s)
    return (y, *torch.autograd.grad(y, (x, a, bb), dy))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "r"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_output_and_every_gradient(impl, dtype, m, n, k, r, bias) -> None:
    x, w, b, a, bb, dy = _inputs(m, n, k, r, dtype, bias)
    s = 2.0
    y, dx, da, db = _grads(functools.partial(lora_linear_triton, impl=impl), x, w, b, a, bb, dy, s)
    assert y.dtype == dtype and dx.dtype == dtype and da.dtype == db.dtype == torch.float32
    x64, a64, b64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, a, bb))
    y64 = F.linear(x64, w.double().cpu() + s * b64 @ a64, None if b is None else b.double().cpu())
    want = (y64, *torch.autograd.grad(y64, (x64, a64, b64), dy.double().cpu()))
    for got, ref in zip((y, dx, da, db), want, strict=True):
        _close(got, ref, dtype)
    for got, ref in zip((y, dx, da, db), _grads(lora_linear_reference, x, w, b, a, bb, dy, s), strict=True):
        _close(got, ref, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_dimensional_and_strided_inputs(impl) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 9, generator=g).to(DEVICE).transpose(1, 2)  # (2, 9, 40), non-contiguous
    w = torch.randn(40, 21, generator=g).to(DEVICE).t()  # (21, 40), a transposed view
    a = torch.randn(8, 40, generator=g).to(DEVICE) * 0.1
    bb = torch.randn(21, 8, generator=g).to(DEVICE) * 0.1
    dy = torch.randn(2, 9, 21, generator=g).to(DEVICE)
    got = _grads(functools.partial(lora_linear_triton, impl=impl), x, w, None, a, bb, dy, 0.5)
    want = _grads(lora_linear_reference, x, w, None, a, bb, dy, 0.5)
    assert got[0].shape == (2, 9, 21) and got[1].shape == x.shape
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, torch.float32)


def test_frozen_weight_gets_no_gradient_and_x_may_be_frozen() -> None:
    x, w, b, a, bb, dy = _inputs(5, 17, 19, 4, torch.float32, True)
    w.requires_grad_(False)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = lora_linear_triton(x, w, b, a, bb, 1.0)  # x without grad: only dA, dB are computed
    da, db = torch.autograd.grad(y, (a, bb), dy)
    assert da.shape == a.shape and db.shape == bb.shape and w.grad is None


def test_plain_matmul_with_scales() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 20, generator=g).to(DEVICE)
    y = torch.randn(20, 18, generator=g).to(DEVICE)
    lo, ro = torch.randn(33, 3, generator=g).to(DEVICE), torch.randn(3, 18, generator=g).to(DEVICE)
    got = matmul_lowrank(x, y, (lo, ro), alpha=0.5, beta=-2.0)
    _close(got, 0.5 * x.double() @ y.double() - 2.0 * lo.double() @ ro.double(), torch.float32)
    # The split design's epilogue: only the low-rank term, added into an existing output in place.
    out = x @ y
    want = out.double() - 2.0 * lo.double() @ ro.double()
    assert matmul_lowrank(None, None, (lo, ro), beta=-2.0, out=out) is out
    _close(out, want, torch.float32)
    with pytest.raises(ValueError, match="adds L @ R into `out`"):
        matmul_lowrank(None, None, (lo, ro))


def test_the_design_is_chosen_by_argument_or_environment(monkeypatch) -> None:
    monkeypatch.delenv("FINEMED_LORA_IMPL", raising=False)
    assert pick_impl() == "fused" and pick_impl("split") == "split"
    monkeypatch.setenv("FINEMED_LORA_IMPL", "split")
    assert pick_impl() == "split" and pick_impl("fused") == "fused"
    monkeypatch.setenv("FINEMED_LORA_IMPL", "fast")
    with pytest.raises(ValueError, match="FINEMED_LORA_IMPL='fast': the LoRA kernel design is one of fused, split"):
        pick_impl()


def test_bad_shapes_and_ranks_are_refused() -> None:
    x, w, b, a, bb, _ = _inputs(3, 8, 6, 2, torch.float32, False)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear_triton(x, w, b, a[:, :5], bb, 1.0)
    big_a = torch.zeros(MAX_RANK + 1, 6, device=DEVICE)
    big_b = torch.zeros(8, MAX_RANK + 1, device=DEVICE)
    with pytest.raises(ValueError, match="rank"):
        lora_linear_triton(x, w, b, big_a, big_b, 1.0)


def _batched_grads(fn, x, w, b, a, bb, dy, s, segments):
    x, a, bb = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    y = fn(x, w, b, a, bb, s, segments)
    return (y, *torch.autograd.grad(y, (x, a, bb), dy))


# Segments: one adapter; runs shorter and longer than a row tile (16-64 rows); an adapter with no tokens.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("segments", "n", "k", "r"), [((7,), 33, 17, 8), ((1, 40, 3), 65, 31, 1),
                                                       ((20, 0, 129, 5), 40, 70, 64)])
def test_batched_output_and_every_gradient(impl, dtype, segments, n, k, r) -> None:
    g = torch.Generator().manual_seed(sum(segments) + n + k + r)
    m, count = sum(segments), len(segments)
    x = torch.randn(1, m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(count, r, k, generator=g) * 0.1).to(DEVICE)
    bb = (torch.randn(count, n, r, generator=g) * 0.1).to(DEVICE)
    dy = torch.randn(1, m, n, generator=g).to(dtype).to(DEVICE)
    got = _batched_grads(functools.partial(lora_linear_batched_triton, impl=impl), x, w, b, a, bb, dy, 2.0,
                         segments)
    assert got[0].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    want = _batched_grads(lora_linear_batched_reference, x, w, b, a, bb, dy, 2.0, segments)
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, dtype)
    # And each segment equals the single-adapter kernel on its own tokens (dA, dB of an empty one are 0).
    start = 0
    for i, length in enumerate(segments):
        if length == 0:
            assert not got[2][i].any() and not got[3][i].any()
            continue
        one = _grads(functools.partial(lora_linear_triton, impl=impl), x[:, start : start + length], w, b, a[i], bb[i],
                     dy[:, start : start + length], 2.0)
        _close(got[0][:, start : start + length], one[0], dtype)
        _close(got[2][i], one[2], dtype)
        _close(got[3][i], one[3], dtype)
        start += length


def test_batched_segments_must_cover_the_tokens() -> None:
    x = torch.randn(1, 6, 4, device=DEVICE)
    w, a, bb = torch.randn(5, 4, device=DEVICE), torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="summing to the input's 6 tokens"):
        lora_linear_batched_triton(x, w, None, a, bb, 1.0, (2, 3))
    with pytest.raises(ValueError, match="2 non-negative"):
        lora_linear_batched_triton(x, w, None, a, bb, 1.0, (6,))


def test_gpu_tiles_are_pruned_to_the_output() -> None:
    from finemed_kernels.matmul import GPU_TILES, matmul_lowrank_tuned, prune_tiles

    configs = matmul_lowrank_tuned.configs
    assert len(configs) == len(GPU_TILES)
    thin = prune_tiles(configs, {"M": 4096, "N": 16})  # xa = x Aᵀ at rank 16
    assert thin and all(c.kwargs["BLOCK_N"] == 16 for c in thin)
    assert len(prune_tiles(configs, {"M": 4096, "N": 14336})) == len(configs)
    # No K loop (the split design's low-rank add): tiles that differ only in BLOCK_K are timed once.
    adds = prune_tiles(configs, {"M": 4096, "N": 4096}, HAS_BASE=False)
    assert len(adds) == len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                             for c in configs})
    tiny = prune_tiles(configs, {"M": 1, "N": 1})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tiny] == [(64, 16)]


@pytest.mark.parametrize("impl", IMPLS)
def test_autotuned_dispatch_under_the_interpreter(impl, monkeypatch) -> None:
    """The CUDA launch path (autotuned tiles, grids from the chosen tile, C restored between trials of an
    in-place add) run by the interpreter, with a stand-in timer that runs every trial twice and prefers the
    last tile: results must still equal the reference."""
    from finemed_kernels import matmul

    if not matmul.INTERPRETED:
        pytest.skip("on a GPU the compiled tests cover this path")
    trials = []

    def timer(kernel_call, quantiles):
        kernel_call()
        kernel_call()  # an in-place add not restored between trials would count twice
        trials.append(1)
        return [-float(len(trials))] * len(quantiles)

    for tuner in (matmul.matmul_lowrank_tuned, matmul.matmul_lowrank_rows_tuned):
        monkeypatch.setattr(tuner, "do_bench", timer)
        monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(matmul, "INTERPRETED", False)  # fp32 below: UPCAST holds either way
    monkeypatch.setattr(matmul, "TUNE_MIN_MACS", 0)
    x, w, b, a, bb, dy = _inputs(40, 100, 70, 16, torch.float32, True)
    got = _grads(functools.partial(lora_linear_triton, impl=impl), x, w, b, a, bb, dy, 2.0)
    for g_, w_ in zip(got, _grads(lora_linear_reference, x, w, b, a, bb, dy, 2.0), strict=True):
        _close(g_, w_, torch.float32)
    segments = (15, 0, 20, 5)
    xs, dys = x[None], dy[None]
    a3, b3 = torch.stack([a] * 4) * torch.arange(1, 5)[:, None, None], torch.stack([bb] * 4)
    got = _batched_grads(functools.partial(lora_linear_batched_triton, impl=impl), xs, w, b, a3, b3, dys, 2.0,
                         segments)
    want = _batched_grads(lora_linear_batched_reference, xs, w, b, a3, b3, dys, 2.0, segments)
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, torch.float32)
    assert trials and matmul.matmul_lowrank_tuned.cache and matmul.matmul_lowrank_rows_tuned.cache


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_on_gpu_at_model_shapes(impl, monkeypatch) -> None:
    import finemed_kernels
    from finemed_kernels.matmul import INTERPRETED

    assert not INTERPRETED and finemed_kernels.triton_available()
    monkeypatch.setenv("FINEMED_LORA_IMPL", impl)
    # An 8B-like projection slice, bf16, through the dispatcher that finemed's LoRA layers call.
    x, w, b, a, bb, dy = _inputs(512, 1024, 4096, 16, torch.bfloat16, False)
    got = _grads(finemed_kernels.lora_linear, x, w, b, a, bb, dy, 2.0)
    want = _grads(lora_linear_reference, x, w, b, a, bb, dy, 2.0)
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_batched_compiled_on_gpu_at_model_shapes(impl, monkeypatch) -> None:
    import finemed_kernels

    monkeypatch.setenv("FINEMED_LORA_IMPL", impl)

    g = torch.Generator().manual_seed(5)
    segments = (300, 512, 77, 400)
    x = torch.randn(1, sum(segments), 4096, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(1024, 4096, generator=g) * 0.02).to(DEVICE, torch.bfloat16)
    a = (torch.randn(4, 16, 4096, generator=g) * 0.01).to(DEVICE)
    bb = (torch.randn(4, 1024, 16, generator=g) * 0.01).to(DEVICE)
    dy = torch.randn(1, sum(segments), 1024, generator=g).to(DEVICE, torch.bfloat16)
    got = _batched_grads(finemed_kernels.lora_linear_batched, x, w, None, a, bb, dy, 2.0, segments)
    want = _batched_grads(lora_linear_batched_reference, x, w, None, a, bb, dy, 2.0, segments)
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, torch.bfloat16)
