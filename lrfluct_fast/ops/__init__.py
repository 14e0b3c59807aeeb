"""Statistics ops of the `lrfluct` namespace: one file per op (reference, torch fallback,
registration), C++ CPU kernels in csrc/, registered here for the devices they serve.

Call them through `torch.ops.lrfluct.<op>` or the functions below: the dispatcher picks the
kernel by device (C++ on CPU when built, Triton on CUDA when triton imports, plain torch
otherwise). `<op>_torch` and `<op>_triton` call one implementation directly.
"""
from __future__ import annotations

import torch

from ._library import (COUNT, LIB, M2, MEAN, NONFINITE, POSITIVE, SHIFT, STATS_DTYPE, check, mean_of,
                       moments_dtype, neuron_view)
from ._triton_config import triton_usable
from .batch_stats import batch_stats_reference, batch_stats_torch, batch_stats_triton
from .merge_stats import merge_stats_torch, merge_stats_triton
from .accumulate_stats import accumulate_stats_torch, accumulate_stats_triton
from .temporal_update import (CALLS, ESCAPED, FLUSH_EVERY, FLUSHED, MASTER_COUNT, MASTER_M2,
                              MASTER_MEAN, SKIPPED, new_state, temporal_counts, temporal_stats,
                              temporal_stats_reference, temporal_update_torch,
                              temporal_update_triton, upgrade_single_level)

TORCH_IMPLS = {
    "batch_stats": batch_stats_torch,
    "merge_stats": merge_stats_torch,
    "accumulate_stats": accumulate_stats_torch,
    "temporal_update": temporal_update_torch,
}
TRITON_IMPLS = {
    "batch_stats": batch_stats_triton,
    "merge_stats": merge_stats_triton,
    "accumulate_stats": accumulate_stats_triton,
    "temporal_update": temporal_update_triton,
}
def register_torch_fallback(device_type: str) -> None:
    """Serve `device_type` tensors with the plain-torch implementations."""
    for name, fn in TORCH_IMPLS.items():
        LIB.impl(name, fn, device_type.upper())


def register_triton(device_type: str = "cuda") -> None:
    """Serve `device_type` tensors with the Triton kernels (see triton_usable())."""
    for name, fn in TRITON_IMPLS.items():
        LIB.impl(name, fn, device_type.upper())


def batch_stats(x: torch.Tensor):
    return torch.ops.lrfluct.batch_stats(x)


def merge_stats(counts, moments, batch_counts, batch_moments) -> None:
    torch.ops.lrfluct.merge_stats(counts, moments, batch_counts, batch_moments)


def accumulate_stats(x, counts, moments, pending_counts=None, pending_moments=None,
                     into_counts=None, into_moments=None) -> None:
    torch.ops.lrfluct.accumulate_stats(x, counts, moments, pending_counts, pending_moments,
                                       into_counts, into_moments)


def temporal_update(values, tallies, skipped, moments, masters, flush_every: int = FLUSH_EVERY) -> None:
    # An empty list carries no tensor to dispatch on: refuse it here, with the others' message.
    check(len(values) > 0, "values must be a non-empty list of tensors")
    torch.ops.lrfluct.temporal_update(list(values), list(tallies), list(skipped), list(moments),
                                      list(masters), flush_every)


__all__ = [
    "COUNT", "POSITIVE", "NONFINITE", "MEAN", "M2", "SHIFT", "STATS_DTYPE", "mean_of",
    "moments_dtype", "neuron_view", "accumulate_stats", "accumulate_stats_torch",
    "accumulate_stats_triton",
    "CALLS", "SKIPPED", "ESCAPED", "FLUSHED", "MASTER_MEAN", "MASTER_M2", "MASTER_COUNT",
    "FLUSH_EVERY", "new_state", "temporal_counts", "temporal_stats", "upgrade_single_level",
    "batch_stats", "merge_stats", "temporal_update",
    "batch_stats_reference", "temporal_stats_reference",
    "batch_stats_torch", "merge_stats_torch", "temporal_update_torch",
    "batch_stats_triton", "merge_stats_triton", "temporal_update_triton",
    "TORCH_IMPLS", "TRITON_IMPLS", "register_torch_fallback", "register_triton",
    "triton_usable",
]
