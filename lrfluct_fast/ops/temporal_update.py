"""temporal_update: per-element running (count, mean, M2) of tensors' values over calls.

One call updates a whole list of tensors (every weight and bias of a model after an
optimizer step). Each element is shifted by its first finite value s, then Welford's update
runs on d = v - s:
    count += 1;  delta = d - mean;  mean += delta / count;  M2 += delta * (d - mean)
so float32 state keeps the precision of fluctuations far smaller than the value itself
(weights near 0.3 that move 1e-5 a step). Non-finite values are skipped for that element;
`calls - count` is how many were skipped.
State per value tensor of shape S: counts int32 [S] (a count of steps, far below 2^31),
moments float32/float64 [3, *S]: rows MEAN (of v - s), M2, SHIFT (s). The element's mean
is moments[SHIFT] + moments[MEAN]; its population variance moments[M2] / counts.

Order in this file: float64 reference, plain-torch implementation, registration.
Kernels: C++ in csrc/temporal_update.cpp (CPU).
"""
from __future__ import annotations

import torch

from ._library import LIB, M2, MEAN, SHIFT, STATE_DTYPES, check, check_float_input, check_state, mean_of

SCHEMA = "temporal_update(Tensor[] values, Tensor(a!)[] counts, Tensor(b!)[] moments) -> ()"


def check_args(values, counts, moments) -> None:
    for name, lst in (("values", values), ("counts", counts), ("moments", moments)):
        check(isinstance(lst, (list, tuple)), f"{name} must be a list of tensors")
    check(len(values) > 0, "values must be a non-empty list of tensors")
    check(len(counts) == len(values) and len(moments) == len(values),
          f"values, counts and moments must have the same length, got "
          f"{len(values)}, {len(counts)}, {len(moments)}")
    for i, (v, c, m) in enumerate(zip(values, counts, moments)):
        check_float_input(f"values[{i}]", v)
        check_state(f"counts[{i}]", c, v.shape, (torch.int32,), v.device)
        check_state(f"moments[{i}]", m, (3, *v.shape), STATE_DTYPES, v.device)


def new_state(value: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Zeroed (counts, moments) for one value tensor."""
    return (torch.zeros(value.shape, dtype=torch.int32, device=value.device),
            torch.zeros((3, *value.shape), dtype=dtype, device=value.device))


def temporal_stats(counts: torch.Tensor, moments: torch.Tensor):
    """(count, mean, population var) from the state; var is nan where count is 0."""
    n = counts.to(moments.dtype)
    return counts, mean_of(moments), moments[M2] / n


def temporal_stats_reference(snapshots: torch.Tensor):
    """Float64 (count, mean, population var) over dim 0 of stacked snapshots [T, *S]."""
    x = snapshots.double()
    finite = torch.isfinite(x)
    count = finite.sum(0)
    mean = torch.where(finite, x, 0).sum(0) / count
    var = torch.where(finite, x - mean, 0).square().sum(0) / count
    return count, mean, var


def temporal_update_torch(values, counts, moments) -> None:
    check_args(values, counts, moments)
    for v, c, m in zip(values, counts, moments):
        finite = torch.isfinite(v)
        first = finite & (c == 0)
        m[SHIFT] = torch.where(first, v.to(m.dtype), m[SHIFT])
        c.add_(finite.to(c.dtype))
        d = torch.where(finite, v.to(torch.float64) - m[SHIFT].double(), 0)
        mean_old = m[MEAN].double()
        delta = d - mean_old
        mean_new = mean_old + torch.where(finite, delta / c.clamp(min=1), 0)
        m[M2] += torch.where(finite, delta * (d - mean_new), 0).to(m.dtype)
        m[MEAN] = mean_new.to(m.dtype)


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::temporal_update")
def _(values, counts, moments):
    return None
