"""batch_stats: per-column statistics of a [R, N] tensor in one pass.

Returns two packed tensors so a layer's state is two buffers, not six:
  counts  int64 [3, N]: finite count, count of finite x > 0, count of non-finite x
  moments float [3, N]: MEAN of (x - SHIFT), M2 (sum of squared deviations) and SHIFT (the
                        column's first finite value) of the finite values; float32, or
                        float64 for float64 input. The column mean is SHIFT + MEAN.
Non-finite values are excluded from the moments and counted. A column with no finite value has
all moments 0.

Order in this file: float64 reference, plain-torch implementation, Triton kernels and
launcher, registration. Kernels: C++ in csrc/batch_stats.cpp (CPU), Triton here (CUDA).

Triton design: one read of x. A grid of (column block x row chunk) programs walks its chunk in
tiles [BLOCK_R, BLOCK_N]. Each tile is reduced in registers in float32 (float64 for float64
input) with the corrected two-pass formula on values shifted by the chunk's shift:
    d = x - shift,  mu = sum(d)/n,  e = d - mu,  mean_t = mu + sum(e)/n,  M2_t = sum(e^2) - sum(e)^2/n
and Chan-merged into the program's running (count, mean, M2), kept in float64: one merge per
column per tile (1/BLOCK_R of the work), so no rounding accumulates across tiles. A program's
shift is the first finite value of its chunk (taken from the first tile that has one), so the
first chunk holding a finite value has the column's first finite value. A second, tiny kernel
Chan-merges the chunks in row order (float64), translating each chunk's mean to that shift.
"""
from __future__ import annotations

import torch

from . import _triton_config as tcfg
from ._library import LIB, check, check_float_input, moments_dtype
from ._triton_config import tl, triton

SCHEMA = "batch_stats(Tensor x) -> (Tensor counts, Tensor moments)"


def check_args(x: torch.Tensor) -> None:
    check_float_input("x", x)
    check(x.dim() == 2, f"x must be a 2-D tensor [rows, neurons], got {x.dim()}-D")


def _masked_stats(x: torch.Tensor, acc: torch.dtype):
    """Two passes over x shifted by each column's first finite value (keeps offset data exact)."""
    if x.shape[0] == 0:
        n = x.shape[1]
        return x.new_zeros((3, n), dtype=torch.int64), x.new_zeros((3, n), dtype=acc)
    finite = torch.isfinite(x)
    first = finite.to(torch.uint8).argmax(0, keepdim=True)
    shift = torch.where(finite.gather(0, first), x.gather(0, first), 0).to(acc)
    d = torch.where(finite, x.to(acc) - shift, 0)
    count = finite.sum(0)
    mean_d = d.sum(0) / count.clamp(min=1)
    m2 = torch.where(finite, d - mean_d, 0).square().sum(0)
    positive = (finite & (x > 0)).sum(0)
    counts = torch.stack([count, positive, x.shape[0] - count])
    return counts, torch.stack([mean_d, m2, shift[0]])


def batch_stats_reference(x: torch.Tensor):
    """Two-pass float64 statistics with SHIFT 0: what every backend is tested against."""
    check_args(x)
    x = x.double()
    finite = torch.isfinite(x)
    count = finite.sum(0)
    mean = torch.where(finite, x, 0).sum(0) / count.clamp(min=1)
    m2 = torch.where(finite, x - mean, 0).square().sum(0)
    counts = torch.stack([count, (finite & (x > 0)).sum(0), x.shape[0] - count])
    return counts, torch.stack([mean, m2, torch.zeros_like(mean)])


def batch_stats_torch(x: torch.Tensor):
    """Plain-torch fallback (two passes, float32 accumulation for narrow inputs)."""
    check_args(x)
    return _masked_stats(x, moments_dtype(x.dtype))


if triton is not None:
    @triton.jit
    def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
        """Merge (n_b, mean_b, M2_b) into (n_a, mean_a, M2_a), float64 means relative to one shift."""
        n = n_a + n_b
        na = n_a.to(tl.float64)
        frac = n_b.to(tl.float64) / tl.maximum(n.to(tl.float64), 1.0)
        delta = tl.where(n_b > 0, mean_b - mean_a, 0.0)  # an empty side changes nothing
        return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (na * frac)

    @triton.jit
    def _batch_stats_chunk_kernel(
        X,            # [R, N] input, any strides
        PartCounts,   # [2, C, N] int64 out: finite count, finite x > 0 count of each row chunk
        PartMoments,  # [3, C, N] float64 out: mean of (x - shift), M2, shift of each row chunk
        R, N, CN,     # CN = C * N
        stride_r, stride_n, tiles_per_chunk,
        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        chunk = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        tile_rows = tl.arange(0, BLOCK_R)
        n = tl.zeros([BLOCK_N], tl.int64)
        pos = tl.zeros([BLOCK_N], tl.int64)
        mean = tl.zeros([BLOCK_N], tl.float64)
        m2 = tl.zeros([BLOCK_N], tl.float64)
        shift = tl.zeros([BLOCK_N], ACC)
        row0 = chunk * tiles_per_chunk * BLOCK_R  # int64: offsets pass 2^31 in big tensors
        for _ in range(0, tiles_per_chunk):
            rows = row0 + tile_rows
            mask = (rows < R)[:, None] & col_ok[None, :]
            x = tl.load(X + rows[:, None] * stride_r + cols[None, :] * stride_n, mask=mask,
                        other=0.0).to(ACC)
            finite = mask & (tl.abs(x) < float("inf"))  # false for NaN and +-Inf
            # Until the chunk has a finite value, the shift is the tile's first finite one.
            first = tl.min(tl.where(finite, tile_rows[:, None], BLOCK_R), axis=0)
            x_first = tl.sum(tl.where(tile_rows[:, None] == first[None, :], x, 0.0), axis=0)
            shift = tl.where(n > 0, shift, x_first)
            n_t = tl.sum(finite.to(tl.int32), axis=0)
            inv_n = 1.0 / tl.maximum(n_t.to(ACC), 1.0)
            d = tl.where(finite, x - shift[None, :], 0.0)
            mu = tl.sum(d, axis=0) * inv_n
            e = tl.where(finite, d - mu[None, :], 0.0)
            sum_e = tl.sum(e, axis=0)
            mean_t = mu.to(tl.float64) + (sum_e * inv_n).to(tl.float64)
            m2_t = (tl.sum(e * e, axis=0) - sum_e * sum_e * inv_n).to(tl.float64)
            n, mean, m2 = _chan_merge(n, mean, m2, n_t.to(tl.int64), mean_t, m2_t)
            pos += tl.sum((finite & (x > 0)).to(tl.int32), axis=0).to(tl.int64)
            row0 += BLOCK_R
        out = chunk * N + cols
        tl.store(PartCounts + out, n, mask=col_ok)
        tl.store(PartCounts + CN + out, pos, mask=col_ok)
        tl.store(PartMoments + out, mean, mask=col_ok)
        tl.store(PartMoments + CN + out, m2, mask=col_ok)
        tl.store(PartMoments + CN + CN + out, shift.to(tl.float64), mask=col_ok)

    @triton.jit
    def _batch_stats_combine_kernel(
        PartCounts,   # [2, C, N] int64: finite count, positive count of each row chunk
        PartMoments,  # [3, C, N] float64: mean of (x - shift), M2, shift of each row chunk
        Counts,       # [3, N] int64 out: COUNT, POSITIVE, NONFINITE
        Moments,      # [3, N] float32/float64 out: MEAN, M2, SHIFT
        R, N, C, CN,  # CN = C * N
        BLOCK: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < N
        n = tl.zeros([BLOCK], tl.int64)
        pos = tl.zeros([BLOCK], tl.int64)
        mean = tl.zeros([BLOCK], tl.float64)
        m2 = tl.zeros([BLOCK], tl.float64)
        shift = tl.zeros([BLOCK], tl.float64)
        part = cols
        for _ in range(0, C):  # in row order: the first chunk with a finite value sets the shift
            n_c = tl.load(PartCounts + part, mask=col_ok, other=0)
            pos += tl.load(PartCounts + CN + part, mask=col_ok, other=0)
            mean_c = tl.load(PartMoments + part, mask=col_ok, other=0.0)
            m2_c = tl.load(PartMoments + CN + part, mask=col_ok, other=0.0)
            shift_c = tl.load(PartMoments + CN + CN + part, mask=col_ok, other=0.0)
            shift = tl.where(n > 0, shift, shift_c)
            n, mean, m2 = _chan_merge(n, mean, m2, n_c, (shift_c - shift) + mean_c, m2_c)
            part += N
        out_ty = Moments.dtype.element_ty
        tl.store(Counts + cols, n, mask=col_ok)
        tl.store(Counts + N + cols, pos, mask=col_ok)
        tl.store(Counts + N + N + cols, R - n, mask=col_ok)
        tl.store(Moments + cols, mean.to(out_ty), mask=col_ok)
        tl.store(Moments + N + cols, m2.to(out_ty), mask=col_ok)
        tl.store(Moments + N + N + cols, shift.to(out_ty), mask=col_ok)


def batch_stats_triton(x: torch.Tensor):
    """Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); float64 input accumulates in float64."""
    check_args(x)
    tcfg.require(x.device)
    rows, cols = x.shape
    acc = moments_dtype(x.dtype)
    counts = x.new_zeros((3, cols), dtype=torch.int64)
    moments = x.new_zeros((3, cols), dtype=acc)
    if rows == 0 or cols == 0:
        return counts, moments
    cfg = tcfg.launch_config("batch_stats", x.device, rows=rows, cols=cols)
    chunks = cfg["chunks"]
    part_counts = x.new_empty((2, chunks, cols), dtype=torch.int64)
    part_moments = x.new_empty((3, chunks, cols), dtype=torch.float64)
    with tcfg.device_guard(x.device):
        _batch_stats_chunk_kernel[(cfg["col_blocks"], chunks)](
            x, part_counts, part_moments, rows, cols, chunks * cols,
            x.stride(0), x.stride(1), cfg["tiles_per_chunk"],
            ACC=tcfg.acc_type(acc), BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"])
        block = cfg["COMBINE_BLOCK"]
        _batch_stats_combine_kernel[(triton.cdiv(cols, block),)](
            part_counts, part_moments, counts, moments, rows, cols, chunks, chunks * cols,
            BLOCK=block, num_warps=cfg["num_warps"])
    return counts, moments


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::batch_stats")
def _(x):
    n = x.shape[1]
    return x.new_empty((3, n), dtype=torch.int64), x.new_empty((3, n), dtype=moments_dtype(x.dtype))
