"""lrfluct_fast.sharpness: the top Hessian eigenvalue (plain and Adam-preconditioned) against
the exact float64 Hessian's eigvalsh, the largest algebraic eigenvalue under a dominant
negative one, warm starts, a measurement that changes nothing of training, bad input."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lrfluct_fast as lf
from lrfluct_fast.sharpness import SharpnessTracker, adam_preconditioner, top_hessian_eigenvalue

RTOL = 1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small double backwards: one thread is fastest, and immune to busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp():
    torch.manual_seed(0)  # 355 parameters
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3)).double()


def _conv():
    torch.manual_seed(1)  # 335 parameters (no stride: a strided conv's double backward is slow on CPU)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()


def _data(model):
    g = torch.Generator().manual_seed(2)
    shape = (16, 6) if isinstance(model[0], nn.Linear) else (16, 2, 6, 6)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(16, 3, generator=g, dtype=torch.float64))


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _case(name):
    """(model, monitor or None, batch): the MLP plain or instrumented, or the conv net."""
    model = _conv() if name == "conv" else _mlp()
    mon = lf.instrument(model) if name == "mlp-instrumented" else None
    return model, mon, _data(model)


def _exact_hessian(model, batch) -> torch.Tensor:
    names = [n for n, p in model.named_parameters()]
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def f(flat):
        ps, i = {}, 0
        for n, p in zip(names, params):
            ps[n] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        x, y = batch
        return F.mse_loss(functional_call(model, ps, (x,)), y)
    return torch.autograd.functional.hessian(f, flat0)


def _paused(mon):
    return mon.paused() if mon is not None else contextlib.nullcontext()


def _adam_steps(model, batch, steps=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return opt


def _rel(a, b):
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------
# 1. against the exact Hessian
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "mlp-instrumented", "conv"])
def test_sharpness_equals_the_largest_eigenvalue_of_the_exact_hessian(name):
    model, mon, batch = _case(name)
    params = list(model.parameters())
    with _paused(mon):
        h = _exact_hessian(model, batch)
    want = torch.linalg.eigvalsh(h)[-1].item()
    with _paused(mon):
        got, vector = top_hessian_eigenvalue(lambda: _loss(model, batch), params)
    assert _rel(got, want) < RTOL, (got, want)
    v = torch.cat([t.flatten() for t in vector])
    assert abs(v.norm().item() - 1) < 1e-9
    assert _rel((v @ h @ v).item(), want) < RTOL              # its Rayleigh quotient
    assert all(p.grad is None for p in params)                # no gradient left behind
    if mon is not None:                                       # nothing observed
        with pytest.warns(RuntimeWarning, match="no observation for layer"):
            assert all((s["activation.count"] == 0).all() for s in mon.summary().values())


@pytest.mark.parametrize("name", ["mlp", "mlp-instrumented", "conv"])
def test_preconditioned_sharpness_equals_the_exact_one(name):
    model, mon, batch = _case(name)
    opt = _adam_steps(model, batch)
    p = adam_preconditioner(opt)
    # Adam's own denominator: exp_avg_sq bias-corrected, square root, plus eps
    for q, t in zip(model.parameters(), p):
        st = opt.state[q]
        want = (st["exp_avg_sq"] / (1 - 0.999 ** st["step"].item())).sqrt() + 1e-8
        torch.testing.assert_close(t, want, rtol=1e-12, atol=0)
    d = torch.cat([t.flatten() for t in p]).rsqrt()
    with _paused(mon):
        h = _exact_hessian(model, batch)
    want = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1].item()
    tracker = SharpnessTracker(model, _loss, batch, every=1, optimizer=opt, monitor=mon)
    got = tracker.measure(3)
    assert _rel(got["preconditioned_sharpness"], want) < RTOL, (got, want)
    value, _ = top_hessian_eigenvalue(lambda: _loss(model, batch), list(model.parameters()),
                                      preconditioner=p)
    assert _rel(value, want) < RTOL
    plain = torch.linalg.eigvalsh(h)[-1].item()
    assert _rel(got["sharpness"], plain) < RTOL


def test_largest_algebraic_eigenvalue_under_a_dominant_negative_one():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    for spectrum in (torch.cat([torch.tensor([-50.0, -20.0]), torch.linspace(0.1, 3.0, 38)]),
                     -torch.linspace(1.0, 9.0, 40)):         # every eigenvalue negative: -1
        a = q @ torch.diag(spectrum.double()) @ q.T
        w = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
        value, _ = top_hessian_eigenvalue(lambda: 0.5 * w @ a @ w, [w], tol=1e-6)
        assert _rel(value, spectrum.max().item()) < 1e-6, value


def test_warm_start_takes_fewer_products_after_a_small_change():
    model, _, batch = _case("mlp")
    tracker = SharpnessTracker(model, _loss, batch, every=1, iters=60, tol=1e-4)
    first = tracker.measure(0)
    cold = tracker.last_products["sharpness"]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()
    second = tracker.measure(1)
    warm = tracker.last_products["sharpness"]
    fresh = SharpnessTracker(model, _loss, batch, every=1, iters=60, tol=1e-4)
    assert _rel(fresh.measure(1)["sharpness"], second["sharpness"]) < 1e-4
    assert warm < fresh.last_products["sharpness"] and warm < cold, (warm, cold)
    assert second["sharpness"] != first["sharpness"]


# ---------------------------------------------------------------------------------------
# 2. a measurement changes nothing of training
# ---------------------------------------------------------------------------------------
class _Net(nn.Module):
    """BatchNorm (running statistics) and dropout (the global random state) in train mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1, self.bn, self.drop, self.fc2 = (nn.Linear(6, 20), nn.BatchNorm1d(20),
                                                  nn.Dropout(0.2), nn.Linear(20, 3))

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _train(measure: bool):
    model = _Net()
    mon = lf.instrument(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = tuple(t.float() for t in _data(_mlp()))
    tracker = SharpnessTracker(model, _loss, probe, every=2, optimizer=opt, monitor=mon) if measure else None
    torch.manual_seed(5)
    for step in range(6):
        x = torch.randn(8, 6)
        opt.zero_grad()
        _loss(model, (x, x[:, :3])).backward()
        if tracker is not None:
            grads = [p.grad.clone() for p in model.parameters()]
            ids = [id(p.grad) for p in model.parameters()]
            tracker.maybe_measure(step)                     # between backward and step
            assert [id(p.grad) for p in model.parameters()] == ids
            for p, g in zip(model.parameters(), grads):
                assert torch.equal(p.grad, g)
        opt.step()
        mon.step()
    return model, mon, tracker


def test_statistics_and_training_identical_with_and_without_measurements():
    plain_model, plain_mon, _ = _train(measure=False)
    model, mon, tracker = _train(measure=True)
    assert tracker.history["step"] == [0, 2, 4]
    precond = tracker.history["preconditioned_sharpness"]
    assert np.isnan(precond[0]) and all(np.isfinite(precond[1:]))  # no Adam state at step 0
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name                        # parameters and BN buffers
    want, got = plain_mon.summary(), mon.summary()
    for layer in want:
        for key in want[layer]:
            np.testing.assert_array_equal(got[layer][key], want[layer][key], err_msg=f"{layer} {key}")


def test_tracker_logs_to_the_monitor_run_directory(tmp_path):
    model, _, batch = _case("mlp")
    mon = lf.instrument(model, log_dir=tmp_path / "run")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = SharpnessTracker(model, _loss, batch, every=2, optimizer=opt, monitor=mon)
    for step in range(5):
        tracker.maybe_measure(step)
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        mon.step()
    mon.close()
    scalars = lf.load_run(tmp_path / "run").scalars
    assert sorted(scalars) == ["preconditioned_sharpness", "sharpness"]
    for key in scalars:
        assert scalars[key][0].tolist() == tracker.history["step"] == [0, 2, 4]
        np.testing.assert_array_equal(scalars[key][1], tracker.history[key])
    assert np.isnan(tracker.history["preconditioned_sharpness"][0])  # no Adam state at step 0


def test_sgd_has_no_preconditioned_sharpness():
    model, _, batch = _case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    assert adam_preconditioner(opt) is None
    assert adam_preconditioner(torch.optim.Adam(model.parameters())) is None   # no state yet
    tracker = SharpnessTracker(model, _loss, batch, every=3, optimizer=opt)
    assert tracker.maybe_measure(1) is None
    assert list(tracker.maybe_measure(3)) == ["sharpness"]
    assert list(tracker.history) == ["step", "sharpness"]


# ---------------------------------------------------------------------------------------
# 3. bad input
# ---------------------------------------------------------------------------------------
def test_probe_of_the_wrong_shape_is_refused_at_construction():
    model, _, (x, y) = _case("mlp")
    with pytest.raises(ValueError, match="probe: loss_fn\\(model, probe\\) failed on the probe batch"):
        SharpnessTracker(model, _loss, (x[:, :4], y), every=1)
    with pytest.raises(ValueError, match="scalar"):
        SharpnessTracker(model, lambda m, b: m(b[0]), (x, y), every=1)
    with pytest.raises(TypeError, match="probe must be"):
        SharpnessTracker(model, _loss, 3.0, every=1)


def test_model_without_trainable_parameters_is_refused():
    model, _, batch = _case("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SharpnessTracker(model, _loss, batch, every=1)
    with pytest.raises(ValueError, match="params must hold at least one"):
        top_hessian_eigenvalue(lambda: _loss(model, batch), [])
    with pytest.raises(ValueError, match="params\\[0\\] must be a tensor that requires grad"):
        top_hessian_eigenvalue(lambda: _loss(model, batch), list(model.parameters()))


@pytest.mark.parametrize("option,value,error", [
    ("every", 0, ValueError), ("every", 1.5, TypeError), ("every", True, TypeError),
    ("iters", 0, ValueError), ("iters", "20", TypeError),
    ("tol", 0.0, ValueError), ("tol", 1.0, ValueError), ("tol", float("nan"), ValueError),
    ("tol", "1e-3", TypeError)])
def test_every_iters_tol_are_checked(option, value, error):
    model, _, batch = _case("mlp")
    kwargs = {"every": 1, option: value}
    with pytest.raises(error, match=option):
        SharpnessTracker(model, _loss, batch, **kwargs)
    if option != "every":
        with pytest.raises(error, match=option):
            top_hessian_eigenvalue(lambda: _loss(model, batch), list(model.parameters()),
                                   **{option: value})


def test_init_and_preconditioner_are_checked():
    model, _, batch = _case("mlp")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="init\\[1\\] must be a tensor of shape \\(16,\\)"):
        top_hessian_eigenvalue(lambda: _loss(model, batch), params,
                               init=[torch.ones_like(params[0]), torch.ones(3)] + params[2:])
    with pytest.raises(ValueError, match="preconditioner\\[0\\] must be finite and positive"):
        top_hessian_eigenvalue(lambda: _loss(model, batch), params,
                               preconditioner=[torch.zeros_like(p) for p in params])
    tracker = SharpnessTracker(model, _loss, batch, every=1)
    with pytest.raises(ValueError, match="step"):
        tracker.measure(-1)


def _with_grads(model, batch):
    _loss(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_nonfinite_loss_gives_nan_with_a_warning_and_leaves_grads():
    model, _, batch = _case("mlp")
    poisoned = {"on": False}

    def loss_fn(m, b):
        loss = _loss(m, b)
        return loss * float("nan") if poisoned["on"] else loss
    tracker = SharpnessTracker(model, loss_fn, batch, every=1)
    grads = _with_grads(model, batch)
    poisoned["on"] = True
    with pytest.warns(RuntimeWarning, match="sharpness at step 0 is nan: the loss is not finite"):
        assert np.isnan(tracker.measure(0)["sharpness"])
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    poisoned["on"] = False                                    # the next measurement works
    assert np.isfinite(tracker.measure(1)["sharpness"])
    with pytest.warns(RuntimeWarning, match="loss is not finite"):
        value, vector = top_hessian_eigenvalue(lambda: loss_fn(model, batch) * float("inf"),
                                               list(model.parameters()))
    assert np.isnan(value) and len(vector) == len(grads)


def test_nonfinite_hessian_vector_product_gives_nan_with_a_warning():
    model, _, batch = _case("mlp")
    with torch.no_grad():
        model[0].bias[0] = 0.0

    def loss_fn(m, b):  # |b|^1.5 is finite with a finite gradient at 0, its curvature is not
        return _loss(m, b) + m[0].bias[0].abs().pow(1.5)
    tracker = SharpnessTracker(model, loss_fn, batch, every=1)
    grads = _with_grads(model, batch)
    with pytest.warns(RuntimeWarning, match="Hessian-vector product 1 is not finite"):
        assert np.isnan(tracker.measure(0)["sharpness"])
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_adam_not_holding_every_trainable_parameter_is_refused():
    model, _, batch = _case("mlp")
    opt = torch.optim.Adam(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="optimizer does not hold the trainable parameters "
                                         "\\['2.weight'"):
        SharpnessTracker(model, _loss, batch, every=1, optimizer=opt)
