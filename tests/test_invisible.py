"""instrument() is invisible to training: the oracle is the plain, uninstrumented twin.

Each test builds the same seeded model twice, instruments one copy, runs both the same way
and requires the plain model's numbers: gradients (bit for bit where both run the same
kernels), second order, torch.func, torch.compile, mixed precision, model manipulations;
and that what the statistics record under each of them is what nn/observe.py documents.
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint

import lrfluct_fast as lf
from lrfluct_fast.baselines import HookSnapshot

from models import batches, build
from twins import assert_summaries_close, loss_of


class Convs(nn.Module):
    """Conv2d (padding='same') -> in-place ReLU -> Conv2d (reflect padding) -> Linear, all
    with bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 5, 3, padding="same")
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(5, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4 * 3 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(self.act(self.c1(x)))).flatten(1))


def plain_and_wrapped(name, seed=0, dtype=torch.float32, **options):
    """(plain model, instrumented twin, its Monitor)."""
    torch.manual_seed(seed)
    plain = (Convs() if name == "convs" else build(name, seed)).to(dtype)
    wrapped = copy.deepcopy(plain)
    return plain, wrapped, lf.instrument(wrapped, **options)


def make_input(name, batch=6, seed=1, dtype=torch.float32):
    if name == "convs":
        return torch.randn(batch, 2, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return batches(name, 1, batch=batch, seed=seed)[0].to(dtype)


def params(model):
    return dict(model.named_parameters())


def assert_grads_equal(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), (n, (p.grad - q.grad).abs().max())


def counts(mon, layer="fc1"):
    s = mon.summary()[layer]
    return int(s["activation.count"][0]), int(s["gradient.count"][0])


# ---------------------------------------------------------------------------------------
# 1. exact gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["mlp", "cnn", "convs", "block"])
def test_training_bitwise_equal_to_plain(name, dtype):
    plain, wrapped, mon = plain_and_wrapped(name, dtype=dtype)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, wrapped)]
    for step in range(3):
        x = make_input(name, seed=step, dtype=dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        losses = [loss_of(m(xi).float()) for m, xi in zip((plain, wrapped), xs)]
        for loss in losses:
            loss.backward()
        assert torch.equal(losses[0], losses[1])
        assert torch.equal(xs[0].grad, xs[1].grad)
        assert_grads_equal(plain, wrapped)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        mon.step()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)
    assert all(int(s["gradient.count"][0]) > 0 for s in mon.summary().values())


@pytest.mark.parametrize("rows, outlier", [(65536, 100.0), (1 << 20, 1e4)])
def test_bias_gradient_of_outlier_rows_and_a_million_rows(rows, outlier):
    # dL/dz with one huge first row: the bias gradient is torch's own reduction, bit for bit,
    # so it is as accurate against float64 as the plain layer's
    torch.manual_seed(3)
    plain = nn.Linear(8, 16)
    wrapped = copy.deepcopy(plain)
    mon = lf.instrument(wrapped)
    x = torch.randn(rows, 8)
    g = torch.randn(rows, 16)
    g[0] = outlier
    plain(x).backward(g)
    wrapped(x).backward(g)
    assert_grads_equal(plain, wrapped)
    exact = g.double().sum(0)
    err = (wrapped.bias.grad.double() - exact).abs().max()
    assert err == (plain.bias.grad.double() - exact).abs().max()
    s = mon.summary()[""]
    assert (s["gradient.count"] == rows).all()
    # float32 statistics are held relative to a shift, the first row's 100 or 1e4: a mean
    # near 0 is then known to float32 precision of that shift
    np.testing.assert_allclose(s["gradient.mean"], (exact / rows).numpy(), rtol=1e-5,
                               atol=4 * torch.finfo(torch.float32).eps * outlier)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_bitwise_equal_to_plain(dtype):
    for name in ("mlp", "convs"):
        plain, wrapped, mon = plain_and_wrapped(name, seed=4)
        x = make_input(name, seed=5)
        for m in (plain, wrapped):
            with torch.autocast("cpu", dtype=dtype):
                out = m(x)
            assert out.dtype == dtype
            loss_of(out.float()).backward()
        assert_grads_equal(plain, wrapped)
        s = next(iter(mon.summary().values()))
        assert (s["activation.count"] > 0).all() and np.isfinite(s["gradient.var"]).all()


# ---------------------------------------------------------------------------------------
# 2. second order; the counting rule of a penalty; paused()
# ---------------------------------------------------------------------------------------
def test_gradient_penalty_and_double_backward_equal_plain():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=6, dtype=torch.float64)
    x = make_input("mlp", seed=7, dtype=torch.float64)
    for m in (plain, wrapped):
        loss = loss_of(m(x))
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        (loss + penalty).backward()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-12)
    # both backwards reached the forward: it counted twice (nn/observe.py)
    assert counts(mon) == (12, 12)


def test_penalty_counted_once_when_its_first_backward_is_paused():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=6, dtype=torch.float64)
    x = make_input("mlp", seed=7, dtype=torch.float64)
    loss = loss_of(wrapped(x))
    with mon.paused():
        grads = torch.autograd.grad(loss, list(wrapped.parameters()), create_graph=True)
    (loss + sum(g.square().sum() for g in grads)).backward()
    assert counts(mon) == (6, 6)
    # the gradient recorded is d(loss + penalty)/dz: the plain model's, through a hook
    z = {}

    def keep_grad(module, inputs, out):
        out.register_hook(lambda g: z.update(g=g))
    plain.fc1.register_forward_hook(keep_grad)
    loss = loss_of(plain(x))
    grads = torch.autograd.grad(loss, list(plain.parameters()), create_graph=True)
    z.clear()
    (loss + sum(g.square().sum() for g in grads)).backward()
    np.testing.assert_allclose(mon.summary()["fc1"]["gradient.mean"], z["g"].mean(0).detach(),
                               rtol=1e-12, atol=1e-15)


def test_autograd_functional_equals_plain_and_paused_counts_nothing():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=8, dtype=torch.float64)
    x = make_input("mlp", seed=9, dtype=torch.float64)
    names = [n for n, _ in plain.named_parameters()]

    def loss_fn(model):
        def f(*ps):
            return loss_of(functional_call(model, dict(zip(names, ps)), (x,)))
        return f

    def xfn(model):
        return lambda inp: model(inp).sum(1)

    p0 = tuple(p.detach().clone() for p in plain.parameters())
    v = tuple(torch.randn_like(p) for p in p0)
    vx = torch.randn(6, dtype=torch.float64)
    before = mon.summary()
    with mon.paused():
        results = {m: (torch.autograd.functional.hvp(loss_fn(m), p0, v)[1],
                       torch.autograd.functional.vhp(loss_fn(m), p0, v)[1],
                       torch.autograd.functional.jvp(xfn(m), x, x)[1],
                       torch.autograd.functional.vjp(xfn(m), x, vx)[1])
                   for m in (plain, wrapped)}
    for a, b in zip(results[plain], results[wrapped]):
        for s, t in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(t, s, rtol=0, atol=1e-12)
    after = mon.summary()
    for layer in before:
        for key in ("activation.count", "gradient.count"):
            np.testing.assert_array_equal(after[layer][key], before[layer][key])
    # outside paused(), the same hvp is as exact and counts its forward and backwards
    h = torch.autograd.functional.hvp(loss_fn(wrapped), p0, v)[1]
    for s, t in zip(results[plain][0], h):
        torch.testing.assert_close(t, s, rtol=0, atol=1e-12)
    assert counts(mon)[0] > 0


def test_top_hessian_eigenvalue_equals_plain():
    # small enough for the exact Hessian by one double backward per parameter (83 of them)
    torch.manual_seed(10)
    plain = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    wrapped = copy.deepcopy(plain)
    mon = lf.instrument(wrapped)
    x = torch.randn(9, 5, dtype=torch.float64)
    top = []
    for m in (plain, wrapped):
        names = [n for n, _ in m.named_parameters()]
        shapes = [p.shape for p in m.parameters()]
        flat0 = torch.cat([p.detach().flatten() for p in m.parameters()])

        def f(flat, m=m, names=names, shapes=shapes):
            ps, i = {}, 0
            for n, s in zip(names, shapes):
                ps[n] = flat[i:i + s.numel()].view(s)
                i += s.numel()
            return loss_of(functional_call(m, ps, (x,)))
        top.append(torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat0))[-1])
    assert abs(float(top[0] - top[1])) <= 1e-12 * abs(float(top[0]))
    assert counts(mon, "0")[0] > 0            # not paused: the Hessian's forward was counted


def test_backward_inside_paused_counts_nothing():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=12)
    x = make_input("mlp", seed=13)
    loss = loss_of(wrapped(x))
    with mon.paused():
        loss.backward()                       # a graph built outside, run inside: not counted
        loss_of(wrapped(x)).backward()        # built and run inside: not counted
    loss_of(wrapped(x)).backward()
    assert counts(mon) == (6, 6)


# ---------------------------------------------------------------------------------------
# 3. torch.func
# ---------------------------------------------------------------------------------------
def test_torch_func_transforms_equal_plain_and_record_nothing():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=14, dtype=torch.float64)
    x = make_input("mlp", seed=15, dtype=torch.float64)

    def run(model):
        ps = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xb):
            return loss_of(functional_call(model, p, (xb,)))

        def out(p, xb):
            return functional_call(model, p, (xb,))
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(ps, x.unsqueeze(1))
        tangent = {k: torch.ones_like(v) for k, v in ps.items()}
        return (torch.func.grad(loss)(ps, x), per_sample,
                torch.func.jacrev(out)(ps, x),
                torch.func.jvp(lambda p: out(p, x), (ps,), (tangent,))[1],
                torch.func.jacfwd(lambda xb: model(xb))(x[:2]))
    got, want = run(wrapped), run(plain)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    s = mon.summary()
    assert all((s[layer]["activation.count"] == 0).all() for layer in s)
    assert all((s[layer]["gradient.count"] == 0).all() for layer in s)


def test_functional_call_outside_transforms_records_as_eager():
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=16)
    x = make_input("mlp", seed=17)
    ps = {k: v.detach().clone().requires_grad_() for k, v in wrapped.named_parameters()}
    loss_of(functional_call(wrapped, ps, (x,))).backward()
    loss_of(plain(x)).backward()
    for (k, p) in plain.named_parameters():
        assert torch.equal(ps[k].grad, p.grad), k
    assert counts(mon) == (6, 6)


def test_forward_mode_ad_equals_plain():
    import torch.autograd.forward_ad as fwAD
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=18, dtype=torch.float64)
    x, t = make_input("mlp", seed=19, dtype=torch.float64), make_input("mlp", seed=20, dtype=torch.float64)
    outs = []
    for m in (plain, wrapped):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------
# 4. torch.compile: statistics equal eager's
# ---------------------------------------------------------------------------------------
def _accumulate(model, xs):
    """Several forwards, one backward (in one graph when compiled)."""
    sum(loss_of(model(x)) for x in xs).backward()


def _micro_batches(model, xs):
    """Several backwards, one per forward."""
    for x in xs:
        loss_of(model(x)).backward()


def _checkpointed(model, xs):
    for x in xs:
        h = checkpoint(lambda t: F.relu(model.fc1(t)), x, use_reentrant=False)
        loss_of(model.out(F.gelu(model.fc2(h)))).backward()


SCENARIOS = {"accumulate": _accumulate, "micro_batches": _micro_batches,
             "checkpoint": _checkpointed}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("what", ["module", "module_fullgraph", "step"])
def test_compiled_statistics_equal_eager(scenario, what):
    torch._dynamo.reset()
    plain, wrapped, mon = plain_and_wrapped("mlp", seed=21)
    eager = copy.deepcopy(plain)
    mon_eager = lf.instrument(eager)
    run = SCENARIOS[scenario]
    xs = [make_input("mlp", seed=s) for s in (22, 23)]
    if what == "step":
        # the whole step compiled (the backward is a graph break torch.compile takes)
        step = torch.compile(lambda xs: run(wrapped, xs), backend="aot_eager")
        step(xs)
    else:
        target = wrapped
        if scenario != "checkpoint":
            target = torch.compile(wrapped, backend="aot_eager", fullgraph=what == "module_fullgraph")
        else:  # checkpoint calls submodules: compile each
            for n in ("fc1", "fc2", "out"):
                setattr(wrapped, n, torch.compile(getattr(wrapped, n), backend="aot_eager",
                                                   fullgraph=what == "module_fullgraph"))
        run(target, xs)
    run(eager, xs)
    got, want = mon.summary(), mon_eager.summary()
    for layer in want:
        assert (want[layer]["activation.count"] == 12).all()
    assert_summaries_close(got, want, rtol=1e-6, atol_rel=1e-7)
    for p, q in zip(eager.parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)


def test_inductor_compiled_training_equals_plain_compiled():
    torch._dynamo.reset()
    plain, wrapped, mon = plain_and_wrapped("convs", seed=24)
    eager = copy.deepcopy(plain)
    mon_eager = lf.instrument(eager)
    compiled = torch.compile(wrapped, fullgraph=True)
    plain_compiled = torch.compile(plain, fullgraph=True)
    for s in range(2):
        x = make_input("convs", seed=30 + s)
        for m in (compiled, plain_compiled, eager):
            loss_of(m(x)).backward()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    assert_summaries_close(mon.summary(), mon_eager.summary(), rtol=1e-5, atol_rel=1e-6)


# ---------------------------------------------------------------------------------------
# 5. GradScaler: unscaled units, skipped steps dropped
# ---------------------------------------------------------------------------------------
def test_grad_scaler_unscaled_and_skipped_steps_dropped():
    torch.manual_seed(25)
    base = build("mlp", 25)
    scaled, reference = copy.deepcopy(base), copy.deepcopy(base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    mon = lf.instrument(scaled, grad_scaler=scaler)
    ref = HookSnapshot(reference)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.05)
    data = batches("mlp", 6, seed=26)
    skip = {2}                                # this step's loss overflows: the scaler skips it
    for i, x in enumerate(data):
        opt_s.zero_grad()
        loss = loss_of(scaled(x))
        scaler.scale(loss * (float("inf") if i in skip else 1.0)).backward()
        scaler.step(opt_s)
        scaler.update()
        mon.step()
        if i not in skip:                    # the reference sees only the kept steps
            opt_r.zero_grad()
            loss_of(reference(x)).backward()
            opt_r.step()
        ref.step()
    assert scaler.get_scale() != 2.0 ** 12    # it backed off, then grew: the units changed
    got, want = mon.summary(), ref.summary()
    for layer in got:
        # activations of the skipped step are real observations; its gradients are dropped
        assert (got[layer]["gradient.count"] == 5 * 6).all()
        for key in ("gradient.mean", "gradient.var"):
            np.testing.assert_allclose(got[layer][key], want[layer][key], rtol=1e-4,
                                       atol=1e-6 * float(np.sqrt(np.nanmax(want[layer]["gradient.var"]))),
                                       err_msg=f"{layer} {key}")
        assert (got[layer]["gradient.nonfinite"] == 0).all()


def test_grad_scaler_option_checked():
    with pytest.raises(TypeError, match="grad_scaler must be None or a torch.amp.GradScaler"):
        lf.instrument(build("mlp"), grad_scaler=2.0)


# ---------------------------------------------------------------------------------------
# 6. model manipulations
# ---------------------------------------------------------------------------------------
def test_copies_of_an_instrumented_model_are_plain():
    plain, wrapped, mon = plain_and_wrapped("cnn", seed=27)
    x = make_input("cnn", seed=28)
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    buf.seek(0)
    copies = [copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped)),
              torch.load(buf, weights_only=False)]
    for c in copies:
        for (n, m), (_, p) in zip(c.named_modules(), plain.named_modules()):
            assert type(m) is type(p) and not hasattr(m, "_lrfluct"), n
        assert torch.equal(c(x), plain(x))
        mon_c = lf.instrument(c)              # a copy can be instrumented on its own
        loss_of(c(x)).backward()
        mon_c.remove()
    loss_of(wrapped(x)).backward()            # the original is still instrumented, alone
    assert int(mon.summary()["conv1"]["activation.count"][0]) == 6 * 4 * 5
    mon.remove()
    assert type(wrapped.conv1) is nn.Conv2d


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrizations_before_and_after_instrument(kind, when):
    torch.manual_seed(29)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    add = {"weight_norm": parametrizations.weight_norm,
           "spectral_norm": parametrizations.spectral_norm,
           "orthogonal": parametrizations.orthogonal}[kind]
    twin = copy.deepcopy(model)
    torch.manual_seed(30)                     # spectral_norm starts from a random vector
    add(twin[0])
    torch.manual_seed(30)
    if when == "before":
        add(model[0])
        mon = lf.instrument(model)
    else:
        mon = lf.instrument(model)
        add(model[0])
    assert "0" in mon.layers
    x = torch.randn(7, 5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for _ in range(2):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            loss_of(m(x)).backward()
            opt.step()
        mon.step()
    assert_grads_equal(twin, model)
    assert counts(mon, "0") == (14, 14)
    mon.remove()
    assert parametrize.is_parametrized(model[0]) and isinstance(model[0], nn.Linear)
    assert not any(hasattr(m, "_lrfluct") for m in model.modules())
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    parametrize.remove_parametrizations(model[0], "weight")
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_dtype_or_device_change_after_instrument_fails_at_once():
    model = build("mlp", 30)
    mon = lf.instrument(model)
    model.double()
    with pytest.raises(RuntimeError, match=r"layer 'fc1': its output is now torch.float64 .*instrument"):
        model(make_input("mlp", dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"layer 'fc1': its weight is now torch.float64"):
        mon.step()
    model.float()                             # back where it was instrumented: it works again
    loss_of(model(make_input("mlp"))).backward()
    mon.step()
    model.to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.empty(2, 13, device="meta"))


# ---------------------------------------------------------------------------------------
# 7. no silent zeros
# ---------------------------------------------------------------------------------------
def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if "no observation" in str(w.message)]


def test_eval_mode_model_warns_once_and_metrics_are_nan():
    model = build("mlp", 31).eval()           # as from_pretrained returns it
    mon = lf.instrument(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches("mlp", 2, seed=32):
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()
        mon.step()
    m, msgs = _warnings_of(mon.metrics)
    assert len(msgs) == 1 and "'fc1'" in msgs[0] and "eval mode" in msgs[0]
    for layer in m:
        assert np.isnan(m[layer]["dead_fraction"]) and np.isnan(m[layer]["mean_active_fraction"])
    _, again = _warnings_of(mon.metrics)
    assert again == []                        # once


def test_no_grad_and_frozen_input_named_in_the_warning():
    model = build("mlp", 33)
    mon = lf.instrument(model, energy="gradient")
    with torch.no_grad():
        model(make_input("mlp"))
    _, msgs = _warnings_of(mon.summary)
    assert "gradients are disabled" in msgs[0]

    torch.manual_seed(34)
    frozen = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    frozen[0].requires_grad_(False)
    mon = lf.instrument(frozen, energy="gradient")
    loss_of(frozen(torch.randn(5, 4))).backward()
    (s, msgs) = _warnings_of(mon.summary)
    assert len(msgs) == 1 and "'0' (gradient: its output needs no gradient" in msgs[0]
    assert (s["0"]["activation.count"] == 5).all()   # its activations are counted at once
    assert np.isnan(mon.metrics()["0"]["participation_ratio"])
    assert np.isfinite(mon.metrics()["2"]["participation_ratio"])


def test_parametrized_bias_is_recorded_as_the_bias():
    # a parametrized bias is computed each step: recorded as the bias, not as the weight
    torch.manual_seed(35)
    model = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "bias", _Double())
    mon = lf.instrument(model)
    values = []
    for step in range(3):
        with torch.no_grad():
            model[0].parametrizations.bias.original.add_(float(step))
        values.append(model[0].bias.detach().clone())
        mon.step()
    want = torch.stack(values).double().var(0, unbiased=False).sqrt()
    np.testing.assert_allclose(mon.summary()["0"]["bias.spread"], want.numpy(), rtol=1e-5)


class _Double(nn.Module):
    def forward(self, b):
        return 2 * b


@pytest.mark.skipif(lf.backend("cpu") != "cpp", reason="C++ extension not built")
def test_cpp_observer_dispatched_path_runs_on_a_non_cpu_device():
    # On CUDA the C++ Observer calls the registered ops through the dispatcher (batch_stats in
    # the forward, accumulate_stats in the backward), with C++ signatures that must match the
    # schemas. Meta tensors take that branch here, through the ops' fake kernels.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to("meta")
    mon = lf.instrument(model)
    assert all(st.observer is not None for st in mon.states.values())
    out = model(torch.randn(5, 4, device="meta"))
    assert out.grad_fn.name() == "AddmmBackward0"  # the layer's own node: the C++ path ran
    out.sum().backward()
    assert model[0].weight.grad.device.type == "meta"


@pytest.mark.skipif(lf.backend("cpu") != "cpp", reason="C++ extension not built")
def test_cpp_observer_and_python_function_record_the_same():
    # eager layers take the C++ Observer (csrc/observe.cpp); the Python Observe is the path
    # under compile: both give the same statistics, including a backward inside paused()
    runs = {}
    for path in ("cpp", "python"):
        plain, wrapped, mon = plain_and_wrapped("convs", seed=36)
        if path == "python":
            for st in mon.states.values():
                st.observer = None
        out = wrapped(make_input("convs", seed=37))
        if path == "cpp":  # no node added: the statistics wait on a hook of the layer's own
            assert out.grad_fn.name() == plain(make_input("convs", seed=37)).grad_fn.name()
        else:
            assert out.grad_fn.name() == "ObserveBackward"
            assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)
        loss_of(out).backward()
        loss = loss_of(wrapped(make_input("convs", seed=38)))
        with mon.paused():
            loss.backward()
        runs[path] = mon.summary()
    assert_summaries_close(runs["cpp"], runs["python"], rtol=0, atol_rel=0)
