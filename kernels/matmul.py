"""The one GEMM kernel behind the LoRA linear: `C = α·(X @ Y) + β·(L @ R) (+ bias)`, or that added into C.

Any strides, an fp32 accumulator, the low-rank product in the epilogue of the base GEMM's tile (one extra
(BLOCK_M × r) @ (r × BLOCK_N) dot per tile). With segments (batched TTT) the rows come in runs aligned to
a tile table, each run with its own Y or R slice, still one launch. Compiled on CUDA with tiles autotuned
per shape bucket (GPU_TILES); under `TRITON_INTERPRET=1` (the CPU tests) with fixed small tiles.
`finemed_kernels.lora` builds the LoRA forward and backward from it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The widest rank the epilogue's BLOCK_R covers.
MAX_RANK = 128

# Triton's CPU interpreter multiplies 16-bit tiles wrongly (bf16 `tl.dot` gave errors of 1e10), so under it
# 16-bit tiles are widened to fp32 before the dot; compiled on a GPU they go to the tensor cores as they are
# (fp32 accumulation either way). fp32 inputs use exact IEEE products, not TF32.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _matmul_lowrank(
    x_ptr, y_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, tile_seg_ptr, tile_row_ptr, seg_end_ptr,
    M, N, K, R, M_KEY, N_KEY, K_KEY,
    sxm, sxk, syk, syn, sys, slm, slr, srr, srn, srs, scm, scn,
    alpha, beta,
    HAS_BASE: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SEGMENTED:
        # Row tiles never straddle segments (the host's tile table), so one tile has one adapter: its Y and
        # R are that segment's slices (stride 0 for an operand every segment shares).
        seg = tl.load(tile_seg_ptr + pid_m).to(tl.int64)
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(seg_end_ptr + seg)
        y_ptr += seg * sys
        r_ptr += seg * srs
    else:
        row0 = pid_m * BLOCK_M
        row_end = M
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                         mask=(rm[:, None] < row_end) & (kk[None, :] < K), other=0.0)
            yt = tl.load(y_ptr + kk[:, None] * syk + rn[None, :] * syn,
                         mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                yt = yt.to(tl.float32)
            acc += tl.dot(xt, yt, input_precision="ieee")
        acc = acc * alpha
    if HAS_LOWRANK:
        rr = tl.arange(0, BLOCK_R)
        lt = tl.load(l_ptr + rm[:, None] * slm + rr[None, :] * slr,
                     mask=(rm[:, None] < row_end) & (rr[None, :] < R), other=0.0)
        rt = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            lt = lt.to(tl.float32)
            rt = rt.to(tl.float32)
        acc += beta * tl.dot(lt, rt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * scm + rn[None, :] * scn
    c_mask = (rm[:, None] < row_end) & (rn[None, :] < N)
    if ACCUMULATE:  # the split design's epilogue: C += the terms above, C read once and written once
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# Tiles for compiled runs (CUDA), autotuned per shape: the usual Hopper bf16 GEMM tiles (128x256 and 256x128
# with 8 warps for the big projections, 128x128 and 64x128 for smaller ones) plus thin-N tiles for the
# rank-r outputs (xa, gb, N = r). Unmeasured: which one wins per 8B projection is what
# `TRITON_PRINT_AUTOTUNING=1 python bench/lora_kernels.py` prints on a GPU. Under the interpreter (CPU tests)
# autotuning would time every tile on the CPU, so there the fixed small tiles of `matmul_lowrank` are used.
def _cfg(bm: int | None, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    tiles = {"BLOCK_N": bn, "BLOCK_K": bk} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


GPU_TILES = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
             (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 32, 128, 4, 4), (64, 16, 128, 4, 4)]
# Segmented calls (batched TTT) fix BLOCK_M on the host (the tile table aligns row tiles to segment starts).
GPU_ROW_TILES = sorted({(bn, bk, w, st) for _, bn, bk, w, st in GPU_TILES})


def prune_tiles(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles far larger than the output (a 256-wide tile over a rank-16 output is 15/16 masked), and
    the K-tile choice when there is no K loop; keeps at least the smallest tile."""
    m, n = named_args["M"], named_args["N"]
    fit_m = max(16, triton.next_power_of_2(m))
    fit_n = max(16, triton.next_power_of_2(n))
    kept, seen = [], set()
    for c in configs:
        kw = c.kwargs
        if kw.get("BLOCK_M", 0) > fit_m or kw["BLOCK_N"] > fit_n:
            continue
        shape = (kw.get("BLOCK_M"), kw["BLOCK_N"], kw["BLOCK_K"] if kwargs.get("HAS_BASE", True) else 0,
                 c.num_warps, c.num_stages)
        if shape not in seen:
            seen.add(shape)
            kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs.get("BLOCK_M", 0), c.kwargs["BLOCK_N"]))]


def _bench(kernel_call: object, quantiles: object) -> object:
    """Triton's timer with shorter trials than its default (25 ms warm-up, 100 ms): a tile that is not
    within noise of the best over 20 ms is not the one to keep, and each new shape bucket is timed once."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Tuned once per power-of-two bucket of M, N and K (M_KEY, N_KEY, K_KEY), not per exact size: token counts
# change at every training step (packed rows) and would otherwise be re-tuned each time.
_KEY = ["M_KEY", "N_KEY", "K_KEY", "R", "HAS_BASE", "HAS_LOWRANK", "ACCUMULATE", "SEGMENTED"]
# restore_value: an ACCUMULATE launch adds into C, so each timed trial must start from the same C.
matmul_lowrank_tuned = triton.autotune(
    configs=[_cfg(*t) for t in GPU_TILES], key=_KEY, prune_configs_by={"early_config_prune": prune_tiles},
    restore_value=["c_ptr"], do_bench=_bench)(_matmul_lowrank)
matmul_lowrank_rows_tuned = triton.autotune(
    configs=[_cfg(None, *t) for t in GPU_ROW_TILES], key=[*_KEY, "BLOCK_M"],
    prune_configs_by={"early_config_prune": prune_tiles}, restore_value=["c_ptr"], do_bench=_bench)(_matmul_lowrank)
# Below this many multiply-adds a GEMM is launch-bound: the fixed tiles serve it, untimed (this also keeps
# the compiled kernel tests, at small odd shapes, from tuning hundreds of shapes). Unmeasured threshold.
TUNE_MIN_MACS = 1 << 24


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=64)
def _tile_table(segments: tuple[int, ...], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row tiles aligned to segment starts: each tile's segment, first row, and every segment's end row."""
    segs, rows, ends, start = [], [], [], 0
    for i, n in enumerate(segments):
        for row in range(start, start + n, block_m):
            segs.append(i)
            rows.append(row)
        start += n
        ends.append(start)
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (segs, rows, ends))


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(row, column, segment) strides of a shared 2-D operand (segment stride 0) or a per-segment 3-D one."""
    return (t.stride(0), t.stride(1), 0) if t.dim() == 2 else (t.stride(1), t.stride(2), t.stride(0))


def matmul_lowrank(x: torch.Tensor | None, y: torch.Tensor | None,
                   low: tuple[torch.Tensor, torch.Tensor] | None = None, alpha: float = 1.0, beta: float = 1.0,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   segments: tuple[int, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`α·(x @ y) + β·(L @ R) + bias` for 2-D x (M, K), y (K, N), L (M, r), R (r, N), any strides.

    With `segments` (token counts summing to M), rows come in runs and run i uses `y[i]` (K, N) and `R[i]`
    (r, N) where y or R is 3-D (one slice per segment); a 2-D operand is shared by every run.
    With `out` (M, N), the result is added into it in place and `out` returned; x and y may then be None
    (no base product: only the low-rank term is added, the split design's epilogue).
    """
    if x is None or y is None:
        if out is None or low is None:
            raise ValueError("without x and y, matmul_lowrank adds L @ R into `out`: pass both")
        (m, n), k = out.shape, 0
    else:
        m, k = x.shape
        k2, n = y.shape[-2:]
        if k != k2:
            raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)}, y is {tuple(y.shape)}")
    accumulate = out is not None
    first = x if x is not None else low[0]
    if out is None:
        out = torch.empty(m, n, device=first.device, dtype=out_dtype or first.dtype)
    if x is None or y is None:
        x = y = first  # placeholders, never read when HAS_BASE is False
    lo, ro = low if low is not None else (x, y)  # placeholders, never read when HAS_LOWRANK is False
    r = lo.shape[1] if low is not None else 1
    # tl.dot needs every block dimension >= 16. Interpreted (the CPU tests), blocks are fixed and small.
    bm = _block(max(segments, default=1) if segments is not None else m, 16, 64)
    bn, bk = _block(n, 16, 64), _block(k, 16, 32)
    br = _block(r, 16, MAX_RANK)
    if segments is not None:
        tiles = _tile_table(tuple(segments), bm, first.device)
        grid_m = tiles[0].numel()
    else:
        tiles = (first, first, first)  # placeholders, never read when SEGMENTED is False
        grid_m = triton.cdiv(m, bm)
    if grid_m == 0 or n == 0:
        return out if accumulate else out.zero_()
    syk, syn, sys = _strides3(y)
    srr, srn, srs = _strides3(ro)
    args = (x, y, lo, ro, bias if bias is not None else first, out, *tiles,
            m, n, k, r, *(triton.next_power_of_2(max(v, 1)) for v in (m, n, k)),
            x.stride(0), x.stride(1), syk, syn, sys, lo.stride(0), lo.stride(1), srr, srn, srs,
            out.stride(0), out.stride(1),
            float(alpha), float(beta))
    flags = dict(HAS_BASE=k > 0, HAS_LOWRANK=low is not None, HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
                 UPCAST=INTERPRETED or first.dtype == torch.float32, SEGMENTED=segments is not None, BLOCK_R=br)
    if INTERPRETED or m * n * (k + r) < TUNE_MIN_MACS:
        _matmul_lowrank[(grid_m, triton.cdiv(n, bn))](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    elif segments is not None:
        matmul_lowrank_rows_tuned[lambda meta: (grid_m, triton.cdiv(n, meta["BLOCK_N"]))](*args, **flags,
                                                                                          BLOCK_M=bm)
    else:
        matmul_lowrank_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
            *args, **flags)
    return out

