"""Windows per statistic (lrfluct_fast/windows.py): each closed window's row equals the
float64 statistics of exactly that window's steps, the whole-run summary stays that of
every step, rows reach the run directory, and state_dict / reset / resume keep both.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrfluct_fast as lf

WINDOWS = {"activation": 2, "gradient": 1, "weight": 3, "bias": 4}
STEPS = 9
LAYERS = ("0", "2")


def _make(**options):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    return net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5), lf.instrument(net, **options)


def _batch(step):  # batches of 3, 4, 5 rows: a window's counts tell its steps apart
    return torch.randn(3 + step % 3, 5, generator=torch.Generator().manual_seed(step))


class _Recorder:
    """Every step's z and dL/dz per layer, and the parameters after each step (float64)."""

    def __init__(self, net):
        self.z = {name: [] for name in LAYERS}
        self.g = {name: [] for name in LAYERS}
        self.w = {name: [] for name in LAYERS}
        self.b = {name: [] for name in LAYERS}
        for name in LAYERS:
            net.get_submodule(name).register_forward_hook(self._hook(name))
        self.net = net

    def _hook(self, name):
        def hook(module, args, out):
            self.z[name].append(out.detach().double())
            out.register_hook(lambda g: self.g[name].append(g.detach().double()))
        return hook

    def after_step(self):
        for name in LAYERS:
            m = self.net.get_submodule(name)
            self.w[name].append(m.weight.detach().double().clone())
            self.b[name].append(m.bias.detach().double().clone())


def _train(net, opt, mon, steps, rec=None, start=1):
    for step in range(start, start + steps):
        opt.zero_grad()
        net(_batch(step)).square().mean().backward()
        opt.step()
        mon.step()
        if rec is not None:
            rec.after_step()


def _reference(rec, statistic, layer, steps):
    """float64 per-neuron statistics of `statistic` over exactly `steps` (1-based)."""
    idx = [s - 1 for s in steps]
    if statistic in ("activation", "gradient"):
        x = torch.cat([(rec.z if statistic == "activation" else rec.g)[layer][i] for i in idx])
        out = {f"{statistic}.count": np.full(x.shape[1], x.shape[0]),
               f"{statistic}.mean": x.mean(0).numpy(), f"{statistic}.var": x.var(0, unbiased=False).numpy(),
               f"{statistic}.nonfinite": np.zeros(x.shape[1])}
        if statistic == "activation":
            out["activation.active_fraction"] = (x > 0).double().mean(0).numpy()
        return out
    series = torch.stack([(rec.w if statistic == "weight" else rec.b)[layer][i] for i in idx])
    var = series.var(0, unbiased=False)
    if statistic == "weight":
        return {"weight.spread": var.mean(1).sqrt().numpy(), "weight.temporal_var": var.numpy()}
    return {"bias.spread": var.sqrt().numpy()}


def _assert_matches(got, want, msg):
    for key, w in want.items():
        if key not in got:
            continue
        g = np.asarray(got[key], dtype=np.float64)
        scale = np.abs(w).max() if np.size(w) else 0.0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale, err_msg=f"{msg} {key}")


def _expected_bounds(every, steps):
    return [(first, min(first + every - 1, steps)) for first in range(1, steps + 1, every)
            if first + every - 1 <= steps]


def test_each_window_equals_float64_over_its_steps_and_the_run_stays_whole():
    net, opt, mon = _make(windows=WINDOWS)
    rec = _Recorder(net)
    _train(net, opt, mon, STEPS, rec)
    rows = mon.closed_windows()
    for statistic, every in WINDOWS.items():
        mine = [r for r in rows if r.statistic == statistic]
        assert [(r.first_step, r.last_step) for r in mine] == _expected_bounds(every, STEPS)
        for r in mine:
            assert set(r.layers) == set(LAYERS)
            for layer in LAYERS:
                assert set(r.layers[layer]) == set(lf.windows.ROW_KEYS[statistic])
                want = _reference(rec, statistic, layer, range(r.first_step, r.last_step + 1))
                _assert_matches(r.layers[layer], want, f"{statistic} window {r.first_step}-{r.last_step} {layer}")
    assert mon.closed_windows() == []  # read rows are forgotten
    summary = mon.summary()  # the whole run: every step, whatever the windows
    for layer in LAYERS:
        assert int(summary[layer]["steps"]) == STEPS
        for statistic in WINDOWS:
            _assert_matches(summary[layer], _reference(rec, statistic, layer, range(1, STEPS + 1)),
                            f"whole run {layer}")


def test_whole_run_summary_as_without_windows():
    a = _make(windows=WINDOWS)
    b = _make()
    _train(*a, STEPS)
    _train(*b, STEPS)
    got, want = a[2].summary(), b[2].summary()
    for layer in LAYERS:
        assert set(got[layer]) == set(want[layer])
        for key, w in want[layer].items():
            np.testing.assert_allclose(got[layer][key], w, rtol=1e-5, atol=1e-12, err_msg=key)
    assert a[2].memory_bytes() == 2 * b[2].memory_bytes()  # the totals beside the windows


def test_close_windows_now_then_aligned_again():
    net, opt, mon = _make(windows={"gradient": 4, "weight": 4})
    _train(net, opt, mon, 2)
    mon.close_windows("weight")
    mon.close_windows()           # the weight window holds no step yet: only gradient closes
    _train(net, opt, mon, 2, start=3)
    got = [(r.statistic, r.first_step, r.last_step) for r in mon.closed_windows()]
    assert got == [("weight", 1, 2), ("gradient", 1, 2), ("gradient", 3, 4), ("weight", 3, 4)]


def test_rows_in_the_run_directory_and_resume_drops_later_ones(tmp_path):
    d = tmp_path / "run"
    net, opt, mon = _make(windows=WINDOWS, log_dir=d)
    _train(net, opt, mon, 4)
    ckpt = mon.state_dict()
    _train(net, opt, mon, 3, start=5)   # logged, then lost to a crash: no close()
    mon._run.writer.drain()
    rows = mon.closed_windows()
    run = lf.load_run(d)
    grad = run.windows["gradient"]
    assert grad.step.tolist() == list(range(1, 8)) and grad.last_step.tolist() == list(range(1, 8))
    for i, r in enumerate(r for r in rows if r.statistic == "gradient"):
        for key, v in r.layers["2"].items():
            np.testing.assert_array_equal(grad.layers["2"][key][i], v, err_msg=key)
    assert run.windows["weight"].first_step.tolist() == [1, 4]

    # a new process resumes from the checkpoint at step 4
    net2, opt2, mon2 = _make(windows=WINDOWS, log_dir=d)
    net2.load_state_dict({k: v for k, v in net.state_dict().items()})  # weights: any; stats: ckpt
    mon2.load_state_dict(ckpt)
    assert lf.load_run(d).windows["gradient"].step.tolist() == [1, 2, 3, 4]
    _train(net2, opt2, mon2, 2, start=5)
    mon2.close()
    run = lf.load_run(d)
    assert run.windows["gradient"].step.tolist() == [1, 2, 3, 4, 5, 6]
    assert run.windows["activation"].last_step.tolist() == [2, 4, 6]
    assert run.windows["bias"].last_step.tolist() == [4]


def test_state_dict_and_reset_keep_windows_and_totals():
    a, b = _make(windows=WINDOWS), _make(windows=WINDOWS)
    _train(*a, 5)
    _train(*b[:2], b[2], 5)
    b[2].load_state_dict(a[2].state_dict())  # same statistics; b's windows restart at step 5
    _train(*a, 4, start=6)
    _train(*b, 4, start=6)
    for layer in LAYERS:
        for key, v in a[2].summary()[layer].items():
            np.testing.assert_allclose(b[2].summary()[layer][key], v, rtol=1e-6, err_msg=key)
    after = [(r.statistic, r.first_step, r.last_step) for r in a[2].closed_windows()][-3:]
    assert after == [(r.statistic, r.first_step, r.last_step) for r in b[2].closed_windows()][-3:]
    mon = a[2]
    mon.reset()
    assert all((t == 0).all() for st in mon.states.values() for t in st.buffers.values())
    _train(*a[:2], mon, 1, start=10)
    assert int(mon.summary()["0"]["gradient.count"][0]) == _batch(10).shape[0]


def test_bad_window_arguments_refused():
    net = torch.nn.Linear(2, 2)
    for windows, error, match in (
            ([1], TypeError, "windows must be None or a dict"),
            ({"grad": 1}, ValueError, "windows: unknown statistic 'grad'"),
            ({"gradient": 0}, ValueError, r"windows\['gradient'\] must be an integer >= 1, got 0"),
            ({"weight": True}, TypeError, r"windows\['weight'\] must be an integer >= 1, got True")):
        with pytest.raises(error, match=match):
            lf.instrument(net, windows=windows)
    mon = lf.instrument(net, windows={"weight": 2})
    with pytest.raises(ValueError, match="statistic must be one of 'weight', got 'gradient'"):
        mon.close_windows("gradient")
    with pytest.raises(ValueError, match="statistic must be one of 'activation'"):
        mon.closed_windows("weights")
    mon.remove()
    with pytest.raises(ValueError, match="close_windows\\(\\) needs windows"):
        lf.instrument(net).close_windows()


class _Tied(torch.nn.Module):
    """An embedding and a head sharing one weight (recorded once, by its first layer)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


@pytest.mark.parametrize("weight_mode", ["element", "neuron"])
def test_whole_run_with_tied_weights_and_neuron_mode(weight_mode):
    """A tied weight's window state is merged into its totals once; both weight modes keep
    the whole run equal to a monitor without windows, and rows have a spread per neuron."""
    runs = []
    for windows in ({"weight": 2, "gradient": 3}, None):
        torch.manual_seed(0)
        model = _Tied()
        mon = lf.instrument(model, windows=windows, weight_mode=weight_mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for step in range(5):
            opt.zero_grad()
            model(torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
            mon.step()
        runs.append(mon)
    got, want = runs[0].summary(), runs[1].summary()
    for layer in want:
        for key, w in want[layer].items():
            np.testing.assert_allclose(got[layer][key], w, rtol=1e-5, atol=1e-12, err_msg=f"{layer} {key}")
    rows = [r for r in runs[0].closed_windows() if r.statistic == "weight"]
    assert [(r.first_step, r.last_step) for r in rows] == [(1, 2), (3, 4)]
    for r in rows:
        assert r.layers["emb"]["weight.spread"].shape == (6,)
        assert r.layers["head"]["weight.spread"].shape == (10,)


def test_weight_windows_longer_than_a_temporal_block(monkeypatch):
    """Blocks of 3 calls (the flush_every Monitor.step reads from ops.FLUSH_EVERY) under weight
    windows of 7 and bias windows of 5: each window's row and the whole run equal float64 over
    exactly their steps, though each window holds closed blocks in its master and an open one."""
    from lrfluct_fast import ops
    monkeypatch.setattr(ops, "FLUSH_EVERY", 3)
    net, opt, mon = _make(windows={"weight": 7, "bias": 5})
    rec = _Recorder(net)
    _train(net, opt, mon, 6, rec)
    master = mon.states["0"].buffers["weight.master"]
    assert (master[ops.MASTER_COUNT] == 3).all()  # a block closed inside the open window
    _train(net, opt, mon, 12, rec, start=7)
    rows = mon.closed_windows()
    assert [(r.statistic, r.first_step, r.last_step) for r in rows] == [
        ("bias", 1, 5), ("weight", 1, 7), ("bias", 6, 10), ("weight", 8, 14), ("bias", 11, 15)]
    summary = mon.summary()
    for layer in LAYERS:
        for r in rows:
            want = _reference(rec, r.statistic, layer, range(r.first_step, r.last_step + 1))
            key = f"{r.statistic}.spread"
            np.testing.assert_allclose(r.layers[layer][key], want[key], rtol=1e-5,
                                       err_msg=f"{layer} {r.statistic} {r.first_step}-{r.last_step}")
        for statistic in ("weight", "bias"):
            want = _reference(rec, statistic, layer, range(1, 19))
            for key, w in want.items():
                np.testing.assert_allclose(summary[layer][key], w, rtol=1e-5, err_msg=f"{layer} {key}")


def _single_level(buffers):
    """A layer's buffers as state_dict version 2 held them: each temporal state (and whole-run
    total) as one level, tally [CALLS, SKIPPED], moments MEAN, M2 about a SHIFT of 0."""
    from lrfluct_fast import ops
    out = {}
    for key, t in buffers.items():
        state = key.rpartition(".")[0]
        if f"{state}.master" not in buffers:
            out[key] = t
        elif key.endswith(".tally"):
            out[key] = t[:2]
        elif key.endswith(".moments"):
            counts, mean, var = ops.temporal_stats(*(buffers[f"{state}.{p}"]
                                                     for p in ("tally", "skipped", "moments", "master")))
            seen = counts > 0
            out[key] = torch.stack([torch.where(seen, mean, 0), torch.where(seen, var * counts, 0),
                                    torch.zeros_like(mean)]).to(t.dtype)
        elif key.endswith(".skipped"):
            out[key] = t
    return out


def test_version_2_state_with_window_totals_resumes():
    a, b = _make(windows=WINDOWS), _make(windows=WINDOWS)
    _train(*a, 5)
    _train(*b, 5)
    sd = a[2].state_dict()
    b[2].load_state_dict({**sd, "version": 2,
                          "layers": {name: _single_level(bufs) for name, bufs in sd["layers"].items()}})
    _train(*a, 4, start=6)
    _train(*b, 4, start=6)
    for layer in LAYERS:
        got, want = b[2].summary()[layer], a[2].summary()[layer]
        for key in ("weight.spread", "weight.temporal_var", "bias.spread"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{layer} {key}")
