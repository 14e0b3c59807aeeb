"""accumulate_stats: a tensor's per-neuron statistics merged into a running state, in place.

    accumulate_stats(x, counts, moments, pending_counts?, pending_moments?, into_counts?, into_moments?)

is merge_stats(counts, moments, *batch_stats(x)) without the intermediate tensors and, when
the pending batch (pending_counts, pending_moments) is given, merge_stats(into_counts,
into_moments, pending_counts, pending_moments) in the same pass. It is a layer's backward:
dL/dz's statistics into the gradient state, and the activation statistics its forward left
pending into the activation state. On the GPU that is two launches (batch_stats' chunk kernel,
then its combine kernel merging both) with no fill and no allocation but the chunk partials.

x is [R, N] or [B, N, S] as for batch_stats; the states are [3, N] int64 counts and float64
moments (ops.STATS_DTYPE). The float64 reference is batch_stats_reference of every row merged.
Order in this file: plain-torch implementation, Triton launcher, registration. Kernels: C++ in
csrc/accumulate_stats.cpp (CPU), Triton in batch_stats.py (CUDA).
"""
from __future__ import annotations

import torch

from . import _triton_config as tcfg
from ._library import LIB, STATS_DTYPE, check, check_state
from .batch_stats import batch_stats_torch, check_args as check_input, launch_batch_stats
from .merge_stats import merge_stats_torch

SCHEMA = ("accumulate_stats(Tensor x, Tensor(a!) counts, Tensor(b!) moments, "
          "Tensor? pending_counts=None, Tensor? pending_moments=None, "
          "Tensor(c!)? into_counts=None, Tensor(d!)? into_moments=None) -> ()")


def check_args(x, counts, moments, pending_counts=None, pending_moments=None, into_counts=None,
               into_moments=None) -> None:
    check_input(x)
    n, device = x.shape[1], x.device
    check_state("counts", counts, (3, n), (torch.int64,), device)
    check_state("moments", moments, (3, n), (STATS_DTYPE,), device)
    pending = (pending_counts, pending_moments, into_counts, into_moments)
    given = [t is not None for t in pending]
    check(all(given) or not any(given),
          "pending_counts, pending_moments, into_counts and into_moments come together, got "
          + ", ".join("a tensor" if g else "None" for g in given))
    if all(given):
        for name, t, dtype in (("pending_counts", pending_counts, torch.int64),
                               ("pending_moments", pending_moments, STATS_DTYPE),
                               ("into_counts", into_counts, torch.int64),
                               ("into_moments", into_moments, STATS_DTYPE)):
            check_state(name, t, (3, n), (dtype,), device)


def accumulate_stats_torch(x, counts, moments, pending_counts=None, pending_moments=None,
                           into_counts=None, into_moments=None) -> None:
    check_args(x, counts, moments, pending_counts, pending_moments, into_counts, into_moments)
    merge_stats_torch(counts, moments, *batch_stats_torch(x))
    if pending_counts is not None:
        merge_stats_torch(into_counts, into_moments, pending_counts, pending_moments)


def accumulate_stats_triton(x, counts, moments, pending_counts=None, pending_moments=None,
                            into_counts=None, into_moments=None) -> None:
    """Two launches: batch_stats' chunk kernel, then its combine kernel merging in place."""
    check_args(x, counts, moments, pending_counts, pending_moments, into_counts, into_moments)
    tcfg.require(x.device)
    pending = None
    if pending_counts is not None:
        pending = (pending_counts, pending_moments, into_counts, into_moments)
    launch_batch_stats(x, counts, moments, merge=True, pending=pending)


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::accumulate_stats")
def _(x, counts, moments, pending_counts=None, pending_moments=None, into_counts=None,
      into_moments=None):
    return None
