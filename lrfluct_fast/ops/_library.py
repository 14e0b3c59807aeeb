"""The `lrfluct` torch.library namespace and the checks every backend shares.

Schemas are declared here, once, in Python: the package must run (on plain torch ops) when
the C++ extension is not built, so the schema cannot live only in C++. The C++ extension
(`csrc/`) registers CPU kernels when `_C.register_kernels()` is called; Triton adds CUDA kernels.
This module owns the namespace object and the argument checks; it holds no kernels.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("lrfluct", "DEF")

FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)  # temporal (per-element) state
# Batch and running (counts, moments) of activations and gradients are float64 whatever the
# input: O(neurons) numbers, merged once a step, and a variance of data near float32's maximum
# (~1e77) or a mean drifting over a million batches needs the range and the precision.
STATS_DTYPE = torch.float64

# Rows of the packed statistics tensors. Every `moments` tensor (batch, running, temporal) is
# kept relative to a shift, the first finite value seen: moments[MEAN] is the mean of
# (x - moments[SHIFT]). Float32 state then keeps the precision of data far from zero (mean 1e4,
# std 1; weights near 0.3 moving 1e-5), and merges work on small numbers.
COUNT, POSITIVE, NONFINITE = 0, 1, 2
MEAN, M2, SHIFT = 0, 1, 2


def mean_of(moments: torch.Tensor) -> torch.Tensor:
    """The (unshifted) mean held by a moments tensor."""
    return moments[SHIFT] + moments[MEAN]


def moments_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Temporal (per-element) state: float32 whatever the input, float64 for float64 input."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_float_input(name: str, x: torch.Tensor) -> None:
    check(isinstance(x, torch.Tensor), f"{name} must be a tensor, got {type(x).__name__}")
    check(x.dtype in FLOAT_INPUTS,
          f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def neuron_view(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x as [B, N, S] with its dim `dim` (N neurons) in the middle ([B, N] when nothing follows
    it): a view where the layout allows (any contiguous tensor), so an op reads a conv output
    in place."""
    dim = dim % x.dim()
    shape = x.shape
    before = 1
    for s in shape[:dim]:
        before *= s
    after = 1
    for s in shape[dim + 1:]:
        after *= s
    if after == 1:
        return x.reshape(before, shape[dim])
    return x.reshape(before, shape[dim], after)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """An op's input, [R, N] or [B, N, S], as [rows, N] (a copy for [B, N, S] with S > 1)."""
    if x.dim() == 2:
        return x
    return x.movedim(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1])


def check_state(name: str, t: torch.Tensor, shape, dtypes, device) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    check(tuple(t.shape) == tuple(shape),
          f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    check(t.dtype in dtypes, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    check(t.device == device, f"{name} must be on {device}, got {t.device}")
    check(t.is_contiguous(), f"{name} must be contiguous (it is updated in place)")
