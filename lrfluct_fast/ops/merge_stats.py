"""merge_stats: in-place Chan merge of batch statistics into running statistics.

    n = na + nb,  delta = mean_b - mean_a
    mean = mean_a + delta * nb / n
    M2   = M2_a + M2_b + delta^2 * na * nb / n
and the integer counts add. Means are held relative to shifts (see _library): the running
state keeps its shift (or adopts the batch's when it has no observation yet), and delta is
computed as (shift_b - shift_a) + (mean_b - mean_a). State and batch moments are float64
(ops.STATS_DTYPE): a mean drifting over a million batches keeps its digits. Merging is exact up
to rounding and order-independent, so statistics of a stream of batches equal those of one
batch holding every row.

The float64 reference of a merged stream is batch_stats_reference of all its rows.
Order in this file: plain-torch implementation, Triton kernel and launcher, registration.
Kernels: C++ in csrc/merge_stats.cpp (CPU), Triton here (CUDA): elementwise over N in
float64 (O(N) work once per backward: the precision is free). `_merge_into` is also the last
step of accumulate_stats' combine kernel (batch_stats.py).
"""
from __future__ import annotations

import torch

from . import _triton_config as tcfg
from ._library import COUNT, LIB, M2, MEAN, SHIFT, STATS_DTYPE, check, check_state
from ._triton_config import tl, triton

SCHEMA = ("merge_stats(Tensor(a!) counts, Tensor(b!) moments, "
          "Tensor batch_counts, Tensor batch_moments) -> ()")


def check_args(counts, moments, batch_counts, batch_moments) -> None:
    check(isinstance(counts, torch.Tensor) and counts.dim() == 2 and counts.shape[0] == 3,
          f"counts must be an int64 tensor [3, N], got {getattr(counts, 'shape', type(counts))}")
    n, device = counts.shape[1], counts.device
    check_state("counts", counts, (3, n), (torch.int64,), device)
    check_state("moments", moments, (3, n), (STATS_DTYPE,), device)
    check_state("batch_counts", batch_counts, (3, n), (torch.int64,), device)
    check_state("batch_moments", batch_moments, (3, n), (STATS_DTYPE,), device)


def merge_stats_torch(counts, moments, batch_counts, batch_moments) -> None:
    check_args(counts, moments, batch_counts, batch_moments)
    na = counts[COUNT].double()
    nb = batch_counts[COUNT].double()
    n = (na + nb).clamp(min=1)
    shift = torch.where((na == 0) & (nb > 0), batch_moments[SHIFT], moments[SHIFT]).double()
    mean_a = moments[MEAN].double()  # 0 while na == 0, whatever the shift
    mean_b = (batch_moments[SHIFT].double() - shift) + batch_moments[MEAN].double()
    delta = mean_b - mean_a
    moments[MEAN] = mean_a + delta * nb / n
    moments[M2] = moments[M2].double() + batch_moments[M2].double() + delta.square() * na * nb / n
    moments[SHIFT] = shift
    counts.add_(batch_counts)


if triton is not None:
    @triton.jit
    def _merge_into(Counts, Moments, N, cols, ok, n_b, pos_b, nonfinite_b, mean_b, m2_b, shift_b):
        """Merge one batch's statistics of neurons `cols` into the running state (Counts,
        Moments) in place, float64; also the combine step of batch_stats' accumulate path."""
        n_a = tl.load(Counts + cols, mask=ok, other=0)
        mean_a = tl.load(Moments + cols, mask=ok, other=0.0)  # 0 while n_a == 0
        m2_a = tl.load(Moments + N + cols, mask=ok, other=0.0)
        shift_a = tl.load(Moments + N + N + cols, mask=ok, other=0.0)
        # The state keeps its shift, or adopts the batch's while it has no observation.
        shift = tl.where(n_a > 0, shift_a, shift_b)
        na = n_a.to(tl.float64)
        nb = n_b.to(tl.float64)
        n = tl.maximum(na + nb, 1.0)
        delta = ((shift_b - shift) + mean_b) - mean_a
        take = ok & (n_b > 0)  # an empty batch leaves the moments bit for bit
        tl.store(Moments + cols, mean_a + delta * (nb / n), mask=take)
        tl.store(Moments + N + cols, m2_a + m2_b + delta * delta * (na * nb / n), mask=take)
        tl.store(Moments + N + N + cols, shift, mask=take)
        tl.store(Counts + cols, n_a + n_b, mask=ok)
        pos = cols + N
        tl.store(Counts + pos, tl.load(Counts + pos, mask=ok) + pos_b, mask=ok)
        nonfinite = pos + N
        tl.store(Counts + nonfinite, tl.load(Counts + nonfinite, mask=ok) + nonfinite_b, mask=ok)

    @triton.jit
    def _merge_batch_into(Counts, Moments, BatchCounts, BatchMoments, N, cols, ok):
        """_merge_into with the batch's statistics of neurons `cols` read from [3, N] tensors."""
        _merge_into(Counts, Moments, N, cols, ok,
                    tl.load(BatchCounts + cols, mask=ok, other=0),
                    tl.load(BatchCounts + N + cols, mask=ok, other=0),
                    tl.load(BatchCounts + N + N + cols, mask=ok, other=0),
                    tl.load(BatchMoments + cols, mask=ok, other=0.0),
                    tl.load(BatchMoments + N + cols, mask=ok, other=0.0),
                    tl.load(BatchMoments + N + N + cols, mask=ok, other=0.0))

    @triton.jit
    def _merge_stats_kernel(
        Counts,        # [3, N] int64, updated in place: COUNT, POSITIVE, NONFINITE
        Moments,       # [3, N] float64, updated in place: MEAN, M2, SHIFT
        BatchCounts,   # [3, N] int64
        BatchMoments,  # [3, N] float64
        N, BLOCK: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        _merge_batch_into(Counts, Moments, BatchCounts, BatchMoments, N, cols, ok)


def merge_stats_triton(counts, moments, batch_counts, batch_moments) -> None:
    """Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    check_args(counts, moments, batch_counts, batch_moments)
    tcfg.require(counts.device)
    n = counts.shape[1]
    if n == 0:
        return
    cfg = tcfg.launch_config("merge_stats", counts.device, cols=n)
    with tcfg.device_guard(counts.device):
        _merge_stats_kernel[(tcfg.cdiv(n, cfg["BLOCK"]),)](
            counts, moments, batch_counts, batch_moments, n,
            BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::merge_stats")
def _(counts, moments, batch_counts, batch_moments):
    return None
