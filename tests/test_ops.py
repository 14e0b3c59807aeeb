"""Every statistics op on every backend against the float64 reference.

Accuracy rule (as flash-attention's): a backend's error against float64 on the same input is at
most twice the error of torch.var_mean in the same dtype, plus 4 float32 ulps (64 float64 ulps
for float64 input) of the data's scale: |mean| + std for the mean, var for the variance.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends import call, skip_unless_available
from lrfluct_fast import ops
from lrfluct_fast.ops import COUNT, M2, MEAN, NONFINITE, POSITIVE, mean_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import long_run  # noqa: E402  the long-run trajectories and their float64 reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [
    (1, 1),
    (1, 17),      # one row: var 0
    (33, 1),      # one column: all work in the row direction
    (37, 300),    # primes: no block size divides them
    (0, 5),       # no rows
    (5, 0),       # no columns
    (1031, 517),  # more rows and columns than one task of the C++ kernel
    (200, 1100),  # few rows: the C++ kernel splits the columns into uneven blocks
]


def make_data(shape, dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "offset":
        x = x + 1e4 if dtype in (torch.float32, torch.float64) else x + 100  # fp16 tops out at 65504
    if kind == "nonfinite" and x.numel():
        r, n = shape
        x[:, 0] = float("nan")                     # a column with no finite value
        x[torch.arange(r) % 3 == 0, n // 2] = float("inf")
        x[r // 2, -1] = float("-inf")
        x[r - 1, n // 3] = float("nan")
    return x.to(dtype)


def ulps(dtype):
    if dtype == torch.float64:
        # Accumulators no wider than the data: the one-pass shifted sums of the C++ kernel lose
        # ~5 bits against a two-pass float64 reference (measured: up to 31 ulps at 1031 rows).
        return 64 * torch.finfo(torch.float64).eps
    return 4 * torch.finfo(torch.float32).eps


def torch_error(x):
    """Error of torch.var_mean in x's dtype against float64, on x with non-finite values zeroed."""
    clean = torch.where(torch.isfinite(x), x, 0)
    var, mean = torch.var_mean(clean, dim=0, unbiased=False)
    rvar, rmean = torch.var_mean(clean.double(), dim=0, unbiased=False)
    return (mean.double() - rmean).abs().max().item(), (var.double() - rvar).abs().max().item()


def assert_close_to_reference(counts, moments, x):
    rc, rm = ops.batch_stats_reference(x)
    assert counts.dtype == torch.int64 and torch.equal(counts, rc)
    assert moments.dtype == ops.STATS_DTYPE
    assert moments.shape == rm.shape
    if x.numel() == 0:
        assert not moments.any()
        return
    mean_err, var_err = torch_error(x)
    n = rc[COUNT].clamp(min=1).double()
    var, rvar = moments[M2].double() / n, rm[M2] / n
    data_scale = (rm[MEAN].abs() + rvar.sqrt()).max().item()
    tol_mean = 2 * mean_err + ulps(x.dtype) * data_scale
    tol_var = 2 * var_err + ulps(x.dtype) * rvar.abs().max().item()
    assert (mean_of(moments).double() - rm[MEAN]).abs().max().item() <= tol_mean
    assert (var - rvar).abs().max().item() <= tol_var


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "offset", "nonfinite"])
def test_batch_stats(backend, dtype, shape, kind):
    x = make_data(shape, dtype, kind)
    counts, moments = call(backend, "batch_stats", x)
    assert_close_to_reference(counts, moments, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_stats_large(backend, dtype):
    x = make_data((4096, 4096), dtype, "offset", seed=1)
    assert_close_to_reference(*call(backend, "batch_stats", x), x)


def test_batch_stats_counts(backend):
    x = torch.tensor([[1.0, -1.0], [0.0, float("nan")], [2.0, float("inf")]])
    counts, moments = call(backend, "batch_stats", x)
    assert counts[COUNT].tolist() == [3, 1]
    assert counts[POSITIVE].tolist() == [2, 0]   # +inf is not a finite positive
    assert counts[NONFINITE].tolist() == [0, 2]
    assert mean_of(moments).tolist() == [1.0, -1.0]


def test_batch_stats_noncontiguous(backend):
    x = make_data((40, 30), torch.float32, "normal").t()
    assert_close_to_reference(*call(backend, "batch_stats", x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,kind", [((3, 7, 11), "nonfinite"), ((1, 5, 1), "nonfinite"),
                                        ((2, 0, 3), "nonfinite"), ((0, 4, 5), "nonfinite"),
                                        ((5, 33, 70), "nonfinite"), ((5, 33, 70), "offset")],
                         ids=str)
def test_batch_stats_neurons_in_the_middle(backend, dtype, shape, kind):
    # [B, N, S]: a conv output's channels, read in place (no movedim copy). S = 70 takes the
    # C++ kernel's vector lanes (tiles of 32 values) and its scalar tail.
    x = make_data((shape[0] * shape[2], shape[1]), dtype, kind, seed=4)
    x = x.reshape(shape[0], shape[2], shape[1]).transpose(1, 2).contiguous()
    assert_close_to_reference(*call(backend, "batch_stats", x), x)
    strided = torch.cat([x, x], dim=2)[:, :, ::2]  # no unit stride anywhere
    assert_close_to_reference(*call(backend, "batch_stats", strided), strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_batch_stats_near_the_dtype_maximum(backend, dtype):
    # finite values near the dtype's maximum: a finite mean and variance (the variance of data
    # near float32's maximum, ~1e77, is held by the float64 moments)
    big = torch.finfo(dtype).max
    x = torch.tensor([[0.9, -0.9, 1.0, 1e-30], [-0.99, 0.5, 1.0, 1.0], [0.7, -1.0, 1.0, -1.0]],
                     dtype=torch.float64) * torch.tensor([big, big, big, 1.0], dtype=torch.float64)
    x = x.to(dtype)
    counts, moments = call(backend, "batch_stats", x)
    rc, rm = ops.batch_stats_reference(x)
    assert torch.isfinite(moments).all(), moments
    # the last column's mean is 3.3e-31: the two-pass reference rounds it to 0, atol covers it
    torch.testing.assert_close(mean_of(moments), rm[MEAN], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(moments[M2], rm[M2], rtol=1e-6, atol=1e-12)


def test_batch_stats_float64_extremes(backend):
    # M2 as float64 holds it; beyond float64 (data at 1e200 that varies) it is inf, never 0
    x = torch.tensor([[1e150, 1e200, 1e-200, 5.0], [-1e150, -1e200, 3e-200, 5.0],
                      [3e150, 3e200, -2e-200, 5.0]], dtype=torch.float64)
    counts, moments = call(backend, "batch_stats", x)
    rc, rm = ops.batch_stats_reference(x)
    assert rm[M2, 1] == float("inf") and moments[M2, 1] == float("inf")
    torch.testing.assert_close(mean_of(moments), rm[MEAN], rtol=1e-12, atol=0)
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(moments[M2, keep], rm[M2, keep], rtol=1e-12, atol=0)
    # the same columns as the channels of a [1, 4, 3] conv output, read in place
    counts3, moments3 = call(backend, "batch_stats", x.t().contiguous().unsqueeze(0))
    assert torch.equal(counts3, counts)
    torch.testing.assert_close(moments3, moments, rtol=1e-12, atol=0)


@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_accumulate_equals_batch_stats_then_merge(backend, pending, dtype):
    first, second = make_data((61, 23), dtype, "nonfinite", seed=5), make_data((8, 23), dtype, "offset", seed=6)
    counts, moments = empty_state(23)
    call(backend, "accumulate_stats", first, counts, moments)
    into = empty_state(23)
    extra = (*call(backend, "batch_stats", first), *into) if pending else ()
    call(backend, "accumulate_stats", second, counts, moments, *extra)
    assert_close_to_reference(counts, moments, torch.cat([first, second]))
    if pending:
        assert_close_to_reference(*into, first)
    else:
        assert not into[0].any() and not into[1].any()


def test_accumulate_bad_input_leaves_state(backend):
    x = torch.randn(5, 4)
    counts, moments = empty_state(4)
    with pytest.raises(ValueError, match="moments must have dtype"):
        call(backend, "accumulate_stats", x, counts, moments.float())
    with pytest.raises(ValueError, match="come together"):
        call(backend, "accumulate_stats", x, counts, moments, counts.clone(), None, None, None)
    with pytest.raises(ValueError, match="into_moments must have shape"):
        call(backend, "accumulate_stats", x, counts, moments, *empty_state(4), counts.clone(),
             moments[:, :3].contiguous())
    assert not counts.any() and not moments.any()


@pytest.mark.parametrize("backend_batches", [("cpp", 1_000_000), ("torch", 20_000)], ids=str)
def test_running_stats_of_drifting_data_stay_exact(backend_batches):
    # 1e6 batches whose mean drifts from 0 to 1000 (float32 running state: mean off by 0.064):
    # the float64 state keeps the running mean and variance within 1e-5 of exact
    backend, batches = backend_batches
    n, rows = 3, 4
    drift = torch.linspace(0, 1000, batches, dtype=torch.float64)
    spread = 0.5 + torch.rand(batches, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    batch_counts = torch.tensor([[rows] * n, [rows] * n, [0] * n], dtype=torch.int64)
    # batch b: mean 0 about the shift drift[b], M2 = spread * rows
    stats = torch.stack([torch.zeros_like(spread), spread * rows, drift[:, None].expand(-1, n)], 1)
    counts, moments = empty_state(n)
    for batch in stats.unbind(0):
        call(backend, "merge_stats", counts, moments, batch_counts, batch)
    mean = drift.mean()
    m2 = (spread * rows).sum(0) + rows * (drift - mean).square().sum()
    assert counts[COUNT].tolist() == [rows * batches] * n
    torch.testing.assert_close(mean_of(moments), mean.expand(n), rtol=1e-5, atol=0)
    torch.testing.assert_close(moments[M2], m2, rtol=1e-5, atol=0)


def empty_state(n, dtype=ops.STATS_DTYPE):
    return torch.zeros(3, n, dtype=torch.int64), torch.zeros(3, n, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "offset", "nonfinite"])
def test_merge_equals_one_batch(backend, dtype, kind):
    x = make_data((97, 41), dtype, kind, seed=2)
    chunks = [x[:10], x[10:11], x[11:]]
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        counts, moments = empty_state(41)
        for i in order:
            call(backend, "merge_stats", counts, moments, *call(backend, "batch_stats", chunks[i]))
        assert_close_to_reference(counts, moments, x)
        results.append((counts, moments))
    (_, first), (_, second) = results  # shifts may differ with the order; the statistics may not
    torch.testing.assert_close(mean_of(first), mean_of(second), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first[M2], second[M2], rtol=1e-5, atol=1e-6)


def test_merge_empty_batch_leaves_state(backend):
    x = make_data((20, 7), torch.float32, "normal")
    counts, moments = call(backend, "batch_stats", x)
    before = counts.clone(), moments.clone()
    call(backend, "merge_stats", counts, moments, *call(backend, "batch_stats", x[:0]))
    assert torch.equal(counts, before[0]) and torch.equal(moments, before[1])


def test_merge_counts_beyond_32_bits(backend):
    # counts past 2^32 (a long run of a wide layer) enter the weights of the merge exactly
    na = torch.tensor([2**40 + 3, 2**33 + 1, 7, 0, 2**52 - 1], dtype=torch.int64)
    counts = torch.stack([na, na // 2, torch.zeros_like(na)])
    moments = torch.tensor([[0.5, -1.0, 2.0, 0.0, 3.0], [1e9, 2.0, 3.0, 0.0, 4.0],
                            [10.0, 20.0, 30.0, 40.0, 50.0]], dtype=torch.float64)
    nb = torch.tensor([5, 2**35, 3, 4, 1], dtype=torch.int64)
    b_counts = torch.stack([nb, nb, torch.ones_like(nb)])
    b_moments = torch.tensor([[1.0, 2.0, -3.0, 0.25, 1.0], [5.0, 6.0, 7.0, 8.0, 0.0],
                              [11.0, 19.0, 30.0, -2.0, 50.0]], dtype=torch.float64)
    n_a, n_b = na.double(), nb.double()
    shift = torch.where(na > 0, moments[2], b_moments[2])
    delta = (b_moments[2] - shift + b_moments[0]) - moments[0]
    mean = moments[0] + delta * (n_b / (n_a + n_b))
    m2 = moments[1] + b_moments[1] + delta * delta * (n_a * n_b / (n_a + n_b))
    want_counts = counts + b_counts
    call(backend, "merge_stats", counts, moments, b_counts, b_moments)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(moments, torch.stack([mean, m2, shift]), rtol=1e-15, atol=0)


def weight_trajectory(shape, steps, dtype, seed=3):
    """Weights near 0.3 that move ~1e-5 a step: fluctuations 4 orders below the value. Half
    precision cannot hold such moves, so there they are one epsilon of the dtype a step."""
    g = torch.Generator().manual_seed(seed)
    w0 = 0.3 + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    step = max(1e-5, torch.finfo(dtype).eps)
    walk = step * torch.randn((steps, *shape), generator=g, dtype=torch.float64).cumsum(0)
    return (w0 + walk).to(dtype)


def temporal_trajectories(dtype, steps):
    """Weight trajectories that take every path of the temporal update kernels."""
    shapes = [(7, 5), (13,), (3, 2, 3, 3), (0, 4), (70001,), (9,)]
    trajectories = [weight_trajectory(s, steps, dtype, seed=i) for i, s in enumerate(shapes)]
    trajectories[0][4, 1, 2] = float("nan")   # one skipped value, after the first calls
    trajectories[1][:, 0] = float("inf")      # an element never finite
    trajectories[2][:3, 0, 1, 2] = float("-inf")  # an element first seen at the fourth call
    trajectories[4][steps // 2, -5] = float("nan")  # in the last chunk of a tensor of several
    # trajectories[5] stays finite: one count for every element, the shift kept after call 1
    return trajectories


TEMPORAL_CASES = ([(dtype, ops.FLUSH_EVERY) for dtype in DTYPES]
                  + [(torch.float32, 4), (torch.float64, 4), (torch.bfloat16, 1)])


@pytest.mark.parametrize("dtype, flush_every", TEMPORAL_CASES, ids=str)
def test_temporal_update(backend, dtype, flush_every):
    """Every element's (count, mean, var) against float64, with blocks longer than the run
    (the float32 block alone), of 4 calls (block starts mid-run, among skipped values) and of
    1 (every value through the master)."""
    steps = 25
    trajectories = temporal_trajectories(dtype, steps)
    state_dtype = ops.moments_dtype(dtype)
    states = [ops.new_state(t[0], state_dtype) for t in trajectories]
    for step in range(steps):
        call(backend, "temporal_update", [t[step] for t in trajectories], *zip(*states),
             flush_every=flush_every)
    for t, state in zip(trajectories, states):
        rcount, rmean, rvar = ops.temporal_stats_reference(t)
        count, mean, var = ops.temporal_stats(*state)
        tally, _, _, master = state
        closed = steps - 1 - (steps - 1) % flush_every  # the call that opened the last block
        assert tally.tolist() == [steps, int((steps - rcount).sum()), 0, closed]
        assert torch.equal(count, rcount)
        seen = rcount > 0
        assert (master[ops.MASTER_COUNT] <= count).all()
        torch.testing.assert_close(mean[seen], rmean[seen], rtol=1e-6, atol=0)
        # the fluctuation variance (~1e-10) itself must be right, not just tiny
        torch.testing.assert_close(var[seen], rvar[seen], rtol=1e-4, atol=0)


def test_temporal_update_backends_agree(backend, monkeypatch):
    """Every backend keeps the same state layout: the same counts, block starts and master
    counts as the plain-torch one's general path (every call as whole-tensor float64 ops), the
    statistics within rounding. For the torch backend this checks its CPU in-place Welford."""
    trajectories = temporal_trajectories(torch.float32, 11)
    update_module = importlib.import_module("lrfluct_fast.ops.temporal_update")
    in_place = update_module._welford_in_place
    taken = []
    monkeypatch.setattr(update_module, "_welford_in_place",
                        lambda *a: taken.append(in_place(*a)) or taken[-1])
    runs = {}
    for name in ("general", backend):
        with monkeypatch.context() as m:
            if name == "general":
                m.setattr(update_module, "_welford_in_place", lambda *a: False)
            states = [ops.new_state(t[0]) for t in trajectories]
            for step in range(11):
                call("torch" if name == "general" else name, "temporal_update",
                     [t[step] for t in trajectories], *zip(*states), flush_every=3)
        runs[name] = states
    if backend == "torch":
        assert any(taken)  # the clean calls inside a block took it
    for mine, theirs in zip(runs[backend], runs["general"]):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
        assert torch.equal(mine[3][ops.MASTER_COUNT], theirs[3][ops.MASTER_COUNT])
        torch.testing.assert_close(mine[2], theirs[2], rtol=1e-5, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(mine[3], theirs[3], rtol=1e-6, atol=1e-12, equal_nan=True)


def extreme_trajectory(dtype, steps=24):
    """Finite values at the edge of `dtype`'s range, as columns: +-max alternating, a first
    value of 0 then values near max, near -max with a little spread, and a small value
    jittering beside a huge one (each column one element)."""
    g = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max if dtype != torch.float64 else 1e150
    t = torch.arange(steps, dtype=torch.float64)
    sign = 1 - 2 * (t % 2)
    cols = [big * 0.99 * sign,
            torch.where(t == 0, 0.0, big * (0.5 + 0.4 * torch.rand(steps, generator=g, dtype=torch.float64))),
            -big * (0.98 + 0.01 * torch.rand(steps, generator=g, dtype=torch.float64)),
            torch.where(t % 5 == 0, big * 0.7, 0.3 + 1e-3 * torch.randn(steps, generator=g, dtype=torch.float64))]
    return torch.stack(cols, 1).to(dtype)


# Triton's interpreter computes the differences that overflow (then escape) with numpy, which warns
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("flush_every", [ops.FLUSH_EVERY, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temporal_update_extremes(backend, dtype, flush_every):
    """Finite values near the dtype's maximum (float32, bf16: +-3.4e38, variance ~1e77) never
    give an infinite or nan mean or variance; float64 values far from 1 keep their M2."""
    x = extreme_trajectory(dtype)
    state = ops.new_state(x[0], ops.moments_dtype(dtype))
    for row in x:
        call(backend, "temporal_update", [row], *([t] for t in state), flush_every=flush_every)
    _, rmean, rvar = ops.temporal_stats_reference(x)
    count, mean, var = ops.temporal_stats(*state)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all(), (mean, var)
    assert (count == len(x)).all()
    scale = rmean.abs() + rvar.sqrt()  # the mean of +-max alternating is 0: relative to the spread
    assert ((mean - rmean).abs() <= 1e-6 * scale).all(), (mean, rmean)
    torch.testing.assert_close(var, rvar, rtol=1e-6, atol=0)
    if dtype in (torch.float32, torch.bfloat16):  # differences beyond 2^48 left the float32 block
        assert state[0][ops.ESCAPED] > 0


def test_temporal_update_float64_far_values(backend):
    """float64 values of 1e200 keep their (zero) M2 and exact mean; 1e150 with a spread of
    1e144 keeps its variance of ~1e288."""
    x = torch.stack([torch.full((9,), 1e200, dtype=torch.float64),
                     1e150 + 1e144 * torch.arange(9, dtype=torch.float64)], 1)
    state = ops.new_state(x[0], torch.float64)
    for row in x:
        call(backend, "temporal_update", [row], *([t] for t in state), flush_every=4)
    _, rmean, rvar = ops.temporal_stats_reference(x)
    _, mean, var = ops.temporal_stats(*state)
    assert mean[0] == rmean[0] == 1e200 and var[0] == rvar[0] == 0
    torch.testing.assert_close(mean, rmean, rtol=1e-15, atol=0)
    torch.testing.assert_close(var, rvar, rtol=1e-9, atol=0)  # block means round to 2e134


LONG_RUN = {"cpp": (1_000_000, None), "torch": (3000, 16), "triton": (300, 8)}  # steps, flush_every


def test_temporal_update_long_run(backend):
    """A weight moving linearly from 0 to 1 over the run, one jittering by 1e-7 of its value
    and a random walk keep their variance and mean within 1e-5 of float64: 1e6 calls of the
    C++ kernel (a few seconds), shorter runs with short blocks for the others (bench/long_run.py
    runs 1e7)."""
    steps, flush_every = LONG_RUN[backend]
    skip_unless_available(backend)
    update = {"cpp": ops.temporal_update, "torch": ops.TORCH_IMPLS["temporal_update"],
              "triton": ops.TRITON_IMPLS["temporal_update"]}[backend]
    run = long_run.Run(steps, update, flush_every)
    run.advance(steps)
    for kind, (var_err, mean_err) in run.errors().items():
        assert var_err < 1e-5 and mean_err < 1e-5, (kind, var_err, mean_err)


def test_opcheck(backend):
    if backend != "cpp":
        pytest.skip("opcheck exercises the registered (dispatched) op")
    call(backend, "batch_stats", torch.zeros(1, 1))  # skips when the extension is missing
    x = make_data((37, 30), torch.float32, "nonfinite")
    torch.library.opcheck(torch.ops.lrfluct.batch_stats.default, (x,))
    torch.library.opcheck(torch.ops.lrfluct.batch_stats.default, (x.to(torch.bfloat16),))
    counts, moments = torch.ops.lrfluct.batch_stats(x)
    torch.library.opcheck(torch.ops.lrfluct.merge_stats.default,
                          (*empty_state(30), counts, moments))
    torch.library.opcheck(torch.ops.lrfluct.accumulate_stats.default,
                          (x, *empty_state(30), counts, moments, *empty_state(30)))
    w = [torch.randn(4, 3), torch.randn(5)]
    st = [ops.new_state(v) for v in w]
    torch.library.opcheck(torch.ops.lrfluct.temporal_update.default, (w, *map(list, zip(*st))))
    torch.library.opcheck(torch.ops.lrfluct.temporal_update.default, (w, *map(list, zip(*st)), 2))


def test_compile():
    def step(x, counts, moments):
        bc, bm = ops.batch_stats(x * 2)
        ops.merge_stats(counts, moments, bc, bm)
        ops.accumulate_stats(x, counts, moments, bc, bm, counts, moments)

    compiled = torch.compile(step, fullgraph=True)
    x = make_data((16, 8), torch.float32, "normal")
    eager, comp = empty_state(8), empty_state(8)
    step(x, *eager)
    compiled(x, *comp)
    assert torch.equal(eager[0], comp[0])
    torch.testing.assert_close(eager[1], comp[1])


BAD_BATCH_STATS = [
    (lambda: torch.zeros(3), "x must be a 2-D"),
    (lambda: torch.zeros(2, 3, 4, 5), "x must be a 2-D"),
    (lambda: torch.zeros(2, 3, dtype=torch.int64), "x must be float16"),
]


@pytest.mark.parametrize("make, message", BAD_BATCH_STATS)
def test_batch_stats_bad_input(backend, make, message):
    with pytest.raises(ValueError, match=message):
        call(backend, "batch_stats", make())


def bad_merges():
    c, m = empty_state(4)
    bc, bm = empty_state(4)
    yield (c[:2], m, bc, bm), "counts must"
    yield (c.float(), m, bc, bm), "counts"
    yield (c, m[:, :3], bc, bm), "moments must have shape"
    yield (c, m.half(), bc, bm), "moments must have dtype"
    yield (c, m, bc[:, :3], bm), "batch_counts must have shape"
    yield (c, m, bc, bm.float()), "batch_moments must have dtype"
    yield (c, torch.zeros(4, 3, dtype=torch.float64).t(), bc, bm), "moments must be contiguous"


@pytest.mark.parametrize("case", range(7))
def test_merge_bad_input_leaves_state(backend, case):
    args, message = list(bad_merges())[case]
    args[0].fill_(1) if args[0].dtype == torch.int64 else None
    before = [a.clone() for a in args[:2]]
    with pytest.raises(ValueError, match=message):
        call(backend, "merge_stats", *args)
    assert all(torch.equal(a, b) for a, b in zip(args[:2], before))


def bad_temporal():
    w = [torch.randn(3, 2), torch.randn(4)]
    t, s, m, g = map(list, zip(*[ops.new_state(v) for v in w]))
    yield ([], [], [], [], []), "values must be a non-empty list"
    yield (w, t, s[:1], m, g), "same length"
    yield (w, t, s, m, g[:1]), "same length"
    yield ([w[0], w[1].long()], t, s, m, g), r"values\[1\] must be float16"
    yield (w, [t[0], t[1].int()], s, m, g), r"tallies\[1\] must have dtype"
    yield (w, [t[0], t[1][:2]], s, m, g), r"tallies\[1\] must have shape"
    yield (w, t, [s[0], s[1].long()], m, g), r"skipped\[1\] must have dtype"
    yield (w, t, [s[0], s[1][:3]], m, g), r"skipped\[1\] must have shape"
    yield (w, t, s, [m[0], m[1][:2]], g), r"moments\[1\] must have shape"
    yield (w, t, s, [m[0], m[1].half()], g), r"moments\[1\] must have dtype"
    yield (w, t, s, m, [g[0], g[1][:2]]), r"masters\[1\] must have shape"
    yield (w, t, s, m, [g[0], g[1].float()]), r"masters\[1\] must have dtype"
    yield (w, t, s, m, g, 0), "flush_every must be an integer from 1 to 16777216, got 0"
    yield (w, t, s, m, g, 1 << 25), "flush_every must be an integer from 1 to 16777216"


@pytest.mark.parametrize("case", range(14))
def test_temporal_bad_input_leaves_state(backend, case):
    args, message = list(bad_temporal())[case]
    state = [x for lst in args[1:5] for x in lst]
    before = [x.clone() for x in state]
    with pytest.raises(ValueError, match=message):
        call(backend, "temporal_update", *args)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def test_fallback_without_extension():
    """Without the C++ extension the package imports, warns once and runs on torch ops."""
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lrfluct_fast as lf\n"
        "    import lrfluct_fast\n"
        "print(sum('C++ extension not available' in str(x.message) for x in w))\n"
        "print(lf.backend('cpu'))\n"
        "c, m = torch.ops.lrfluct.batch_stats(torch.tensor([[1.0], [3.0]]))\n"
        "print(lf.ops.mean_of(m).item(), m[1].item())\n"
    )
    env = dict(os.environ, LRFLUCT_DISABLE_CPP="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "torch", "2.0", "2.0"]
