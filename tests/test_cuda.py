"""The monitor on CUDA tensors (Triton kernels) against the float64 hook-snapshot reference.

Eager layers observe through the C++ Observer where the extension is built (csrc/observe.cpp:
the registered ops called through the dispatcher) and through nn/observe.py's Python
function otherwise; the eager tests run both ("cpp" skips where the extension is not loaded).
Skipped without a GPU; bench/gpu_check.py runs it on one.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast._backend import cpp_error
from lrfluct_fast.baselines import HookSnapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mlp():
    return nn.Sequential(nn.Linear(37, 301), nn.ReLU(), nn.Linear(301, 129), nn.GELU(), nn.Linear(129, 7))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 13, 3, padding=1), nn.ReLU(), nn.Conv2d(13, 6, 3, stride=2),
                         nn.Flatten(), nn.LazyLinear(5))


@pytest.fixture(params=["cpp", "python"])
def path(request):
    """The eager observation path: the C++ Observer, or the Python function."""
    if request.param == "cpp" and lf.backend("cpu") != "cpp":
        pytest.skip(f"C++ extension not loaded ({cpp_error()})")
    return request.param


def on_path(monitor, path):
    if path == "python":
        for st in monitor.states.values():
            st.observer = None
    else:
        assert all(st.observer is not None for st in monitor.states.values())
    return monitor


def train(model, monitor_cls, x, y, steps=4, autocast=False, path=None):
    monitor = monitor_cls(model)
    if path is not None:
        on_path(monitor, path)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()
        monitor.step()
    return monitor.summary()


@pytest.mark.parametrize("make, shape, autocast", [
    (mlp, (64, 37), False), (mlp, (64, 37), True), (cnn, (8, 3, 11, 11), False)])
def test_cuda_matches_snapshot(make, shape, autocast, path):
    assert lf.backend("cuda") == "triton"
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda")
    model = make().cuda()
    model(x)  # materialise lazy layers
    y = torch.randn_like(model(x).float())
    ours = train(copy.deepcopy(model), lf.instrument, x, y, autocast=autocast, path=path)
    ref = train(copy.deepcopy(model), HookSnapshot, x, y, autocast=autocast)
    rtol = 2e-2 if autocast else 1e-4
    for layer, keys in ours.items():
        for key, got in keys.items():
            want = ref[layer][key]
            if key.endswith(("count", "nonfinite")) or key == "steps":
                np.testing.assert_array_equal(got, want, err_msg=f"{layer} {key}")
            else:
                scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
                np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=f"{layer} {key}")


def test_eager_monitored_step_replays_in_a_cuda_graph(path):
    # capture needs no host synchronisation and the same allocations every step: a captured
    # monitored forward + backward replays, and each replay is counted
    torch.manual_seed(0)
    model = mlp().cuda()
    mon = on_path(lf.instrument(model), path)
    x = torch.randn(64, 37, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as CUDA graphs want
        for _ in range(3):
            model(x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: counts nothing
        model(x).square().mean().backward()
    for _ in range(4):
        graph.replay()
    torch.cuda.synchronize()
    summary = mon.summary()
    for layer in ("0", "2", "4"):
        np.testing.assert_array_equal(summary[layer]["activation.count"], 7 * 64)
        np.testing.assert_array_equal(summary[layer]["gradient.count"], 7 * 64)


def test_compiled_monitored_step_is_cuda_graphed():
    # torch.compile(mode="reduce-overhead") graphs the monitored step: no cudagraph skips
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = mlp().cuda()
    mon = lf.instrument(model)
    x = torch.randn(64, 37, device="cuda")

    def forward_backward(x):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    counters.clear()
    step = torch.compile(forward_backward, mode="reduce-overhead")
    for _ in range(5):
        step(x)
    torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    np.testing.assert_array_equal(mon.summary()["0"]["activation.count"], 5 * 64)


def test_overlap_weights_records_the_same(path):
    # the weight update on a side stream, overlapping the next forward: the same statistics,
    # and training the same parameters, as the update in line
    runs = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        model = mlp().cuda()
        mon = on_path(lf.instrument(model, overlap_weights=overlap), path)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        x = torch.randn(64, 37, device="cuda")
        for _ in range(6):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            mon.step()
        runs[overlap] = mon.summary(), [p.detach().clone() for p in model.parameters()]
        mon.remove()
    (plain, plain_params), (overlapped, over_params) = runs[False], runs[True]
    for a, b in zip(plain_params, over_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for layer, keys in plain.items():
        for key, want in keys.items():
            np.testing.assert_allclose(overlapped[layer][key], want, rtol=1e-6, err_msg=f"{layer} {key}")
