"""temporal_update: per-element running (count, mean, M2) of tensors' values over calls.

One call updates a whole list of tensors (every weight and bias of a model after an
optimizer step). Each element is shifted by its first finite value s, then Welford's update
runs on d = v - s:
    count += 1;  delta = d - mean;  mean += delta / count;  M2 += delta * (d - mean)
so float32 state keeps the precision of fluctuations far smaller than the value itself
(weights near 0.3 that move 1e-5 a step). Non-finite values are skipped for that element.

State per value tensor of shape S:
- tally int64 [2]: rows CALLS (calls since the state was zeroed) and SKIPPED (non-finite
  values skipped, over all elements);
- skipped int32 [S]: non-finite values skipped per element;
- moments float32/float64 [3, *S]: rows MEAN (of v - s), M2, SHIFT (s).
An element's count is tally[CALLS] - skipped, its mean moments[SHIFT] + moments[MEAN], its
population variance moments[M2] / count. Counts are implicit because weights are almost always
finite: while tally[SKIPPED] is 0 no kernel reads `skipped`, every element's count is the same,
and after the first call no kernel writes the shift. A step then moves 24 bytes per float32
element (read v, shift, mean, M2; write mean, M2) instead of 36 with a per-element count.

Order in this file: float64 reference, plain-torch implementation, Triton kernels and
launcher, registration. Kernels: C++ in csrc/temporal_update.cpp (CPU), Triton here (CUDA).

Triton design: one launch per (value dtype, state dtype) group of the list, usually one for
the whole model, then one tiny launch that counts the call in every tally. Each program owns up
to CHUNK consecutive elements of one tensor, found in an int64 task table [T, 6] (value,
skipped, moments and tally addresses, numel, first element) that is uploaded once and cached by
the tensors' addresses, sizes and dtypes (O(tensors) to look up), so a training step uploads
nothing and checks nothing twice. Arithmetic in the state's dtype (float32), in
float64 when the values or the state are float64.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _triton_config as tcfg
from ._library import LIB, M2, MEAN, SHIFT, STATE_DTYPES, check, check_float_input, check_state, mean_of
from ._triton_config import tl, triton

SCHEMA = ("temporal_update(Tensor[] values, Tensor(a!)[] tallies, Tensor(b!)[] skipped, "
          "Tensor(c!)[] moments) -> ()")
CALLS, SKIPPED = 0, 1  # rows of a tally


def check_args(values, tallies, skipped, moments) -> None:
    lists = (("values", values), ("tallies", tallies), ("skipped", skipped), ("moments", moments))
    for name, lst in lists:
        check(isinstance(lst, (list, tuple)), f"{name} must be a list of tensors")
    check(len(values) > 0, "values must be a non-empty list of tensors")
    check(all(len(lst) == len(values) for _, lst in lists),
          "values, tallies, skipped and moments must have the same length, got "
          + ", ".join(str(len(lst)) for _, lst in lists))
    for i, (v, t, s, m) in enumerate(zip(values, tallies, skipped, moments)):
        check_float_input(f"values[{i}]", v)
        check_state(f"tallies[{i}]", t, (2,), (torch.int64,), v.device)
        check_state(f"skipped[{i}]", s, v.shape, (torch.int32,), v.device)
        check_state(f"moments[{i}]", m, (3, *v.shape), STATE_DTYPES, v.device)


def new_state(value: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Zeroed (tally, skipped, moments) for one value tensor."""
    return (torch.zeros(2, dtype=torch.int64, device=value.device),
            torch.zeros(value.shape, dtype=torch.int32, device=value.device),
            torch.zeros((3, *value.shape), dtype=dtype, device=value.device))


def temporal_counts(tally: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """Each element's count of finite values (int64, shaped like `skipped`)."""
    return tally[CALLS] - skipped.long()


def temporal_stats(tally: torch.Tensor, skipped: torch.Tensor, moments: torch.Tensor):
    """(count, mean, population var) from the state; var is nan where count is 0."""
    counts = temporal_counts(tally, skipped)
    return counts, mean_of(moments), moments[M2] / counts.to(moments.dtype)


def temporal_stats_reference(snapshots: torch.Tensor):
    """Float64 (count, mean, population var) over dim 0 of stacked snapshots [T, *S]."""
    x = snapshots.double()
    finite = torch.isfinite(x)
    count = finite.sum(0)
    mean = torch.where(finite, x, 0).sum(0) / count
    var = torch.where(finite, x - mean, 0).square().sum(0) / count
    return count, mean, var


def temporal_update_torch(values, tallies, skipped, moments) -> None:
    check_args(values, tallies, skipped, moments)
    for v, t, s, m in zip(values, tallies, skipped, moments):
        finite = torch.isfinite(v)
        count_before = temporal_counts(t, s)
        first = finite & (count_before == 0)
        m[SHIFT] = torch.where(first, v.to(m.dtype), m[SHIFT])
        d = torch.where(finite, v.to(torch.float64) - m[SHIFT].double(), 0)
        mean_old = m[MEAN].double()
        delta = d - mean_old
        mean_new = mean_old + torch.where(finite, delta / (count_before + 1), 0)
        m[M2] += torch.where(finite, delta * (d - mean_new), 0).to(m.dtype)
        m[MEAN] = mean_new.to(m.dtype)
        bad = ~finite
        s += bad.to(s.dtype)
        t[SKIPPED] += bad.sum()
        t[CALLS] += 1


if triton is not None:
    @triton.jit
    def _temporal_update_kernel(
        Tasks,  # [T, 6] int64: value, skipped, moments, tally addresses, numel, first element
        VALUE: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ):
        task = Tasks + tl.program_id(0).to(tl.int64) * 6
        V = tl.load(task).to(tl.pointer_type(VALUE))              # [numel] values
        Skipped = tl.load(task + 1).to(tl.pointer_type(tl.int32))  # [numel], in place
        M = tl.load(task + 2).to(tl.pointer_type(STATE))          # [3, numel] MEAN, M2, SHIFT
        Tally = tl.load(task + 3).to(tl.pointer_type(tl.int64))   # [2] CALLS, SKIPPED
        numel = tl.load(task + 4)
        start = tl.load(task + 5)
        end = tl.minimum(start + CHUNK, numel)
        calls = tl.load(Tally)  # this launch's calls; the count launch after it adds one
        # Another program of this launch may raise SKIPPED meanwhile: then this one reads the
        # per-element counts it would otherwise take as 0, which is right either way.
        dirty = tl.zeros([BLOCK], dtype=tl.int64) + tl.load(Tally + 1) > 0  # a block: masks want one
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for e0 in range(start, end, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            ok = e < end
            v = tl.load(V + e, mask=ok, other=0.0).to(ACC)
            finite = ok & (tl.abs(v) < float("inf"))  # false for NaN and +-Inf
            v = tl.where(finite, v, 0.0)  # skipped values must not make inf - inf below
            skip = tl.load(Skipped + e, mask=ok & dirty, other=0)  # no load while clean
            count_before = calls - skip
            first = finite & (count_before == 0)
            shift = tl.where(first, v.to(STATE),
                             tl.load(M + numel + numel + e, mask=ok & (count_before > 0), other=0.0))
            mean_old = tl.load(M + e, mask=ok, other=0.0).to(ACC)
            d = v - shift.to(ACC)  # small: weights move slowly
            delta = d - mean_old
            mean_new = mean_old + delta / (count_before + 1).to(ACC)
            m2 = tl.load(M + numel + e, mask=ok, other=0.0).to(ACC) + delta * (d - mean_new)
            tl.store(M + e, mean_new.to(STATE), mask=finite)
            tl.store(M + numel + e, m2.to(STATE), mask=finite)
            tl.store(M + numel + numel + e, shift, mask=first)
            skipped_now = ok & ~finite
            tl.store(Skipped + e, skip + 1, mask=skipped_now)
            bad += skipped_now.to(tl.int32)
        n_bad = tl.sum(bad, axis=0).to(tl.int64)
        tl.atomic_add(Tally + 1, n_bad, mask=n_bad > 0)

    @triton.jit
    def _count_call_kernel(Tallies):  # [T] int64 tally addresses: CALLS += 1 in each
        tally = tl.load(Tallies + tl.program_id(0)).to(tl.pointer_type(tl.int64))
        tl.store(tally, tl.load(tally) + 1)


_LAUNCHES: OrderedDict = OrderedDict()  # launch key -> what to launch (see _launches)
_LAUNCHES_KEPT = 16


def _launch_key(values, tallies, skipped, moments) -> tuple:
    """Everything a launch depends on: addresses, sizes, dtypes, and that each value is read
    in place (contiguous). O(tensors), a few attribute reads each."""
    return tuple((v.data_ptr(), v.numel(), v.dtype, v.is_contiguous(), t.data_ptr(), s.data_ptr(),
                  m.data_ptr(), m.dtype) for v, t, s, m in zip(values, tallies, skipped, moments))


def _launches(values, tallies, skipped, moments, cfg, device):
    """[(value dtype, state dtype, task table [T, 6] on device, T)] and the tally table.

    Each task is up to CHUNK consecutive elements of one tensor: (value, skipped, moments and
    tally addresses, numel, first element). Built once per set of tensors (a training run's
    parameters and states do not move), after the full argument checks; a hit skips both, so
    a step costs O(tensors) on the host and uploads nothing."""
    groups: dict = {}
    for v, t, s, m in zip(values, tallies, skipped, moments):
        n = v.numel()
        groups.setdefault((v.dtype, m.dtype), []).extend(
            (v.data_ptr(), s.data_ptr(), m.data_ptr(), t.data_ptr(), n, start)
            for start in range(0, n, cfg["CHUNK"]))
    plan = [(vd, md, torch.tensor(rows, dtype=torch.int64).to(device), len(rows))
            for (vd, md), rows in groups.items() if rows]
    calls = torch.tensor([t.data_ptr() for t in tallies], dtype=torch.int64).to(device)
    return plan, calls


def temporal_update_triton(values, tallies, skipped, moments) -> None:
    """Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): one launch per dtype group,
    then one that counts the call. Strided values are read through contiguous copies (their
    launch tables are rebuilt every call: keep values contiguous)."""
    key = None
    if isinstance(values, (list, tuple)) and len(values) == len(tallies) == len(skipped) == len(moments):
        try:
            key = (values[0].device, _launch_key(values, tallies, skipped, moments))
        except (AttributeError, IndexError, TypeError):
            key = None  # not tensors: check_args says what is wrong
    cached = _LAUNCHES.get(key) if key is not None else None
    keep = None
    if cached is None:
        check_args(values, tallies, skipped, moments)
        device = values[0].device
        tcfg.require(device)
        cfg = tcfg.launch_config("temporal_update", device)
        keep = [v.contiguous() for v in values]  # strided values: copies live until launched
        cached = (cfg, *_launches(keep, tallies, skipped, moments, cfg, device))
        if all(v.is_contiguous() for v in values):
            _LAUNCHES[key] = cached
            if len(_LAUNCHES) > _LAUNCHES_KEPT:
                _LAUNCHES.popitem(last=False)
    else:
        _LAUNCHES.move_to_end(key)
    cfg, plan, calls = cached
    device = values[0].device
    with tcfg.device_guard(device):
        for v_dtype, m_dtype, table, n_tasks in plan:
            wide = torch.float64 in (v_dtype, m_dtype)
            _temporal_update_kernel[(n_tasks,)](
                table, VALUE=tcfg.triton_type(v_dtype), STATE=tcfg.triton_type(m_dtype),
                ACC=tl.float64 if wide else tl.float32,
                BLOCK=cfg["BLOCK"], CHUNK=cfg["CHUNK"], num_warps=cfg["num_warps"])
        _count_call_kernel[(len(tallies),)](calls)
    del keep


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::temporal_update")
def _(values, tallies, skipped, moments):
    return None
