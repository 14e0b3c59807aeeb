"""merge_stats: in-place Chan merge of batch statistics into running statistics.

    n = na + nb,  delta = mean_b - mean_a
    mean = mean_a + delta * nb / n
    M2   = M2_a + M2_b + delta^2 * na * nb / n
and the integer counts add. Means are held relative to shifts (see _library): the running
state keeps its shift (or adopts the batch's when it has no observation yet), and delta is
computed as (shift_b - shift_a) + (mean_b - mean_a) in float64. Merging is exact up to rounding and order-independent, so
statistics of a stream of batches equal those of one batch holding every row.

The float64 reference of a merged stream is batch_stats_reference of all its rows.
Order in this file: plain-torch implementation, registration.
Kernels: C++ in csrc/merge_stats.cpp (CPU).
"""
from __future__ import annotations

import torch

from ._library import COUNT, LIB, M2, MEAN, SHIFT, STATE_DTYPES, check, check_state

SCHEMA = ("merge_stats(Tensor(a!) counts, Tensor(b!) moments, "
          "Tensor batch_counts, Tensor batch_moments) -> ()")


def check_args(counts, moments, batch_counts, batch_moments) -> None:
    check(isinstance(counts, torch.Tensor) and counts.dim() == 2 and counts.shape[0] == 3,
          f"counts must be an int64 tensor [3, N], got {getattr(counts, 'shape', type(counts))}")
    n, device = counts.shape[1], counts.device
    check_state("counts", counts, (3, n), (torch.int64,), device)
    check_state("moments", moments, (3, n), STATE_DTYPES, device)
    check_state("batch_counts", batch_counts, (3, n), (torch.int64,), device)
    check_state("batch_moments", batch_moments, (3, n), (moments.dtype,), device)


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


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::merge_stats")
def _(counts, moments, batch_counts, batch_moments):
    return None
