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

Order in this file: float64 reference, plain-torch implementation, Triton kernel and
launcher, registration. Kernels: C++ in csrc/temporal_update.cpp (CPU), Triton here (CUDA).

Triton design: one launch per (value dtype, state dtype) group of the list, usually one for
the whole model. Each program owns up to CHUNK consecutive elements of one tensor, found in an
int64 task table [T, 5] (value, counts and moments addresses, numel, first element) that is
uploaded once and cached by its content, so a training step uploads nothing. Arithmetic in the
state's dtype (float32), in float64 when the values or the state are float64.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _triton_config as tcfg
from ._library import LIB, M2, MEAN, SHIFT, STATE_DTYPES, check, check_float_input, check_state, mean_of
from ._triton_config import tl, triton

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


if triton is not None:
    @triton.jit
    def _temporal_update_kernel(
        Tasks,  # [T, 5] int64: value, counts, moments addresses, numel, first element of the task
        VALUE: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ):
        task = Tasks + tl.program_id(0).to(tl.int64) * 5
        V = tl.load(task).to(tl.pointer_type(VALUE))            # [numel] values
        Count = tl.load(task + 1).to(tl.pointer_type(tl.int32))  # [numel] counts, in place
        M = tl.load(task + 2).to(tl.pointer_type(STATE))        # [3, numel] MEAN, M2, SHIFT, in place
        numel = tl.load(task + 3)
        start = tl.load(task + 4)
        end = tl.minimum(start + CHUNK, numel)
        for e0 in range(start, end, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            ok = e < end
            v = tl.load(V + e, mask=ok, other=0.0).to(ACC)
            finite = ok & (tl.abs(v) < float("inf"))  # false for NaN and +-Inf
            v = tl.where(finite, v, 0.0)  # skipped values must not make inf - inf below
            c_old = tl.load(Count + e, mask=ok, other=0)
            first = finite & (c_old == 0)
            shift = tl.where(first, v.to(STATE), tl.load(M + numel + numel + e, mask=ok, other=0.0))
            c = c_old + finite.to(tl.int32)
            mean_old = tl.load(M + e, mask=ok, other=0.0).to(ACC)
            d = v - shift.to(ACC)  # small: weights move slowly
            delta = d - mean_old
            mean_new = mean_old + delta / tl.maximum(c, 1).to(ACC)
            m2 = tl.load(M + numel + e, mask=ok, other=0.0).to(ACC) + delta * (d - mean_new)
            # A skipped (non-finite) value writes nothing.
            tl.store(Count + e, c, mask=finite)
            tl.store(M + e, mean_new.to(STATE), mask=finite)
            tl.store(M + numel + e, m2.to(STATE), mask=finite)
            tl.store(M + numel + numel + e, shift, mask=first)


_TASK_TABLES: OrderedDict = OrderedDict()  # (device, CHUNK, tensors) -> task table on device
_TASK_TABLES_KEPT = 32


def _task_table(tensors, chunk: int, device: torch.device) -> torch.Tensor:
    """The [T, 5] int64 task table of `tensors` ((value, counts, moments, numel) tuples).

    Cached by its own content (addresses and sizes), so a hit is always the right table.
    """
    key = (device, chunk, tuple(tensors))
    table = _TASK_TABLES.get(key)
    if table is None:
        rows = [(v, c, m, n, start) for v, c, m, n in tensors for start in range(0, n, chunk)]
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _TASK_TABLES[key] = table
        if len(_TASK_TABLES) > _TASK_TABLES_KEPT:
            _TASK_TABLES.popitem(last=False)
    else:
        _TASK_TABLES.move_to_end(key)
    return table


def temporal_update_triton(values, counts, moments) -> None:
    """Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), one launch per dtype group."""
    check_args(values, counts, moments)
    tcfg.require(values[0].device)
    groups: dict = {}
    keep = []  # contiguous copies of strided values live until their launch is queued
    for v, c, m in zip(values, counts, moments):
        if v.numel() == 0:
            continue
        v = v.contiguous()
        keep.append(v)
        groups.setdefault((v.device, v.dtype, m.dtype), []).append(
            (v.data_ptr(), c.data_ptr(), m.data_ptr(), v.numel()))
    for (device, v_dtype, m_dtype), tensors in groups.items():
        cfg = tcfg.launch_config("temporal_update", device)
        table = _task_table(tensors, cfg["CHUNK"], device)
        wide = torch.float64 in (v_dtype, m_dtype)
        with tcfg.device_guard(device):
            _temporal_update_kernel[(table.shape[0],)](
                table, VALUE=tcfg.triton_type(v_dtype), STATE=tcfg.triton_type(m_dtype),
                ACC=tl.float64 if wide else tl.float32,
                BLOCK=cfg["BLOCK"], CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"])


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::temporal_update")
def _(values, counts, moments):
    return None
