"""temporal_update: per-element running (count, mean, M2) of tensors' values over calls.

One call updates a whole list of tensors (every weight and bias of a model after an
optimizer step). The statistics live at two levels, so long runs stay exact at the traffic
of a float32 Welford update:
- a *block* in the state's dtype (float32 unless the values are float64): Welford's update
  of d = v - s over at most `flush_every` consecutive calls, s being the element's first
  finite value in the block:
      count += 1;  delta = d - mean;  mean += delta / count;  M2 += delta * (d - mean)
  Within a block d is the block's own small drift or jitter, which float32 carries far below
  1e-5 of its variance;
- a float64 *master* (count, mean, M2) into which every element's block is Chan-merged
  (chan.py) on the call that starts the next block, once per `flush_every` calls (the
  tensor's call counter says when, the same call for every element), and restarted there.
A weight moving from 0 to 1 over 1e7 calls, or jittering by 1e-7 of its value, keeps its
variance within 1e-5 of float64 (bench/long_run.py: 6e-11 and 2e-8; a single float32 level:
5.7e-2 and 2.6e-2).

Values the block cannot hold escape to the master: a finite v with |v - s| above
ESCAPE_ABOVE (2^48 in float32: its square times a block's calls would overflow float32; in
float64 only a difference that overflows) is merged straight into the master with the
block, which restarts empty. So finite values near a half-precision or float32 maximum
(+-3e38: variance ~1e77) never give an infinite or nan mean or variance; float64 values keep
their M2 wherever it is representable (1e150 +- 1e144). Non-finite values are skipped for
that element.

State per value tensor of shape S (ops.new_state):
- tally int64 [4]: rows CALLS (calls since the state was zeroed), SKIPPED (non-finite values
  skipped, over all elements), ESCAPED (values merged straight into the master), FLUSHED
  (the call that started the current block);
- skipped int32 [S]: non-finite values skipped per element;
- moments float32/float64 [3, *S]: the block: rows MEAN (of v - s), M2, SHIFT (s);
- master float64 [3, *S]: rows MASTER_MEAN, MASTER_M2, MASTER_COUNT of the closed blocks.
An element's count is tally[CALLS] - skipped; its block holds count - master[MASTER_COUNT] of
them; temporal_stats merges the two. Counts are implicit because weights are almost always
finite and small: while tally[SKIPPED] and tally[ESCAPED] are 0 no kernel reads `skipped` or
the master between block starts, every block holds tally[CALLS] - tally[FLUSHED] values, and no
kernel writes the shift. A step then moves 24 bytes per float32 element (read v, shift, mean,
M2; write mean, M2), as the single-level state did; a block start reads and writes the master
besides (76 bytes, once in `flush_every` calls). The price is memory: 40 bytes per float32
element instead of 16 (the float64 master).

Order in this file: float64 reference, readers, plain-torch implementation, Triton kernels
and launcher, registration. Kernels: C++ in csrc/temporal_update.cpp (CPU), Triton here (CUDA).

Triton design: one launch per (value dtype, state dtype) group of the list, usually one for
the whole model, then one tiny launch that counts the call in every tally. Each program owns up
to CHUNK consecutive elements of one tensor, found in an int64 task table [T, 7] (value,
skipped, moments, tally and master addresses, numel, first element) that is uploaded once and
cached by the tensors' addresses, sizes and dtypes (O(tensors) to look up), so a training step
uploads nothing and checks nothing twice. Block arithmetic in the state's dtype (float32), in
float64 when the values or the state are float64; master arithmetic in float64, only on a
block start (a branch uniform over a program) and for escaping elements.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .. import chan
from . import _triton_config as tcfg
from ._library import LIB, M2, MEAN, SHIFT, STATE_DTYPES, check, check_float_input, check_state
from ._triton_config import tl, triton

CALLS, SKIPPED, ESCAPED, FLUSHED = 0, 1, 2, 3  # rows of a tally
MASTER_MEAN, MASTER_M2, MASTER_COUNT = 0, 1, 2  # rows of a master
FLUSH_EVERY = 1024  # calls per block (bench/long_run.py: errors against flush_every)
MAX_FLUSH_EVERY = 1 << 24  # ESCAPE_ABOVE^2 x 4 x this stays below float32's maximum
# |v - s| beyond which a value escapes the block (and any v - s that overflows)
ESCAPE_ABOVE = {torch.float32: 2.0 ** 48, torch.float64: float("inf")}
MASTER_DTYPES = (torch.float64,)

SCHEMA = ("temporal_update(Tensor[] values, Tensor(a!)[] tallies, Tensor(b!)[] skipped, "
          f"Tensor(c!)[] moments, Tensor(d!)[] masters, int flush_every={FLUSH_EVERY}) -> ()")


def check_args(values, tallies, skipped, moments, masters, flush_every) -> None:
    lists = (("values", values), ("tallies", tallies), ("skipped", skipped), ("moments", moments),
             ("masters", masters))
    for name, lst in lists:
        check(isinstance(lst, (list, tuple)), f"{name} must be a list of tensors")
    check(len(values) > 0, "values must be a non-empty list of tensors")
    check(all(len(lst) == len(values) for _, lst in lists),
          "values, tallies, skipped, moments and masters must have the same length, got "
          + ", ".join(str(len(lst)) for _, lst in lists))
    check(isinstance(flush_every, int) and not isinstance(flush_every, bool)
          and 1 <= flush_every <= MAX_FLUSH_EVERY,
          f"flush_every must be an integer from 1 to {MAX_FLUSH_EVERY}, got {flush_every!r}")
    for i, (v, t, s, m, g) in enumerate(zip(values, tallies, skipped, moments, masters)):
        check_float_input(f"values[{i}]", v)
        check_state(f"tallies[{i}]", t, (4,), (torch.int64,), v.device)
        check_state(f"skipped[{i}]", s, v.shape, (torch.int32,), v.device)
        check_state(f"moments[{i}]", m, (3, *v.shape), STATE_DTYPES, v.device)
        check_state(f"masters[{i}]", g, (3, *v.shape), MASTER_DTYPES, v.device)


def new_state(value: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Zeroed (tally, skipped, moments, master) for one value tensor."""
    return (torch.zeros(4, dtype=torch.int64, device=value.device),
            torch.zeros(value.shape, dtype=torch.int32, device=value.device),
            torch.zeros((3, *value.shape), dtype=dtype, device=value.device),
            torch.zeros((3, *value.shape), dtype=torch.float64, device=value.device))


def upgrade_single_level(tally: torch.Tensor, skipped: torch.Tensor, moments: torch.Tensor):
    """The state of a single-level (tally [2], skipped, moments) temporal state, as saved by
    versions before the master: its moments become the open block, the master is empty."""
    full = torch.zeros(4, dtype=torch.int64, device=tally.device)
    full[:2] = tally
    master = torch.zeros(moments.shape, dtype=torch.float64, device=moments.device)
    return full, skipped, moments, master


def temporal_stats_reference(snapshots: torch.Tensor):
    """Float64 (count, mean, population var) over dim 0 of stacked snapshots [T, *S]: two
    passes over the values less each element's first finite one, so a constant 1e200 has
    variance 0, not the square of the mean's rounding error."""
    x = snapshots.double()
    finite = torch.isfinite(x)
    count = finite.sum(0)
    first = torch.where(finite, x, 0).gather(0, finite.int().argmax(0, keepdim=True)).squeeze(0)
    d = torch.where(finite, x - first, 0)
    mean_d = d.sum(0) / count
    var = torch.where(finite, d - mean_d, 0).square().sum(0) / count
    return count, first + mean_d, var


def temporal_counts(tally: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """Each element's count of finite values (int64, shaped like `skipped`)."""
    return tally[CALLS] - skipped.long()


def temporal_stats(tally: torch.Tensor, skipped: torch.Tensor, moments: torch.Tensor,
                   master: torch.Tensor):
    """(count int64, mean float64, population var float64) from the state: the master and the
    open block merged; var is nan where count is 0."""
    counts = temporal_counts(tally, skipped)
    n = counts.double()
    m, g = moments.double(), master.double()
    _, mean, m2 = chan.merge(g[MASTER_COUNT], g[MASTER_MEAN], g[MASTER_M2],
                             n - g[MASTER_COUNT], m[SHIFT] + m[MEAN], m[M2])
    return counts, mean, m2 / n


def _welford_in_place(v, t, m, flush_every: int) -> bool:
    """The common call where reading the tally costs no synchronisation (CPU): a clean tensor
    inside a block. Welford in the state's dtype, in place, as the kernels' vector loop does:
    a few whole-tensor passes where the general path takes some 60 in float64. False, with
    nothing changed, for any other call, or where a value is non-finite or escapes."""
    calls, skipped, escaped, flushed = t.tolist()
    in_block = calls - flushed
    if skipped or escaped or in_block <= 0 or in_block >= flush_every:
        return False
    d = v.to(m.dtype) - m[SHIFT]
    bound = min(ESCAPE_ABOVE[m.dtype], torch.finfo(m.dtype).max)  # false for NaN and +-Inf too
    if not bool((d.abs() <= bound).all()):
        return False
    mean, m2 = m[MEAN], m[M2]
    delta = d - mean
    mean.add_(delta, alpha=1.0 / (in_block + 1))
    m2.addcmul_(delta, d.sub_(mean))
    t[CALLS] += 1
    return True


def temporal_update_torch(values, tallies, skipped, moments, masters,
                          flush_every: int = FLUSH_EVERY) -> None:
    """Every step of the kernels as whole-tensor float64 ops (no host synchronisation); on
    CPU the common call takes the in-place Welford of `_welford_in_place`."""
    check_args(values, tallies, skipped, moments, masters, flush_every)
    for v, t, s, m, g in zip(values, tallies, skipped, moments, masters):
        if v.device.type == "cpu" and _welford_in_place(v, t, m, flush_every):
            continue
        calls = t[CALLS]
        start = calls - t[FLUSHED] >= flush_every  # this call closes the block and opens one
        dirty = t[SKIPPED] + t[ESCAPED] > 0
        finite = torch.isfinite(v)
        x = torch.where(finite, v.double(), 0)
        in_block = torch.where(dirty, calls - s.long() - g[MASTER_COUNT].long(), calls - t[FLUSHED])
        shift_old, mean_old, m2_old = m[SHIFT].double(), m[MEAN].double(), m[M2].double()
        count = torch.where(start, 0, in_block)  # the block's count before this value
        mean_b = torch.where(start, 0, mean_old)
        m2_b = torch.where(start, 0, m2_old)
        first = finite & (count == 0)
        shift = torch.where(first, x.to(m.dtype).double(), shift_old)
        d = x - shift
        escape = finite & ~first & ~(torch.isfinite(d) & (d.abs() <= ESCAPE_ABOVE[m.dtype]))
        # a closed or escaping block into the master, then an escaping value itself
        merged = chan.merge(g[MASTER_COUNT].double(), g[MASTER_MEAN].double(), g[MASTER_M2].double(),
                            in_block.double(), shift_old + mean_old, m2_old)
        merged = chan.merge(*merged, escape.double(), x, 0)
        to_master = (start & (in_block > 0)) | escape
        for row, value in zip((MASTER_COUNT, MASTER_MEAN, MASTER_M2), merged):
            g[row] = torch.where(to_master, value.to(g.dtype), g[row])
        join = finite & ~escape
        delta = d - mean_b
        mean_new = mean_b + delta / (count + 1)
        m2_new = m2_b + delta * (d - mean_new)
        m[MEAN] = torch.where(join, mean_new, torch.where(escape, 0, mean_b)).to(m.dtype)
        m[M2] = torch.where(join, m2_new, torch.where(escape, 0, m2_b)).to(m.dtype)
        m[SHIFT] = shift.to(m.dtype)
        bad = ~finite
        s += bad.to(s.dtype)
        t[SKIPPED] += bad.sum()
        t[ESCAPED] += escape.sum()
        t[FLUSHED] = torch.where(start, calls, t[FLUSHED])
        t[CALLS] += 1


if triton is not None:
    @triton.jit
    def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):  # chan.merge, float64
        n = n_a + n_b
        w = n_b / tl.maximum(n, 1.0)
        delta = mean_b - mean_a
        return n, mean_a + delta * w, m2_a + m2_b + delta * (n_a * w) * delta

    @triton.jit
    def _held(Skipped, G, e, ok, dirty, calls, in_block, numel):  # each element's block count
        skip = tl.load(Skipped + e, mask=ok & dirty, other=0)  # no load while clean
        closed = tl.load(G + 2 * numel + e, mask=ok & dirty, other=0.0).to(tl.int64)
        return tl.where(dirty, calls - skip - closed, in_block), skip

    @triton.jit
    def _into_master(M, G, e, to_master, held, numel, v, escape):
        """The block of `held` values into the master, then v where `escape`; the block emptied."""
        shift = tl.load(M + 2 * numel + e, mask=to_master, other=0.0).to(tl.float64)
        mean = tl.load(M + e, mask=to_master, other=0.0).to(tl.float64)
        m2 = tl.load(M + numel + e, mask=to_master, other=0.0).to(tl.float64)
        g_mean = tl.load(G + e, mask=to_master, other=0.0)
        g_m2 = tl.load(G + numel + e, mask=to_master, other=0.0)
        g_n = tl.load(G + 2 * numel + e, mask=to_master, other=0.0)
        g_n, g_mean, g_m2 = _chan(g_n, g_mean, g_m2, held.to(tl.float64), shift + mean, m2)
        g_n, g_mean, g_m2 = _chan(g_n, g_mean, g_m2, escape.to(tl.float64), v.to(tl.float64), 0.0)
        tl.store(G + e, g_mean, mask=to_master)
        tl.store(G + numel + e, g_m2, mask=to_master)
        tl.store(G + 2 * numel + e, g_n, mask=to_master)
        tl.store(M + e, tl.zeros_like(mean).to(M.dtype.element_ty), mask=to_master)
        tl.store(M + numel + e, tl.zeros_like(m2).to(M.dtype.element_ty), mask=to_master)

    @triton.jit
    def _open_blocks(M, G, Skipped, e0, end, numel, calls, in_block, dirty_m,
                     ACC: tl.constexpr, MASTER_BLOCK: tl.constexpr):
        """Elements [e0, e0 + MASTER_BLOCK): each block into the master, the block emptied."""
        e = e0 + tl.arange(0, MASTER_BLOCK)
        ok = e < end
        held, _ = _held(Skipped, G, e, ok, dirty_m, calls, in_block, numel)
        no_value = e < 0  # nothing escapes on a block start: every block is empty
        _into_master(M, G, e, ok & (held > 0), held, numel, tl.zeros([MASTER_BLOCK], dtype=ACC),
                     no_value)

    @triton.jit
    def _update_elements(V, Skipped, M, G, e0, end, numel, calls, in_block, dirty, opening, bad,
                         escaped, ACC: tl.constexpr, STATE: tl.constexpr,
                         ESCAPE_ABOVE: tl.constexpr, BLOCK: tl.constexpr):
        """Elements [e0, e0 + BLOCK): Welford's update of each block; counts of the values
        skipped (non-finite) and escaping (too far from the block's shift) added to bad, escaped."""
        e = e0 + tl.arange(0, BLOCK)
        ok = e < end
        v = tl.load(V + e, mask=ok, other=0.0).to(ACC)
        finite = ok & (tl.abs(v) < float("inf"))  # false for NaN and +-Inf
        v = tl.where(finite, v, 0.0)  # skipped values must not make inf - inf below
        held, skip = _held(Skipped, G, e, ok, dirty, calls, in_block, numel)
        held = tl.where(opening, 0, held)
        shift = tl.load(M + 2 * numel + e, mask=ok & (held > 0), other=0.0)
        mean_old = tl.load(M + e, mask=ok & (held > 0), other=0.0).to(ACC)
        first = finite & (held == 0)
        shift = tl.where(first, v.to(STATE), shift)
        d = v - shift.to(ACC)  # small: weights move slowly
        escape = finite & (held > 0) & ~((tl.abs(d) <= ESCAPE_ABOVE) & (d - d == 0.0))
        join = finite & ~escape  # an escaping value is handled below, with the master
        delta = d - mean_old
        mean_new = mean_old + delta / (held + 1).to(ACC)
        m2 = tl.load(M + numel + e, mask=ok & (held > 0), other=0.0).to(ACC) + delta * (d - mean_new)
        tl.store(M + e, mean_new.to(STATE), mask=join)
        tl.store(M + numel + e, m2.to(STATE), mask=join)
        tl.store(M + 2 * numel + e, shift, mask=first)
        skipped_now = ok & ~finite
        tl.store(Skipped + e, skip + 1, mask=skipped_now)
        return bad + skipped_now.to(tl.int32), escaped + escape.to(tl.int32)

    @triton.jit
    def _escape_elements(V, Skipped, M, G, e0, end, numel, calls, in_block, dirty_m,
                         ACC: tl.constexpr, ESCAPE_ABOVE: tl.constexpr, MASTER_BLOCK: tl.constexpr):
        """Elements [e0, e0 + MASTER_BLOCK): the values that escaped their block, into the master."""
        e = e0 + tl.arange(0, MASTER_BLOCK)
        ok = e < end
        v = tl.load(V + e, mask=ok, other=0.0).to(ACC)
        finite = ok & (tl.abs(v) < float("inf"))
        v = tl.where(finite, v, 0.0)
        # as in _update_elements (no block start here: it empties every block, and nothing
        # escapes an empty block); escaping elements were left as they were
        held, _ = _held(Skipped, G, e, ok, dirty_m, calls, in_block, numel)
        shift = tl.load(M + 2 * numel + e, mask=ok & (held > 0), other=0.0).to(ACC)
        d = v - shift
        escape = finite & (held > 0) & ~((tl.abs(d) <= ESCAPE_ABOVE) & (d - d == 0.0))
        _into_master(M, G, e, escape, held, numel, v, escape)

    @triton.jit
    def _temporal_update_kernel(
        Tasks,  # [T, 7] int64: value, skipped, moments, tally, master addresses, numel, first element
        flush_every,  # calls per block
        VALUE: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr, ESCAPE_ABOVE: tl.constexpr,
        BLOCK: tl.constexpr, MASTER_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        task = Tasks + tl.program_id(0).to(tl.int64) * 7
        V = tl.load(task).to(tl.pointer_type(VALUE))              # [numel] values
        Skipped = tl.load(task + 1).to(tl.pointer_type(tl.int32))  # [numel], in place
        M = tl.load(task + 2).to(tl.pointer_type(STATE))          # [3, numel] MEAN, M2, SHIFT
        Tally = tl.load(task + 3).to(tl.pointer_type(tl.int64))   # [4] CALLS, SKIPPED, ESCAPED, FLUSHED
        G = tl.load(task + 4).to(tl.pointer_type(tl.float64))     # [3, numel] master MEAN, M2, COUNT
        numel = tl.load(task + 5)
        start = tl.load(task + 6)
        end = tl.minimum(start + CHUNK, numel)
        calls = tl.load(Tally)  # this launch's calls; the count launch after it adds one
        in_block = calls - tl.load(Tally + 3)
        # Another program of this launch may raise SKIPPED or ESCAPED meanwhile: then this one
        # reads the per-element counts it would otherwise take as equal, which is right either way.
        irregular = tl.load(Tally + 1) + tl.load(Tally + 2)
        dirty = tl.zeros([BLOCK], dtype=tl.int64) + irregular > 0  # masks want blocks
        opening = tl.zeros([BLOCK], dtype=tl.int64) + in_block >= flush_every
        # The master's work runs in loops of their own over MASTER_BLOCK elements at a time, so
        # neither its float64 values nor its pointers raise the common loop's registers.
        # triton 3.6's interpreter cannot take a runtime bound in range(): it loops with while
        if in_block >= flush_every:  # this call closes every block into the master, opens new ones
            dirty_m = tl.zeros([MASTER_BLOCK], dtype=tl.int64) + irregular > 0
            if INTERPRETED:
                e0 = start
                while e0 < end:
                    _open_blocks(M, G, Skipped, e0, end, numel, calls, in_block, dirty_m, ACC, MASTER_BLOCK)
                    e0 += MASTER_BLOCK
            else:
                for e0 in range(start, end, MASTER_BLOCK):
                    _open_blocks(M, G, Skipped, e0, end, numel, calls, in_block, dirty_m, ACC, MASTER_BLOCK)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        escaped = tl.zeros([BLOCK], dtype=tl.int32)
        if INTERPRETED:
            e0 = start
            while e0 < end:
                bad, escaped = _update_elements(V, Skipped, M, G, e0, end, numel, calls, in_block,
                                                dirty, opening, bad, escaped, ACC, STATE,
                                                ESCAPE_ABOVE, BLOCK)
                e0 += BLOCK
        else:
            for e0 in range(start, end, BLOCK):
                bad, escaped = _update_elements(V, Skipped, M, G, e0, end, numel, calls, in_block,
                                                dirty, opening, bad, escaped, ACC, STATE,
                                                ESCAPE_ABOVE, BLOCK)
        n_escaped = tl.sum(escaped, axis=0).to(tl.int64)
        if n_escaped > 0:  # rare: values too far from their block's shift go to the master
            dirty_m = tl.zeros([MASTER_BLOCK], dtype=tl.int64) + irregular > 0
            if INTERPRETED:
                e0 = start
                while e0 < end:
                    _escape_elements(V, Skipped, M, G, e0, end, numel, calls, in_block, dirty_m,
                                     ACC, ESCAPE_ABOVE, MASTER_BLOCK)
                    e0 += MASTER_BLOCK
            else:
                for e0 in range(start, end, MASTER_BLOCK):
                    _escape_elements(V, Skipped, M, G, e0, end, numel, calls, in_block, dirty_m,
                                     ACC, ESCAPE_ABOVE, MASTER_BLOCK)
        n_bad = tl.sum(bad, axis=0).to(tl.int64)
        tl.atomic_add(Tally + 1, n_bad, mask=n_bad > 0)
        tl.atomic_add(Tally + 2, n_escaped, mask=n_escaped > 0)

    @triton.jit
    def _count_call_kernel(Tallies, flush_every):  # [T] int64 tally addresses
        tally = tl.load(Tallies + tl.program_id(0)).to(tl.pointer_type(tl.int64))
        calls = tl.load(tally)
        flushed = tl.load(tally + 3)
        tl.store(tally + 3, tl.where(calls - flushed >= flush_every, calls, flushed))
        tl.store(tally, calls + 1)


_LAUNCHES: OrderedDict = OrderedDict()  # launch key -> what to launch (see _launches)
_LAUNCHES_KEPT = 16


def _launch_key(values, tallies, skipped, moments, masters) -> tuple:
    """Everything a launch depends on: addresses, sizes, dtypes, and that each value is read
    in place (contiguous). O(tensors), a few attribute reads each."""
    return tuple((v.data_ptr(), v.numel(), v.dtype, v.is_contiguous(), t.data_ptr(), s.data_ptr(),
                  m.data_ptr(), m.dtype, g.data_ptr())
                 for v, t, s, m, g in zip(values, tallies, skipped, moments, masters))


def _launches(values, tallies, skipped, moments, masters, cfg, device):
    """[(value dtype, state dtype, task table [T, 7] on device, T)] and the tally table.

    Each task is up to CHUNK consecutive elements of one tensor: (value, skipped, moments,
    tally and master addresses, numel, first element). Built once per set of tensors (a
    training run's parameters and states do not move), after the full argument checks; a hit
    skips both, so a step costs O(tensors) on the host and uploads nothing."""
    groups: dict = {}
    for v, t, s, m, g in zip(values, tallies, skipped, moments, masters):
        n = v.numel()
        groups.setdefault((v.dtype, m.dtype), []).extend(
            (v.data_ptr(), s.data_ptr(), m.data_ptr(), t.data_ptr(), g.data_ptr(), n, start)
            for start in range(0, n, cfg["CHUNK"]))
    plan = [(vd, md, torch.tensor(rows, dtype=torch.int64).to(device), len(rows))
            for (vd, md), rows in groups.items() if rows]
    calls = torch.tensor([t.data_ptr() for t in tallies], dtype=torch.int64).to(device)
    return plan, calls


def temporal_update_triton(values, tallies, skipped, moments, masters,
                           flush_every: int = FLUSH_EVERY) -> None:
    """Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): one launch per dtype group,
    then one that counts the call. Strided values are read through contiguous copies (their
    launch tables are rebuilt every call: keep values contiguous)."""
    key = None
    lists = (values, tallies, skipped, moments, masters)
    if isinstance(values, (list, tuple)) and all(
            isinstance(x, (list, tuple)) and len(x) == len(values) for x in lists):
        try:
            key = (values[0].device, _launch_key(*lists))
        except (AttributeError, IndexError, TypeError):
            key = None  # not tensors: check_args says what is wrong
    cached = _LAUNCHES.get(key) if key is not None else None
    keep = None
    if cached is None or not (isinstance(flush_every, int) and 1 <= flush_every <= MAX_FLUSH_EVERY):
        check_args(values, tallies, skipped, moments, masters, flush_every)
        device = values[0].device
        tcfg.require(device)
        cfg = tcfg.launch_config("temporal_update", device)
        keep = [v.contiguous() for v in values]  # strided values: copies live until launched
        cached = (cfg, *_launches(keep, tallies, skipped, moments, masters, cfg, device))
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
                table, flush_every, VALUE=tcfg.triton_type(v_dtype), STATE=tcfg.triton_type(m_dtype),
                ACC=tl.float64 if wide else tl.float32, ESCAPE_ABOVE=ESCAPE_ABOVE[m_dtype],
                BLOCK=cfg["BLOCK"], MASTER_BLOCK=cfg["MASTER_BLOCK"], CHUNK=cfg["CHUNK"],
                INTERPRETED=tcfg.INTERPRET, num_warps=cfg["num_warps"])
        _count_call_kernel[(len(tallies),)](calls, flush_every)
    del keep


LIB.define(SCHEMA)


@torch.library.register_fake("lrfluct::temporal_update")
def _(values, tallies, skipped, moments, masters, flush_every=FLUSH_EVERY):
    return None
