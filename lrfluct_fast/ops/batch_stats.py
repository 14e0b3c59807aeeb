"""batch_stats: per-column statistics of a [R, N] tensor in one pass.

Returns two packed tensors so a layer's state is two buffers, not six:
  counts  int64 [3, N]: finite count, count of finite x > 0, count of non-finite x
  moments float [3, N]: MEAN of (x - SHIFT), M2 (sum of squared deviations) and SHIFT (the
                        column's first finite value) of the finite values; float32, or
                        float64 for float64 input. The column mean is SHIFT + MEAN.
Non-finite values are excluded from the moments and counted. A column with no finite value has
all moments 0.

Order in this file: float64 reference, plain-torch implementation, registration.
Kernels: C++ in csrc/batch_stats.cpp (CPU).
"""
from __future__ import annotations

import torch

from ._library import LIB, check, check_float_input, moments_dtype

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


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::batch_stats")
def _(x):
    n = x.shape[1]
    return x.new_empty((3, n), dtype=torch.int64), x.new_empty((3, n), dtype=moments_dtype(x.dtype))
