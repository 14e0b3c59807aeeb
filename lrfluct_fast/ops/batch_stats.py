"""batch_stats: per-neuron statistics of a tensor in one pass.

x is [R, N] (neuron j is column j) or [B, N, S] (neuron j is x[:, j, :], as a conv output
viewed by ops.neuron_view: read in place, no copy). Returns two packed tensors, so a layer's
state is two buffers, not six:
  counts  int64   [3, N]: finite count, count of finite x > 0, count of non-finite x
  moments float64 [3, N]: MEAN of (x - SHIFT), M2 (sum of squared deviations) and SHIFT (the
                          first finite value of a row block) of the finite values.
The neuron's mean is SHIFT + MEAN. Non-finite values are excluded from the moments and counted.
A neuron with no finite value has all moments 0. Finite input never gives an infinite or nan
moment when the true one fits float64 (data near float32's maximum has a variance near 1e77);
float64 input whose M2 exceeds float64 gives M2 = inf, never 0 or nan.

Order in this file: float64 reference, plain-torch implementation, Triton kernels and
launcher, registration. Kernels: C++ in csrc/batch_stats.cpp (CPU), Triton here (CUDA).
The Triton launcher also serves accumulate_stats (the same two kernels, merging into a state).

Triton design: two launches, one read of x, no fill. The chunk kernel's grid is (neuron block
x row chunk) programs, enough for ~4 per SM whether x is tall or wide; each walks its chunk in
tiles [BLOCK_R, BLOCK_N] and keeps a Welford (count, mean, M2) per tile element, in float32
(float64 for float64 input), of the values shifted by the neuron's first finite value in the
chunk's first tile and scaled by a power of two (exact) from that tile's magnitude:
    d = x*sc - shift*sc;  n += 1;  delta = d - mean;  mean += delta/n;  M2 += delta*(d - mean)
No reduction runs inside the loop, so a thread holds its elements' state and no per-neuron
temporaries (70-124 registers on sm_90, tests/triton_sm90_compile.py). After the loop the
elements are pooled per neuron (two passes of plain sums) and written as float64 partials.
The combine kernel pools the chunks of a block of neurons the same way (each mean translated to
the shift of the first chunk that holds a finite value) and writes the result, or merges it
into a running state (accumulate_stats), together with a pending batch into another state.
"""
from __future__ import annotations

import torch

from . import _triton_config as tcfg
from ._library import LIB, STATS_DTYPE, as_rows, check, check_float_input
from ._triton_config import tl, triton

SCHEMA = "batch_stats(Tensor x) -> (Tensor counts, Tensor moments)"


def check_args(x: torch.Tensor) -> None:
    check_float_input("x", x)
    if x.dim() not in (2, 3):
        check(False, f"x must be a 2-D tensor [rows, neurons] or a 3-D [batch, neurons, rest], "
                     f"got {x.dim()}-D")


def batch_stats_reference(x: torch.Tensor):
    """Two-pass float64 statistics with SHIFT 0: what every backend is tested against."""
    check_args(x)
    x = as_rows(x).double()
    finite = torch.isfinite(x)
    count = finite.sum(0)
    mean = torch.where(finite, x, 0).sum(0) / count.clamp(min=1)
    m2 = torch.where(finite, x - mean, 0).square().sum(0)
    counts = torch.stack([count, (finite & (x > 0)).sum(0), x.shape[0] - count])
    return counts, torch.stack([mean, m2, torch.zeros_like(mean)])


def _pow2_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """2^-k with magnitude * 2^-k in [0.5, 1) (1 for 0): exact scaling that keeps sums finite."""
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(magnitude), -exponent)


def _finite_narrow_stats(x: torch.Tensor):
    """batch_stats of finite rows [R, N] (R > 0) narrower than float64, on CPU: torch.var_mean
    in float64 of the values less row 0. No square of a float32 value overflows float64, so
    this needs neither the mask nor the scaling of the general path (a quarter of its ops)."""
    xd = x.double()
    shift = xd[0]
    var, mean_d = torch.var_mean(xd - shift, dim=0, correction=0)
    rows = x.shape[0]
    count = torch.full_like(shift, rows, dtype=torch.int64)
    counts = torch.stack([count, (x > 0).sum(0), torch.zeros_like(count)])
    return counts, torch.stack([mean_d, var * rows, shift])


def batch_stats_torch(x: torch.Tensor):
    """Plain-torch fallback: two passes in float64 on shifted, power-of-two-scaled values (on
    CPU, finite input narrower than float64 takes `_finite_narrow_stats`)."""
    check_args(x)
    x = as_rows(x)
    rows, n = x.shape
    if rows == 0:
        return x.new_zeros((3, n), dtype=torch.int64), x.new_zeros((3, n), dtype=STATS_DTYPE)
    finite = torch.isfinite(x)
    if x.device.type == "cpu" and x.dtype != torch.float64 and bool(finite.all()):
        return _finite_narrow_stats(x)
    first = finite.to(torch.uint8).argmax(0, keepdim=True)
    shift = torch.where(finite.gather(0, first), x.gather(0, first), 0).double()
    xd = torch.where(finite, x.double(), 0)
    sc = _pow2_scale(torch.maximum(xd.abs().amax(0, keepdim=True), shift.abs()))
    d = torch.where(finite, xd * sc - shift * sc, 0)  # |d| < 2: no sum or square overflows
    count = finite.sum(0)
    mean_d = d.sum(0) / count.clamp(min=1)
    e = torch.where(finite, d - mean_d, 0)
    esc = _pow2_scale(e.abs().amax(0))
    m2 = (e * esc).square().sum(0) / esc / esc / sc[0] / sc[0]
    counts = torch.stack([count, (finite & (x > 0)).sum(0), rows - count])
    return counts, torch.stack([mean_d / sc[0], m2, shift[0]])


if triton is not None:
    from .merge_stats import _merge_batch_into, _merge_into

    @triton.jit
    def _pow2_scale_tl(magnitude, ACC: tl.constexpr):
        """2^-k with magnitude * 2^-k in [0.5, 1), at most 2^16 (a neuron whose first values are
        tiny may grow later) and 1 for 0: exact scaling that keeps squares finite."""
        if ACC == tl.float64:
            bits = magnitude.to(tl.int64, bitcast=True)
            biased = tl.minimum(tl.maximum(2045 - ((bits >> 52) & 0x7FF), 1), 1023 + 16)
            biased = tl.where(magnitude > 0, biased, 1023)
            return (biased << 52).to(tl.float64, bitcast=True)
        else:
            bits = magnitude.to(tl.int32, bitcast=True)
            biased = tl.minimum(tl.maximum(253 - ((bits >> 23) & 0xFF), 1), 127 + 16)
            biased = tl.where(magnitude > 0, biased, 127)
            return (biased << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _pool(n, mean, m2, axis: tl.constexpr):
        """(count, mean, M2) of several groups (means relative to one shift) pooled along `axis`:
        mean = sum(n_i mean_i) / n, M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2), two passes of
        plain sums (a tree on the GPU; the interpreter runs a custom tl.reduce element by element)."""
        nf = n.to(mean.dtype)
        count = tl.sum(n, axis=axis)
        pooled = tl.sum(nf * mean, axis=axis) / tl.maximum(count.to(mean.dtype), 1.0)
        dev = tl.where(n > 0, mean - tl.expand_dims(pooled, axis), 0.0)
        return count, pooled, tl.sum(m2, axis=axis) + tl.sum(nf * dev * dev, axis=axis)

    @triton.jit
    def _load_tile(X, t, s_tiles, S, stride_b, stride_s, stride_n, cols, col_ok,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr):
        """Tile t of x (rows [BLOCK_R] of one batch entry) in ACC, 0 where not finite, and its
        finite mask."""
        b = t // s_tiles
        rows = (t - b * s_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < S)[:, None] & col_ok[None, :]
        x = tl.load(X + b * stride_b + rows[:, None] * stride_s + cols[None, :] * stride_n,
                    mask=mask, other=0.0).to(ACC)
        finite = mask & (tl.abs(x) < float("inf"))  # false for NaN and +-Inf
        return tl.where(finite, x, 0.0), finite

    @triton.jit
    def _welford_tile(X, t, s_tiles, S, stride_b, stride_s, stride_n, cols, col_ok, sc, shift_sc,
                      n, pos, mean, m2, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
        """Tile t into the per-element (count, mean, M2) of the scaled, shifted values: no
        reduction across the tile, so no per-neuron temporaries in registers."""
        x, finite = _load_tile(X, t, s_tiles, S, stride_b, stride_s, stride_n, cols, col_ok,
                               ACC, BLOCK_R)
        d = x * sc[None, :] - shift_sc[None, :]
        n += finite.to(tl.int32)
        delta = tl.where(finite, d - mean, 0.0)
        mean += delta / tl.maximum(n, 1).to(ACC)
        m2 += tl.where(finite, delta * (d - mean), 0.0)
        pos += (finite & (x > 0)).to(tl.int32)
        return n, pos, mean, m2

    @triton.jit
    def _batch_stats_chunk_kernel(
        X,            # [B, N, S] input, any strides ([R, N] is B = 1, S = R)
        PartCounts,   # [2, C, N] int64 out: finite count, finite x > 0 count of each chunk
        PartMoments,  # [3, C, N] float64 out: mean of (x - shift), M2, shift of each chunk
        N, S, CN,     # CN = C * N
        stride_b, stride_n, stride_s, s_tiles, tiles, tiles_per_chunk,
        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        chunk = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        t0 = chunk * tiles_per_chunk  # int64: offsets pass 2^31 in big tensors
        t1 = tl.minimum(t0 + tiles_per_chunk, tiles)
        # Each neuron's shift (its first finite value in the chunk's first tile, else 0) and a
        # power-of-two scale from that tile's magnitude: the loop then sums small numbers.
        x, finite = _load_tile(X, t0, s_tiles, S, stride_b, stride_s, stride_n, cols, col_ok,
                               ACC, BLOCK_R)
        tile_rows = tl.arange(0, BLOCK_R)
        first = tl.min(tl.where(finite, tile_rows[:, None], BLOCK_R), axis=0)
        shift = tl.sum(tl.where(tile_rows[:, None] == first[None, :], x, 0.0), axis=0)
        sc = _pow2_scale_tl(tl.maximum(tl.max(tl.abs(x), axis=0), tl.abs(shift)), ACC)
        shift_sc = shift * sc
        n = tl.zeros([BLOCK_R, BLOCK_N], tl.int32)  # a chunk holds < 2^31 rows (launch_batch_stats)
        pos = tl.zeros([BLOCK_R, BLOCK_N], tl.int32)
        mean = tl.zeros([BLOCK_R, BLOCK_N], ACC)
        m2 = tl.zeros([BLOCK_R, BLOCK_N], ACC)
        if INTERPRETED:  # triton 3.6's interpreter cannot take a runtime bound in range()
            t = t0
            while t < t1:
                n, pos, mean, m2 = _welford_tile(X, t, s_tiles, S, stride_b, stride_s, stride_n,
                                                 cols, col_ok, sc, shift_sc, n, pos, mean, m2,
                                                 ACC, BLOCK_R)
                t += 1
        else:
            for t in range(t0, t1):
                n, pos, mean, m2 = _welford_tile(X, t, s_tiles, S, stride_b, stride_s, stride_n,
                                                 cols, col_ok, sc, shift_sc, n, pos, mean, m2,
                                                 ACC, BLOCK_R)
        n_c, mean_c, m2_c = _pool(n, mean, m2, 0)
        inv_sc = 1.0 / sc.to(tl.float64)
        out = chunk * N + cols
        tl.store(PartCounts + out, n_c.to(tl.int64), mask=col_ok)
        tl.store(PartCounts + CN + out, tl.sum(pos, axis=0).to(tl.int64), mask=col_ok)
        tl.store(PartMoments + out, mean_c.to(tl.float64) * inv_sc, mask=col_ok)
        tl.store(PartMoments + CN + out, m2_c.to(tl.float64) * inv_sc * inv_sc, mask=col_ok)
        tl.store(PartMoments + CN + CN + out, shift.to(tl.float64), mask=col_ok)

    @triton.jit
    def _batch_stats_combine_kernel(
        PartCounts, PartMoments,  # [2, C, N] int64 and [3, C, N] float64, from the chunk kernel
        Counts, Moments,          # [3, N] int64 and float64: written, or merged into (MERGE)
        PendCounts, PendMoments,  # PENDING: a batch's [3, N] statistics, merged into...
        IntoCounts, IntoMoments,  # ...this other running state in the same program
        rows, N, C, CN,           # CN = C * N
        MERGE: tl.constexpr, PENDING: tl.constexpr, C_BLOCK: tl.constexpr, COLS: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * COLS + tl.arange(0, COLS)
        col_ok = cols < N
        chunks = tl.arange(0, C_BLOCK)
        part = chunks[:, None].to(tl.int64) * N + cols[None, :]
        ok = (chunks < C)[:, None] & col_ok[None, :]
        n_c = tl.load(PartCounts + part, mask=ok, other=0)
        pos = tl.sum(tl.load(PartCounts + CN + part, mask=ok, other=0), axis=0)
        mean_c = tl.load(PartMoments + part, mask=ok, other=0.0)
        m2_c = tl.load(PartMoments + CN + part, mask=ok, other=0.0)
        shift_c = tl.load(PartMoments + CN + CN + part, mask=ok, other=0.0)
        # every chunk's mean translated to the shift of the first chunk with a finite value
        first = tl.min(tl.where(n_c > 0, chunks[:, None], C_BLOCK), axis=0)
        shift = tl.sum(tl.where(chunks[:, None] == first[None, :], shift_c, 0.0), axis=0)
        mean_c = tl.where(n_c > 0, (shift_c - shift[None, :]) + mean_c, 0.0)
        n, mean, m2 = _pool(n_c, mean_c, m2_c, 0)
        if MERGE:
            _merge_into(Counts, Moments, N, cols, col_ok, n, pos, rows - n, mean, m2, shift)
        else:
            tl.store(Counts + cols, n, mask=col_ok)
            tl.store(Counts + N + cols, pos, mask=col_ok)
            tl.store(Counts + N + N + cols, rows - n, mask=col_ok)
            tl.store(Moments + cols, mean, mask=col_ok)
            tl.store(Moments + N + cols, m2, mask=col_ok)
            tl.store(Moments + N + N + cols, shift, mask=col_ok)
        if PENDING:
            _merge_batch_into(IntoCounts, IntoMoments, PendCounts, PendMoments, N, cols, col_ok)


def launch_batch_stats(x: torch.Tensor, counts: torch.Tensor, moments: torch.Tensor, *,
                       merge: bool, pending=None) -> None:
    """The two Triton kernels on x ([R, N] or [B, N, S]): its statistics written to (counts,
    moments), or merged into them (`merge`); `pending` = (batch counts, batch moments, into
    counts, into moments) is merged too, in the same launch."""
    view = x if x.dim() == 3 else x.t().unsqueeze(0)  # [B, N, S]; [R, N] as [1, N, R]
    batch, cols, length = view.shape
    rows = batch * length
    if cols == 0:
        return
    stride_b, stride_n, stride_s = view.stride()
    cfg = tcfg.launch_config("batch_stats", x.device, rows=rows, cols=cols, batch=batch,
                             length=length, rows_contiguous=stride_s == 1 and length > 1)
    chunks, block_r = cfg["chunks"], cfg["BLOCK_R"]
    part_counts = x.new_empty((2, chunks, cols), dtype=torch.int64)
    part_moments = x.new_empty((3, chunks, cols), dtype=torch.float64)
    s_tiles = tcfg.cdiv(length, block_r)
    check(cfg["tiles_per_chunk"] * block_r < 2**31, "batch_stats: a row chunk must hold < 2^31 rows")
    pend = pending if pending is not None else (counts, moments, counts, moments)
    with tcfg.device_guard(x.device):
        if rows > 0:
            _batch_stats_chunk_kernel[(cfg["col_blocks"], chunks)](
                view, part_counts, part_moments, cols, length, chunks * cols,
                stride_b, stride_n, stride_s, s_tiles, batch * s_tiles, cfg["tiles_per_chunk"],
                ACC=tcfg.acc_type(torch.float64 if x.dtype == torch.float64 else torch.float32),
                BLOCK_R=block_r, BLOCK_N=cfg["BLOCK_N"], INTERPRETED=tcfg.INTERPRET,
                num_warps=cfg["num_warps"])
        _batch_stats_combine_kernel[(tcfg.cdiv(cols, cfg["COLS"]),)](
            part_counts, part_moments, counts, moments, *pend, rows, cols,
            chunks if rows > 0 else 0, chunks * cols, MERGE=merge, PENDING=pending is not None,
            C_BLOCK=cfg["C_BLOCK"], COLS=cfg["COLS"], num_warps=cfg["combine_warps"])


def batch_stats_triton(x: torch.Tensor):
    """Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): two launches, no fill."""
    check_args(x)
    tcfg.require(x.device)
    n = x.shape[1]
    counts = x.new_empty((3, n), dtype=torch.int64)
    moments = x.new_empty((3, n), dtype=STATS_DTYPE)
    launch_batch_stats(x, counts, moments, merge=False)
    return counts, moments


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::batch_stats")
def _(x):
    n = x.shape[1]
    return x.new_empty((3, n), dtype=torch.int64), x.new_empty((3, n), dtype=STATS_DTYPE)
