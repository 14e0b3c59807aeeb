"""HookSnapshot (float64 reference) vs HookStreaming vs statistics computed by hand."""
import numpy as np
import pytest
import torch
from torch import nn

from lrfluct_fast import baselines

KEYS = {"activation.count", "activation.mean", "activation.var", "activation.active_fraction",
        "activation.nonfinite", "gradient.count", "gradient.mean", "gradient.var",
        "gradient.nonfinite", "weight.temporal_var", "weight.spread", "bias.spread", "steps"}


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def convnet():
    # odd sizes, a bias-free layer and a Conv1d so every reshaping path runs
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False),
                         nn.Flatten(2), nn.Conv1d(3, 2, 2), nn.Flatten(), nn.Linear(2 * 19, 3))


def make_input(model, batch):
    return torch.randn(batch, 5) if isinstance(model[0], nn.Linear) else torch.randn(batch, 2, 4, 5)


def train(model, monitors, steps=3, batch=6, micro=1, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            model(make_input(model, batch)).square().mean().backward()
        opt.step()
        for mon in monitors:
            mon.step()


def assert_summaries_close(got, ref, rtol=1e-4, atol=1e-6):
    assert got.keys() == ref.keys()
    for layer in ref:
        assert set(ref[layer]) == KEYS
        for key in KEYS:
            np.testing.assert_allclose(got[layer][key], ref[layer][key], rtol=rtol, atol=atol,
                                       err_msg=f"{layer} {key}")


@pytest.mark.parametrize("build", [mlp, convnet])
def test_streaming_matches_snapshot(build):
    torch.manual_seed(0)
    model = build()
    snap, stream = baselines.HookSnapshot(model), baselines.HookStreaming(model)
    assert snap.layers == stream.layers == [n for n, m in model.named_modules()
                                            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    train(model, [snap, stream])
    ref = snap.summary()
    got = stream.summary()
    assert_summaries_close(got, ref)
    # weights move little between steps, so atol alone would hide temporal_var errors;
    # float32 Welford on values ~0.3 with steps ~1e-5 keeps ~1e-4 relative accuracy
    for layer in ref:
        np.testing.assert_allclose(got[layer]["weight.temporal_var"],
                                   ref[layer]["weight.temporal_var"], rtol=1e-3, atol=0)
    assert all(int(s["steps"]) == 3 for s in ref.values())
    assert all(np.all(s["weight.temporal_var"] > 0) for s in ref.values())
    if build is convnet:
        assert np.isnan(ref["2"]["bias.spread"]).all()
    m = stream.metrics()
    assert set(m) == set(ref)
    assert all(np.isfinite(v["spread_of_spread"]) for v in m.values())


def test_snapshot_matches_numpy_by_hand():
    torch.manual_seed(1)
    model = mlp()
    snap = baselines.HookSnapshot(model)
    zs, grads, weights = [], [], []

    def capture(module, args, out):
        zs.append(out.detach().double().numpy().copy())
        out.register_hook(lambda g: grads.append(g.double().numpy().copy()))

    model[0].register_forward_hook(capture)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        snap.step()
        weights.append(model[0].weight.detach().double().numpy().copy())
    z, g, w = np.concatenate(zs), np.concatenate(grads), np.stack(weights)
    s = snap.summary()["0"]
    np.testing.assert_array_equal(s["activation.count"], np.full(7, 12))
    np.testing.assert_allclose(s["activation.mean"], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["activation.var"], z.var(0), rtol=1e-12)
    np.testing.assert_allclose(s["activation.active_fraction"], (z > 0).mean(0))
    np.testing.assert_allclose(s["gradient.mean"], g.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s["gradient.var"], g.var(0), rtol=1e-12)
    np.testing.assert_allclose(s["weight.temporal_var"], w.var(0), rtol=1e-12)
    np.testing.assert_allclose(s["weight.spread"], np.sqrt(w.var(0).mean(1)), rtol=1e-12)


@pytest.mark.parametrize("cls", [baselines.HookSnapshot, baselines.HookStreaming])
def test_only_training_forwards_with_backward_count(cls):
    torch.manual_seed(2)
    model = mlp()
    mon = cls(model)
    model.eval()
    model(torch.randn(4, 5)).sum().backward()  # eval mode
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 5))
    model(torch.randn(4, 5))  # training forward whose backward never runs (DESIGN: not counted)
    s = mon.summary()
    assert all((s[layer]["activation.count"] == 0).all() for layer in mon.layers)
    assert all(np.isnan(s[layer]["activation.mean"]).all() for layer in mon.layers)
    model(torch.randn(4, 5)).sum().backward()
    assert (mon.summary()["0"]["activation.count"] == 4).all()


@pytest.mark.parametrize("cls", [baselines.HookSnapshot, baselines.HookStreaming])
def test_nonfinite_counted_and_excluded(cls):
    torch.manual_seed(3)
    model = mlp()
    mon = cls(model)
    x = torch.randn(6, 5)
    x[2, 1] = float("nan")
    model(x).sum().backward()
    s = mon.summary()["0"]
    np.testing.assert_array_equal(s["activation.nonfinite"], np.ones(7))
    np.testing.assert_array_equal(s["activation.count"], np.full(7, 5))
    assert np.isfinite(s["activation.mean"]).all() and np.isfinite(s["activation.var"]).all()
    assert np.isfinite(s["activation.active_fraction"]).all()


@pytest.mark.parametrize("cls", [baselines.HookSnapshot, baselines.HookStreaming])
def test_nonfinite_weight_excluded_per_element(cls):
    model = mlp()
    mon = cls(model)
    with torch.no_grad():
        for value in (1.0, 3.0, float("nan")):
            model[0].weight.fill_(value)
            mon.step()
    tv = mon.summary()["0"]["weight.temporal_var"]
    np.testing.assert_allclose(tv, np.full((7, 5), 1.0))


@pytest.mark.parametrize("cls", [baselines.HookSnapshot, baselines.HookStreaming])
def test_gradient_accumulation_counts_every_micro_batch(cls):
    torch.manual_seed(4)
    model = mlp()
    mon = cls(model)
    train(model, [mon], steps=1, batch=4, micro=2)
    s = mon.summary()
    for layer in mon.layers:
        assert (s[layer]["activation.count"] == 8).all()
        assert (s[layer]["gradient.count"] == 8).all()
    assert int(s["0"]["steps"]) == 1


def test_memory_snapshot_grows_streaming_flat():
    torch.manual_seed(5)
    model = mlp()
    snap, stream = baselines.HookSnapshot(model), baselines.HookStreaming(model)
    train(model, [snap, stream], steps=1)
    s1, t1 = snap.memory_bytes(), stream.memory_bytes()
    train(model, [snap, stream], steps=3)
    assert snap.memory_bytes() > 3 * s1
    assert stream.memory_bytes() == t1 > 0


@pytest.mark.parametrize("cls", [baselines.HookSnapshot, baselines.HookStreaming])
def test_reset_and_remove(cls):
    torch.manual_seed(6)
    model = mlp()
    mon = cls(model)
    train(model, [mon], steps=2)
    mon.reset()
    s = mon.summary()["0"]
    assert int(s["steps"]) == 0 and (s["activation.count"] == 0).all()
    assert mon.memory_bytes() == 0
    model(torch.randn(3, 5)).sum().backward()
    pending = model(torch.randn(3, 5)).sum()  # its backward runs after remove(): ignored
    mon.remove()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    pending.backward()
    model(torch.randn(3, 5)).sum().backward()
    mon.step()
    s = mon.summary()["0"]
    assert (s["activation.count"] == 3).all() and int(s["steps"]) == 0
