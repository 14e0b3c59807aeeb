"""Op benchmark cases shared by the pytest-benchmark file and the runnable report.

A case is (op, backend, shape, dtype) -> a zero-argument callable plus the bytes it moves.
Bytes moved (read + written) is the GB/s convention for every op, a plain copy included, so a
kernel's GB/s compares directly with the copy's: the machine's attainable bandwidth.
"""
from __future__ import annotations

import torch

from lrfluct_fast import ops

SHAPES = [(1024, 1024), (4096, 4096), (4096, 8192)]
BACKENDS = ["cpp", "torch", "reference"]       # on CPU tensors
CUDA_BACKENDS = ["triton", "torch"]            # on CUDA tensors
OPS = ["accumulate_stats", "temporal_update", "neuron_rms", "copy"]


def _stats_state(n):
    return torch.zeros(3, n, dtype=torch.int64), torch.zeros(3, n, dtype=ops.STATS_DTYPE)


def make_case(op: str, backend: str, shape, dtype=torch.float32, device="cpu"):
    """Returns (fn, bytes_moved) or None where the combination does not exist.

    "cpp" and "triton" call the dispatched op (C++ on CPU tensors, Triton on CUDA tensors)."""
    x = torch.randn(shape, device=device).to(dtype)
    es, numel = x.element_size(), x.numel()
    if op == "copy":
        dst = torch.empty_like(x)
        return (lambda: dst.copy_(x)), 2 * numel * es
    if op == "accumulate_stats":
        counts, moments = (t.to(device) for t in _stats_state(shape[1]))
        if backend == "reference":
            return (lambda: ops.merge_stats_torch(counts, moments, *ops.batch_stats_reference(x))), numel * es
        accumulate = ops.accumulate_stats_torch if backend == "torch" else ops.accumulate_stats
        return (lambda: accumulate(x, counts, moments)), numel * es
    if op == "temporal_update":
        if backend == "reference":
            return None  # the reference of a trajectory needs all snapshots: not a streaming op
        state = ops.new_state(x)
        update = {"cpp": ops.temporal_update, "triton": ops.temporal_update,
                  "torch": ops.temporal_update_torch}[backend]
        # after the first call (warm-up), on finite values: read the value and the float32 shift,
        # read and write the float32 mean and M2 (ops/temporal_update.py)
        return (lambda: update([x], *([t] for t in state))), numel * (es + 4 + 2 * 2 * 4)
    if op == "neuron_rms":
        # weight_mode="neuron"'s step on a [out, in] weight: each row's RMS, then the temporal
        # update of those `out` values; one read of the weight. "cpp": the C++ step plan.
        if backend == "reference":
            return None
        rms = torch.empty(shape[0], device=device)
        state = [[t] for t in ops.new_state(rms)]
        if backend == "cpp":
            from lrfluct_fast import _C
            plan = _C.TemporalPlan([rms], *state, [], [(x, 0, rms)])
            return (lambda: plan.run(ops.FLUSH_EVERY)), numel * es
        update = ops.temporal_update_torch if backend == "torch" else ops.temporal_update

        def torch_ops():  # LayerState.weight_observation's ops, then the update
            update([torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).div_(shape[1] ** 0.5)],
                   *state)
        return torch_ops, numel * es
    raise ValueError(op)
