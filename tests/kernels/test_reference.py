"""The pure-torch LoRA linear (the CPU path and the future Triton kernels' oracle) against the merged
weight `W + s·BA`, output and every gradient, over odd shapes and ranks, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import finemed_kernels

# bf16 keeps 8 bits of mantissa: the unmerged and merged products round differently.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k", "r"), [(1, 7, 5, 1), (7, 33, 17, 8), (129, 65, 31, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_merged_weight(dtype, m, n, k, r, bias) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k + r)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) * 0.1).requires_grad_(True)  # fp32 master weights, as TTT keeps
    bb = (torch.randn(n, r, generator=g) * 0.1).requires_grad_(True)
    s = 2.0
    y = finemed_kernels.lora_linear(x, w, b, a, bb, s)
    assert y.dtype == dtype and y.shape == (m, n)
    dy = torch.randn(m, n, generator=g).to(dtype)
    dx, da, db = torch.autograd.grad(y, (x, a, bb), dy)

    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
    y64 = F.linear(x64, w.double() + s * b64 @ a64, None if b is None else b.double())
    ex, ea, eb = torch.autograd.grad(y64, (x64, a64, b64), dy.double())
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(y64.detach().abs().max()))
    torch.testing.assert_close(y.double() / scale, y64.detach() / scale, **tol)
    for got, want in ((dx, ex), (da, ea), (db, eb)):
        sc = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double() / sc, want / sc, **tol)
    assert da.dtype == torch.float32 and db.dtype == torch.float32


def test_dispatcher_uses_reference_off_gpu() -> None:
    x = torch.randn(3, 4)
    w, a, b = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    torch.testing.assert_close(finemed_kernels.lora_linear(x, w, None, a, b, 0.5),
                               finemed_kernels.lora_linear_reference(x, w, None, a, b, 0.5))


def test_batched_reference_is_each_segment_through_its_own_adapter() -> None:
    g = torch.Generator().manual_seed(0)
    segments = (3, 0, 5)
    x = torch.randn(1, 8, 6, generator=g).requires_grad_(True)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    a = torch.randn(3, 2, 6, generator=g).requires_grad_(True)
    bb = torch.randn(3, 4, 2, generator=g).requires_grad_(True)
    y = finemed_kernels.lora_linear_batched(x, w, b, a, bb, 0.5, segments)
    want = torch.cat([finemed_kernels.lora_linear_reference(x[:, :3], w, b, a[0], bb[0], 0.5),
                      finemed_kernels.lora_linear_reference(x[:, 3:], w, b, a[2], bb[2], 0.5)], dim=1)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert not a.grad[1].any() and not bb.grad[1].any()  # the empty segment's adapter gets nothing
    with pytest.raises(ValueError, match="summing to the input's 8 tokens"):
        finemed_kernels.lora_linear_batched(x, w, b, a, bb, 0.5, (3, 0, 4))
