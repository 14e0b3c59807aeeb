"""lf.instrument / Monitor / FluctLinear, FluctConv1d, FluctConv2d against the float64
HookSnapshot reference and against plain torch.

Pattern: build the same seeded model twice, instrument one copy with lf.instrument and
observe the other with baselines.HookSnapshot, train both on the same data with the same
optimizer, then compare every summary key of every layer.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lrfluct_fast as lf
from lrfluct_fast.baselines import HookSnapshot
from lrfluct_fast.nn import FluctConv1d, FluctConv2d, FluctLinear

from models import batches, build

from twins import (DESIGN_KEYS, METRIC_KEYS, SUPPORTED, assert_summaries_close,
                   assert_summaries_equal, loss_of, make_opt, train, twins)


def monitored_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]


# ---------------------------------------------------------------------------------------
# 1. agreement with the float64 reference, keys, metrics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "block"])
def test_summary_matches_hook_snapshot(name, opt_kind):
    a, mon, b, ref = twins(name)
    assert list(mon.layers) == monitored_names(a) == ref.layers
    for layer, m in mon.layers.items():
        assert type(m).__name__ == "Fluct" + type(m).__mro__[2].__name__
        assert isinstance(m, SUPPORTED)
    data = batches(name, 4)
    train(a, [mon], data, make_opt(a, opt_kind))
    train(b, [ref], data, make_opt(b, opt_kind))
    got, want = mon.summary(), ref.summary()

    for layer, s in got.items():
        has_bias = mon.layers[layer].bias is not None
        # DESIGN section 2's table; a bias-free layer has no bias.spread to report
        assert set(s) == (DESIGN_KEYS if has_bias else DESIGN_KEYS - {"bias.spread"}), layer
        n = mon.layers[layer].weight.shape[0]
        for key in s:
            expected_shape = {"steps": (), "weight.temporal_var": tuple(mon.layers[layer].weight.shape)}
            assert s[key].shape == expected_shape.get(key, (n,)), (layer, key)
        assert int(s["steps"]) == 4
        assert (s["activation.count"] > 0).all() and (s["gradient.count"] > 0).all()
        assert np.all(s["weight.temporal_var"] > 0)
        if not has_bias:
            assert np.isnan(want[layer]["bias.spread"]).all()
    assert_summaries_close(got, want)

    got_m, want_m = mon.metrics(), ref.metrics()
    assert set(got_m) == set(want_m)
    for layer in got_m:
        for key in METRIC_KEYS:
            assert isinstance(got_m[layer][key], float)
            np.testing.assert_allclose(got_m[layer][key], want_m[layer][key], rtol=1e-4, atol=1e-9,
                                       err_msg=f"{layer} {key}")
        assert np.isfinite(got_m[layer]["spread_of_spread"])
        assert 1.0 <= got_m[layer]["participation_ratio"] <= mon.layers[layer].weight.shape[0]


def test_channels_last_weights_are_read_at_every_step():
    """A parameter that is not contiguous (a conv weight after .to(memory_format=
    torch.channels_last)) is recorded as it is at each step, not as it was when Monitor.step
    first listed it."""
    a, b = (build("cnn").to(memory_format=torch.channels_last) for _ in range(2))
    assert not a.conv1.weight.is_contiguous()
    mon, ref = lf.instrument(a), HookSnapshot(b)
    data = [x.to(memory_format=torch.channels_last) for x in batches("cnn", 4)]
    train(a, [mon], data, make_opt(a, "adam"))
    train(b, [ref], data, make_opt(b, "adam"))
    got = mon.summary()
    assert (got["conv1"]["weight.temporal_var"] > 0).all()
    assert_summaries_close(got, ref.summary())


def test_inplace_op_on_a_view_output_is_counted():
    """A Linear on [B, T, d] returns a view of its matmul's result; ReLU(inplace=True) after it
    rewrites that result's history, so the view's own node never runs. Every forward is still
    counted, and training is the plain twin's."""
    def build_twin():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))

    a, b, plain = build_twin(), build_twin(), build_twin()
    mon, ref = lf.instrument(a), HookSnapshot(b)
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(2, 6, 4, generator=g) for _ in range(3)]
    assert plain[0](data[0])._is_view()
    for model, monitors in ((a, [mon]), (b, [ref]), (plain, [])):
        train(model, monitors, data, make_opt(model, "adam"))
    got = mon.summary()
    assert (got["0"]["gradient.count"] == 3 * 12).all() and (got["0"]["activation.count"] == 3 * 12).all()
    assert_summaries_close(got, ref.summary())
    for p, q in zip(a.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_parameters_of_modules_without_a_kind_are_tracked_alone():
    class Scale(nn.Module):                   # parameters, but no layer kind
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3, 12))
            self.temperature = nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return x * self.gain.mean(0) * self.temperature

    model = nn.Sequential(build("block"), Scale(), nn.LayerNorm(12, elementwise_affine=False))
    mon = lf.instrument(model)
    skipped = dict(mon.skipped)
    assert set(skipped) == {"1.temperature", "2"}
    assert "scalar" in skipped["1.temperature"] and "no affine parameters" in skipped["2"]
    assert set(mon.layers) == {"0." + n for n in ("ln1", "q", "k", "v", "proj", "ln2", "up", "down")} | {"1.gain"}
    assert type(model[1]) is Scale            # not wrapped: nothing of it is observed but the parameter
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model(torch.randn(2, 5, 12))).backward()
        opt.step()
        mon.step()
    s = mon.summary()["1.gain"]
    assert set(s) == {"weight.temporal_var", "weight.spread", "steps"}
    assert s["weight.spread"].shape == (12,) and (s["weight.spread"] > 0).any()  # features last
    assert np.isfinite(s["weight.spread"]).all()
    c = mon.coverage()
    assert c["trainable_parameters"] - c["monitored_parameters"] == 1   # the temperature
    assert "1.temperature" in str(mon) and "monitored:" in str(mon)


# ---------------------------------------------------------------------------------------
# 2. gradient accumulation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_gradient_accumulation(name):
    a, mon, b, ref = twins(name, seed=1)
    data = batches(name, 6, batch=4, seed=7)   # 2 optimizer steps of 3 micro-batches
    train(a, [mon], data, make_opt(a, "adam"), micro=3)
    train(b, [ref], data, make_opt(b, "adam"), micro=3)
    got = mon.summary()
    assert_summaries_close(got, ref.summary())
    assert (got["fc1" if name == "mlp" else "head"]["activation.count"] == 6 * 4).all()
    assert all(int(s["steps"]) == 2 for s in got.values())


# ---------------------------------------------------------------------------------------
# 3. activation checkpointing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpoint_counted_once(use_reentrant):
    def forward(model, ckpt):
        def tail(h):
            return model.out(F.gelu(model.fc2(h)))

        def run(x):
            h = F.relu(model.fc1(x))
            return checkpoint(tail, h, use_reentrant=use_reentrant) if ckpt else tail(h)
        return run

    data = batches("mlp", 3, seed=11)
    a, b = build("mlp", 2), build("mlp", 2)
    mon_a, mon_b = lf.instrument(a), lf.instrument(b)
    train(a, [mon_a], data, make_opt(a, "sgd"), forward=forward(a, True))
    train(b, [mon_b], data, make_opt(b, "sgd"), forward=forward(b, False))
    got, want = mon_a.summary(), mon_b.summary()
    for layer in ("fc1", "fc2", "out"):
        assert (got[layer]["activation.count"] == 3 * 6).all(), layer
        assert (got[layer]["gradient.count"] == 3 * 6).all(), layer
    assert_summaries_close(got, want, rtol=1e-6, atol_rel=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# 4. no_grad / eval / a forward without backward are not counted
# ---------------------------------------------------------------------------------------
def test_no_grad_and_eval_not_counted():
    model = build("mlp", 3)
    mon = lf.instrument(model)
    data = batches("mlp", 5, seed=3)
    train(model, [mon], data[:1], make_opt(model, "sgd"))
    before = mon.summary()

    with torch.no_grad():
        model(data[1])
    model.eval()
    out = model(data[2])
    loss_of(out).backward()                   # eval forward with a backward: still not counted
    model.train()
    model(data[3])                            # training forward whose backward never runs
    with torch.inference_mode():
        model(data[4])
    after = mon.summary()
    for layer in before:
        for key in ("activation.count", "gradient.count"):
            np.testing.assert_array_equal(after[layer][key], before[layer][key], err_msg=layer)
            assert (after[layer][key] == 6).all()
    assert_summaries_equal(after, before)

    loss_of(model(data[1])).backward()        # a counted one still counts
    assert (mon.summary()["fc1"]["activation.count"] == 12).all()


# ---------------------------------------------------------------------------------------
# 5. a module used twice in one forward
# ---------------------------------------------------------------------------------------
def test_shared_module_counts_every_call():
    a, mon, b, ref = twins("shared", seed=4)
    assert list(mon.layers) == ["inp", "mid", "out"]
    assert type(a.mid) is FluctLinear
    data = batches("shared", 3, batch=5, seed=5)
    train(a, [mon], data, make_opt(a, "adam"))
    train(b, [ref], data, make_opt(b, "adam"))
    got = mon.summary()
    assert (got["mid"]["activation.count"] == 2 * 3 * 5).all()
    assert (got["mid"]["gradient.count"] == 2 * 3 * 5).all()
    assert (got["inp"]["activation.count"] == 3 * 5).all()
    assert_summaries_close(got, ref.summary())


def test_retained_graph_every_backward_counts_its_forward_again():
    # nn/observe.py: each backward reaching a forward counts its activations and dL/dz
    a, mon, b, ref = twins("mlp", seed=18)
    x = batches("mlp", 1, seed=33)[0]
    for model in (a, b):
        loss = loss_of(model(x))
        loss.backward(retain_graph=True)
        loss.backward()
    got = mon.summary()
    assert (got["fc1"]["activation.count"] == 12).all()
    assert (got["fc1"]["gradient.count"] == 12).all()
    assert_summaries_close(got, ref.summary())


def test_conv_unbatched_and_channels_last_match_snapshot():
    torch.manual_seed(19)
    a = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 5, 2, stride=2))
    b = copy.deepcopy(a)
    mon, ref = lf.instrument(a), HookSnapshot(b)
    g = torch.Generator().manual_seed(35)
    inputs = [torch.randn(2, 7, 6, generator=g),
              torch.randn(3, 2, 7, 6, generator=g).to(memory_format=torch.channels_last)]
    for model in (a, b):
        for x in inputs:
            loss_of(model(x)).backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    got = mon.summary()
    assert (got["0"]["activation.count"] == 5 * 4 * (1 + 3)).all()
    assert_summaries_close(got, ref.summary())


@pytest.mark.parametrize("weight_mode", ["element", "neuron"])
def test_zero_width_layers_train_like_torch(weight_mode):
    """A layer with no outputs, and one with no inputs (its output is its bias), train as in
    torch. A neuron with no incoming weight has no weight spread (nan), in either mode."""
    torch.manual_seed(23)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        a = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3))
    b = copy.deepcopy(a)
    mon, ref = lf.instrument(a, weight_mode=weight_mode), HookSnapshot(b)
    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    train(a, [mon], data, make_opt(a, "sgd"))
    train(b, [ref], data, make_opt(b, "sgd"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    got, want = mon.summary(), ref.summary()
    assert got["0"]["activation.mean"].shape == (0,)
    assert np.isnan(got["1"]["weight.spread"]).all()
    skip = () if weight_mode == "element" else ("weight.spread", "weight.temporal_var")
    assert_summaries_close(got, want, skip=skip)


def test_module_reachable_under_two_names_wrapped_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    mon = lf.instrument(model)
    assert list(mon.layers) == ["0"]
    loss_of(model(torch.randn(5, 4))).backward()
    assert (mon.summary()["0"]["activation.count"] == 10).all()


# ---------------------------------------------------------------------------------------
# 6. bf16 autocast on CPU
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bf16_autocast(name):
    a, mon, b, ref = twins(name, seed=5)
    data = batches(name, 3, batch=8, seed=9)
    opt_a, opt_b = make_opt(a, "sgd"), make_opt(b, "sgd")
    # one step by hand to look at the grads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(data[0])
    assert out.dtype == torch.bfloat16
    loss_of(out.float()).backward()
    for p in a.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    opt_a.step()
    mon.step()
    train(a, [mon], data[1:], opt_a, autocast=True)
    train(b, [ref], data, opt_b, autocast=True)
    got, want = mon.summary(), ref.summary()
    for layer in got:
        assert (got[layer]["activation.count"] > 0).all()
    # a value near 0 may round to the other side of 0 in one of the two runs
    rows = {layer: int(got[layer]["activation.count"][0]) for layer in got}
    for layer in got:
        np.testing.assert_allclose(got[layer]["activation.active_fraction"],
                                   want[layer]["activation.active_fraction"], atol=2.5 / rows[layer])
    assert_summaries_close(got, want, rtol=2e-2, atol_rel=1e-2,
                           skip=("activation.active_fraction",))


def test_autocast_leaves_float64_layers_alone():
    # autocast never casts float64 tensors: a float64 layer runs in float64 under it
    torch.manual_seed(16)
    plain = nn.Linear(4, 3).double()
    wrapped = copy.deepcopy(plain)
    lf.instrument(wrapped)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(x), wrapped(x)
    assert want.dtype == torch.float64
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def test_bf16_parameters_match_snapshot():
    # a bf16 model without autocast: statistics accumulated in float32, same as float64 ref
    a, b = build("mlp", 17).bfloat16(), build("mlp", 17).bfloat16()
    mon, ref = lf.instrument(a), HookSnapshot(b)
    assert all(st.dtype == torch.float32 for _, st in mon._states())
    data = [x.bfloat16() for x in batches("mlp", 3, seed=31)]
    train(a, [mon], data, make_opt(a, "sgd"))
    train(b, [ref], data, make_opt(b, "sgd"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.grad.dtype == torch.bfloat16
    # same bf16 values seen by both: statistics agree to float32 accuracy (the weights'
    # temporal variance is a difference of bf16 values, exact in float32)
    assert_summaries_close(mon.summary(), ref.summary(), rtol=1e-4, atol_rel=1e-5)


# ---------------------------------------------------------------------------------------
# 7. NaN / Inf
# ---------------------------------------------------------------------------------------
def test_nonfinite_input_counted_not_poisoning():
    a, mon, b, ref = twins("mlp", seed=6)
    data = batches("mlp", 3, seed=13)
    data[1][2, 4] = float("nan")              # one sample of the second step
    data[2][0, 0] = float("inf")              # one sample of the third step
    for model, m in ((a, mon), (b, ref)):
        opt = make_opt(model, "sgd")
        for x in data:
            opt.zero_grad()
            loss_of(model(x)).backward()
            for p in model.parameters():
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
            opt.step()
            m.step()
    got, want = mon.summary(), ref.summary()
    s = got["fc1"]
    np.testing.assert_array_equal(s["activation.nonfinite"], np.full(37, 2))
    np.testing.assert_array_equal(s["activation.count"], np.full(37, 3 * 6 - 2))
    for layer, s in got.items():
        for key in ("activation.mean", "activation.var", "activation.active_fraction",
                    "gradient.mean", "gradient.var", "weight.spread", "bias.spread"):
            assert np.isfinite(s[key]).all(), (layer, key)
        for key in ("activation.nonfinite", "gradient.nonfinite"):
            np.testing.assert_array_equal(s[key], want[layer][key], err_msg=f"{layer} {key}")
    assert got["fc2"]["activation.nonfinite"].sum() > 0
    assert_summaries_close(got, want)


# ---------------------------------------------------------------------------------------
# 8. torch.compile
# ---------------------------------------------------------------------------------------
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    a, b = build("mlp", 7), build("mlp", 7)
    mon_a, mon_b = lf.instrument(a), lf.instrument(b)
    compiled = torch.compile(a)
    data = batches("mlp", 3, seed=17)
    train(a, [mon_a], data, make_opt(a, "adam"), forward=compiled)
    train(b, [mon_b], data, make_opt(b, "adam"))
    got = mon_a.summary()
    for layer in got:
        assert (got[layer]["activation.count"] == 3 * 6).all()
        assert (got[layer]["gradient.count"] == 3 * 6).all()
    assert_summaries_close(got, mon_b.summary(), rtol=1e-4, atol_rel=1e-5)
    # the compiled graph follows grad mode and train/eval: these are not counted
    with torch.no_grad():
        compiled(data[0])
    a.eval()
    loss_of(compiled(data[1])).backward()
    a.train()
    assert_summaries_equal(mon_a.summary(), got)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# 9. state_dict / load_state_dict
# ---------------------------------------------------------------------------------------
def _whole_and_first_half(seed):
    """An MLP trained 6 steps straight, and one trained the first 3 of the same batches."""
    data = batches("mlp", 6, seed=seed)
    straight = build("mlp", 8)
    mon = lf.instrument(straight)
    train(straight, [mon], data, make_opt(straight, "adam"))
    first = build("mlp", 8)
    mon1 = lf.instrument(first)
    opt1 = make_opt(first, "adam")
    train(first, [mon1], data[:3], opt1)
    return data, straight, mon, first, mon1, opt1


def test_state_dict_resume_identical():
    data, straight, mon, first, mon1, opt1 = _whole_and_first_half(19)
    buf = io.BytesIO()
    torch.save({"monitor": mon1.state_dict(), "model": first.state_dict(),
                "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    fresh = build("mlp", 99)                 # other initial weights: all of it must come from the file
    mon2 = lf.instrument(fresh)
    opt2 = make_opt(fresh, "adam")
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    mon2.load_state_dict(saved["monitor"])
    assert mon2.steps == 3
    train(fresh, [mon2], data[3:], opt2)
    assert_summaries_equal(mon2.summary(), mon.summary())
    for p, q in zip(fresh.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_load_state_dict_version_2():
    """A state saved before the temporal master (tally [2], no master) resumes as an open block:
    the same statistics, and the next steps go on from them."""
    data, _, mon, first, mon1, opt1 = _whole_and_first_half(23)
    sd = mon1.state_dict()
    old = {name: {k: t[:2] if k.endswith(".tally") else t for k, t in buffers.items()
                  if not k.endswith(".master")} for name, buffers in sd["layers"].items()}
    mon1.remove()
    mon2 = lf.instrument(first)
    mon2.load_state_dict({**sd, "version": 2, "layers": old})
    train(first, [mon2], data[3:], opt1)
    assert_summaries_close(mon2.summary(), mon.summary())


def test_load_state_dict_mismatch_raises():
    mlp = build("mlp")
    sd = lf.instrument(mlp).state_dict()
    with pytest.raises(ValueError, match="layers differ"):
        lf.instrument(build("cnn")).load_state_dict(sd)

    class Wider(nn.Module):               # same layer names, other shapes
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(13, 38), nn.Linear(38, 29), nn.Linear(29, 5)

    with pytest.raises(ValueError, match="shape"):
        lf.instrument(Wider()).load_state_dict(sd)
    with pytest.raises(ValueError, match="options"):
        lf.instrument(build("mlp"), every=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="state version 1 .this version reads 2 and 3"):  # before implicit counts
        lf.instrument(build("mlp")).load_state_dict({**sd, "version": 1})


# ---------------------------------------------------------------------------------------
# 10. remove()
# ---------------------------------------------------------------------------------------
def test_remove_restores_modules():
    model = build("cnn", 9)
    plain = copy.deepcopy(model)
    originals = {n: (m, type(m), m.weight, m.bias) for n, m in model.named_modules()
                 if isinstance(m, SUPPORTED)}
    hook_calls = []
    model.conv1.register_forward_hook(lambda *args: hook_calls.append(1))
    mon = lf.instrument(model)
    assert type(model.conv1) is FluctConv2d and type(model.conv3) is FluctConv1d

    x = batches("cnn", 1, seed=21)[0]
    # the fused training forward and the plain path give the plain torch output
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert len(hook_calls) == 2                # hooks on the module survive the class swap

    # a torch state_dict of the wrapped model loads into a plain one and back
    sd_wrapped = model.state_dict()
    assert list(sd_wrapped) == list(plain.state_dict())
    other = build("cnn", 50)
    other.load_state_dict(sd_wrapped)
    model.load_state_dict(other.state_dict())

    train(model, [mon], batches("cnn", 2, seed=22), make_opt(model, "adam"))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    mon.remove()
    for name, m in model.named_modules():
        if name in originals:
            obj, cls, w, b = originals[name]
            assert m is obj and type(m) is cls and cls in (nn.Conv2d, nn.Conv1d, nn.Linear)
            assert m.weight is w and m.bias is b
            assert not hasattr(m, "_lrfluct")
        assert "Fluct" not in type(m).__name__
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert not all(torch.equal(v, plain.state_dict()[k]) for k, v in trained.items())

    plain.load_state_dict(model.state_dict())
    model.train(), plain.train()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="removed"):
        mon.summary()
    mon.remove()                               # idempotent
    mon2 = lf.instrument(model)                # can instrument again
    assert set(mon2.layers) == set(originals)


# ---------------------------------------------------------------------------------------
# 11. options
# ---------------------------------------------------------------------------------------
def test_every_two_observes_even_steps():
    model = build("mlp", 10)
    mon = lf.instrument(model, every=2)
    zs, ws = [], []
    model.fc1.register_forward_hook(lambda m, a, out: zs.append(out.detach().double().clone()))
    data = batches("mlp", 4, seed=23)
    opt = make_opt(model, "sgd")
    for i, x in enumerate(data):
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()
        mon.step()
        if i % 2 == 0:
            ws.append(model.fc1.weight.detach().double().clone())
    s = mon.summary()
    assert int(s["fc1"]["steps"]) == 4
    for layer in s:
        assert (s[layer]["activation.count"] == 2 * 6).all()
        assert (s[layer]["gradient.count"] == 2 * 6).all()
    z = torch.cat([zs[0], zs[2]]).numpy()
    np.testing.assert_allclose(s["fc1"]["activation.mean"], z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["fc1"]["activation.var"], z.var(0), rtol=1e-5, atol=1e-7)
    w = torch.stack(ws).numpy()
    np.testing.assert_allclose(s["fc1"]["weight.temporal_var"], w.var(0), rtol=1e-4, atol=1e-12)


def test_tracking_switches_remove_keys():
    data = batches("mlp", 2, seed=25)
    cases = {"weights": {"weight.temporal_var", "weight.spread"},
             "activations": {k for k in DESIGN_KEYS if k.startswith("activation.")},
             "gradients": {k for k in DESIGN_KEYS if k.startswith("gradient.")},
             "biases": {"bias.spread"}}
    full = build("mlp", 11)
    mon_full = lf.instrument(full)
    train(full, [mon_full], data, make_opt(full, "sgd"))
    want = mon_full.summary()
    for option, absent in cases.items():
        model = build("mlp", 11)
        mon = lf.instrument(model, **{option: False})
        train(model, [mon], data, make_opt(model, "sgd"))
        got = mon.summary()
        for layer, s in got.items():
            assert set(s) == DESIGN_KEYS - absent, option
            for key in s:   # what is still tracked is unchanged
                np.testing.assert_allclose(s[key], want[layer][key], rtol=1e-6, atol=1e-9,
                                           err_msg=f"{option}=False {layer} {key}")
        for p, q in zip(model.parameters(), full.parameters()):   # training unchanged
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        metrics = mon.metrics()["fc1"]
        assert set(METRIC_KEYS) <= set(metrics)


class EveryWeightLayout(nn.Module):
    """One layer of each layout the per-neuron RMS reduces: neurons along axis 1 (a column of
    the embedding table each), along axis 0 (a run of 6 x 3 conv weights each), one weight per
    neuron (LayerNorm: the RMS is |w|), and a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 5, 3)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 4)

    def forward(self, idx):
        h = F.relu(self.conv(self.emb(idx).transpose(1, 2))).transpose(1, 2)
        return self.head(self.norm(h))


@pytest.mark.parametrize("name", ["cnn", "layouts", "layouts-bf16"])
def test_weight_mode_neuron(name, step_path):
    """Each neuron's RMS incoming weight, recorded every step by either step path, against
    the same RMS computed in float64 from the weights."""
    if name == "cnn":
        model, data = build("cnn", 12), batches("cnn", 3, seed=27)
    else:
        torch.manual_seed(12)
        model = EveryWeightLayout().to(torch.bfloat16 if name.endswith("bf16") else torch.float32)
        g = torch.Generator().manual_seed(27)
        data = [torch.randint(0, 11, (4, 7), generator=g) for _ in range(3)]
    mon = lf.instrument(model, weight_mode="neuron")
    rms = {name: [] for name in mon.layers}
    opt = make_opt(model, "adam")
    for x in data:
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()
        mon.step()
        assert (mon._plan.native is not None) == (step_path == "native")
        for layer, m in mon.layers.items():
            w = m.weight.detach().double()
            w = w.t() if isinstance(m, nn.Embedding) else w  # neurons: the table's columns
            rms[layer].append(w.reshape(w.shape[0], -1).square().mean(1).sqrt())
    s = mon.summary()
    for layer, m in mon.layers.items():
        n = rms[layer][0].shape[0]
        assert "weight.temporal_var" not in s[layer]
        assert s[layer]["weight.spread"].shape == (n,)
        want = torch.stack(rms[layer]).std(0, unbiased=False).numpy()
        assert (want > 0).all()
        np.testing.assert_allclose(s[layer]["weight.spread"], want, rtol=1e-3, atol=1e-7,
                                   err_msg=layer)
        assert np.isfinite(mon.metrics()[layer]["spread_of_spread"])


BAD_OPTIONS = [  # (option, value, error): every option of instrument, each kind of mistake
    ("activations", "no", TypeError), ("gradients", 0, TypeError), ("weights", None, TypeError),
    ("biases", 1, TypeError), ("every", True, TypeError), ("every", 1.5, TypeError),
    ("every", 0, ValueError), ("weight_mode", "x", ValueError), ("weight_mode", 1, TypeError),
    ("dead_threshold", "0.1", TypeError), ("dead_threshold", -1, ValueError),
    ("dead_threshold", float("nan"), ValueError), ("dead_threshold", 1.5, ValueError),
    ("dead_threshold", True, TypeError), ("energy", "x", ValueError), ("energy", None, TypeError),
    ("energy", ["weight"], TypeError), ("log_dir", "", ValueError), ("log_dir", 3, TypeError),
    ("log_dir", b"runs", TypeError), ("log_every", True, TypeError), ("log_every", 0, ValueError),
    ("summary_every", 2.0, TypeError), ("summary_every", -5, ValueError),
    ("tensorboard", "yes", TypeError), ("tensorboard", 1, TypeError),
    ("log_errors", "ignore", ValueError), ("log_errors", None, TypeError),
    ("grad_scaler", "x", TypeError), ("windows", [1], TypeError),
    ("overlap_weights", "yes", TypeError), ("drift", 1, TypeError),
]


@pytest.mark.parametrize("option, value, error", BAD_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_refused_naming_it(option, value, error):
    model = build("mlp")
    with pytest.raises(error, match=f"^{option} must be .*, got {re.escape(repr(value))}"):
        lf.instrument(model, **{option: value})
    assert type(model.fc1) is nn.Linear        # a refused call leaves the model alone


def test_overlap_weights_needs_cuda_parameters():
    model = build("mlp")
    with pytest.raises(ValueError, match="overlap_weights=True .* CUDA device, got cpu"):
        lf.instrument(model, overlap_weights=True)
    assert type(model.fc1) is nn.Linear


def test_every_option_has_a_refused_value():
    assert {o for o, _, _ in BAD_OPTIONS} == set(lf.options.DEFAULTS)


def test_good_option_values_accepted():
    mon = lf.instrument(build("mlp"), dead_threshold=np.float32(0.5), every=np.int64(2),
                        weight_mode="neuron", energy="gradient")
    assert mon.options["dead_threshold"] == 0.5 and type(mon.options["dead_threshold"]) is float
    assert mon.options["every"] == 2 and type(mon.options["every"]) is int
    mon.remove()
    lf.instrument(build("mlp"), dead_threshold=0).remove()
    lf.instrument(build("mlp"), dead_threshold=1).remove()


def test_log_dir_that_is_a_file_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="log_dir must be a directory, but .*file is a file"):
        lf.instrument(build("mlp"), log_dir=tmp_path / "file")


def test_unknown_option_raises():
    model = build("mlp")
    with pytest.raises(TypeError, match="evry"):
        lf.instrument(model, evry=2)
    assert type(model.fc1) is nn.Linear        # a refused call leaves the model alone


def test_removed_monitor_and_bad_state_raise_clearly():
    model = build("mlp")
    mon = lf.instrument(model)
    with pytest.raises(TypeError, match="load_state_dict expects the dict of Monitor.state_dict"
                                        r"\(\), got None"):
        mon.load_state_dict(None)
    sd = mon.state_dict()
    with pytest.raises(ValueError, match="'steps' must be an integer, got '3'"):
        mon.load_state_dict({**sd, "steps": "3"})
    with pytest.raises(ValueError, match="'layers' must be a dict, got None"):
        mon.load_state_dict({**sd, "layers": None})
    with pytest.raises(ValueError, match=r"layers \['fc1'\] do not map"):
        mon.load_state_dict({**sd, "layers": {**sd["layers"], "fc1": None}})
    mon.remove()
    for call in (mon.memory_bytes, mon.state_dict, mon.summary, mon.step, mon.reset,
                 lambda: mon.load_state_dict(sd)):
        with pytest.raises(RuntimeError, match="this Monitor was removed"):
            call()


def test_nothing_supported_raises():
    with pytest.raises(ValueError, match="nothing to monitor"):
        lf.instrument(nn.Sequential(nn.Tanh(), nn.ReLU()))
    with pytest.raises(ValueError, match="nothing to monitor"):
        lf.instrument(nn.Sequential(nn.LayerNorm(3, elementwise_affine=False)))


def test_instrument_twice_raises():
    model = build("mlp")
    lf.instrument(model)
    with pytest.raises(ValueError, match="already instrumented"):
        lf.instrument(model)
    assert type(model.fc1) is FluctLinear


# ---------------------------------------------------------------------------------------
# 12. reset()
# ---------------------------------------------------------------------------------------
def test_reset():
    model = build("block", 13)
    mon = lf.instrument(model)
    opt = make_opt(model, "adam")
    data = batches("block", 4, batch=3, seed=29)
    train(model, [mon], data[:2], opt)
    mon.reset()
    assert mon.steps == 0
    for layer, s in mon.summary().items():
        assert int(s["steps"]) == 0
        for key in ("activation.count", "gradient.count", "activation.nonfinite"):
            assert (s[key] == 0).all(), (layer, key)
        assert np.isnan(s["activation.mean"]).all()
        assert np.isnan(s["weight.temporal_var"]).all()
    # after a reset the monitor equals a fresh one on the same (already trained) model
    twin = build("block", 0)
    twin.load_state_dict(model.state_dict())
    ref = HookSnapshot(twin)
    opt_twin = make_opt(twin, "adam")
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # not shared state tensors
    train(model, [mon], data[2:], opt)
    train(twin, [ref], data[2:], opt_twin)
    got = mon.summary()
    assert (got["q"]["activation.count"] == 2 * 3 * 5).all()
    assert int(got["q"]["steps"]) == 2
    assert_summaries_close(got, ref.summary())


# ---------------------------------------------------------------------------------------
# 13. gradients equal plain torch
# ---------------------------------------------------------------------------------------
def test_frozen_parameters_and_input_without_grad():
    torch.manual_seed(15)
    plain = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Conv1d(1, 3, 2))
    plain[0].weight.requires_grad_(False)
    plain[2].bias.requires_grad_(False)
    wrapped = copy.deepcopy(plain)
    lf.instrument(wrapped)
    x = torch.randn(5, 6)
    lp = plain[2](plain[1](plain[0](x)).unsqueeze(1)).square().sum()
    lw = wrapped[2](wrapped[1](wrapped[0](x)).unsqueeze(1)).square().sum()
    lp.backward()
    lw.backward()
    assert wrapped[0].weight.grad is None and wrapped[2].bias.grad is None
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6)


@pytest.fixture(params=["native", "python"])
def step_path(request, monkeypatch):
    """Monitor.step's weight update through the C++ TemporalPlan (the CPU default) or through
    the dispatched op (the path of CUDA, computed values and drift)."""
    if request.param == "native" and lf.backend("cpu") != "cpp":
        pytest.skip("C++ extension not built")
    if request.param == "python":
        monkeypatch.setattr("lrfluct_fast.monitor._StepPlan.native_plan", lambda self: None)
    return request.param


@pytest.mark.skipif(lf.backend("cpu") != "cpp", reason="C++ extension not built")
def test_step_paths_record_the_same_state(monkeypatch):
    """The C++ step and the dispatched op leave bit-identical temporal state, over enough
    calls to close blocks, with a non-finite value and a tensor split between threads."""
    from lrfluct_fast import monitor, ops
    monkeypatch.setattr(ops, "FLUSH_EVERY", 4)

    def run(native):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 250), nn.ReLU(), nn.Linear(250, 3))  # 75k weights
        mon = lf.instrument(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(9):
            opt.zero_grad()
            model(torch.randn(4, 300)).square().mean().backward()
            opt.step()
            if step == 5:
                with torch.no_grad():
                    model[0].weight[7, 11] = float("nan")
            mon.step()
            assert (mon._plan.native is not None) == native
        return {(name, k): t.clone() for name, st in mon.states.items() for k, t in st.buffers.items()}

    native = run(True)
    monkeypatch.setattr(monitor._StepPlan, "native_plan", lambda self: None)
    python = run(False)
    assert native.keys() == python.keys()
    for key in native:
        assert torch.equal(native[key].nan_to_num(), python[key].nan_to_num()), key


def test_temporal_plan_refuses_bad_inputs():
    """The C++ plan keeps pointers into its values and RMS weights: a strided one would be a
    copy made once; an RMS needs a neuron axis of its weight and its own float32 buffer."""
    from lrfluct_fast import _backend, ops
    if _backend.cpp_error() is not None:
        pytest.skip("the C++ extension is not built")
    from lrfluct_fast import _C
    w, out = torch.randn(4, 3), torch.empty(4)
    state = [[part] for part in ops.new_state(out)]
    bad = [([w.t()], [], r"values\[0\] must be contiguous"),
           ([out], [(w, 2, out)], r"rms\[0\]: needs .* a neuron axis in it, got \[4, 3\] .* axis 2"),
           ([out], [(w.t(), 1, out)], r"rms\[0\]: needs a contiguous CPU weight"),
           ([out], [(w, 1, out)], r"rms\[0\]: its buffer must be values\[0\], float32 \[3\]"),
           ([out], [(w, 0, torch.empty(4))], r"its buffer must be values\[0\]"),
           ([out], [(w.long(), 0, out)], r"rms\[0\]'s weight")]
    for values, rms, error in bad:
        with pytest.raises((ValueError, TypeError), match=error):
            _C.TemporalPlan(values, *([part[0]] * len(values) for part in state), [], rms)


RMS_CASES = [((37, 300), 0),     # a Linear's rows
             ((600, 300), 0),    # rows split between threads
             ((300, 37), 1),     # an embedding table's columns
             ((1100, 130), 1),   # columns over several row chunks
             ((5, 7, 11), 1),    # neurons in the middle
             ((9,), 0),          # one weight per neuron: |w|
             ((0, 5), 1)]        # no incoming weight: nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_temporal_plan_rms_against_float64(dtype):
    """The C++ plan's per-neuron RMS weights against float64 on every layout, with a large
    offset and non-finite weights, and the same bits at one thread and two."""
    from lrfluct_fast import _backend, ops
    if _backend.cpp_error() is not None:
        pytest.skip("the C++ extension is not built")
    from lrfluct_fast import _C
    g = torch.Generator().manual_seed(5)
    for shape, axis in RMS_CASES:
        w = (torch.randn(shape, generator=g, dtype=torch.float64) + 300).to(dtype)
        if w.numel() > 40:
            w.view(-1)[[3, 17]] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
        got = []
        for threads in (1, 2):
            out = torch.empty(shape[axis])
            plan = _C.TemporalPlan([out], *([p] for p in ops.new_state(out)), [], [(w, axis, out)])
            with _threads(threads):
                plan.run(ops.FLUSH_EVERY)
            got.append(out)
        rows = w.double().movedim(axis, 0).reshape(shape[axis], -1)
        want = rows.square().mean(1).sqrt().float()
        torch.testing.assert_close(got[0], want, rtol=2.4e-7, atol=0, equal_nan=True,
                                   msg=lambda m: f"{shape} axis {axis}: {m}")
        assert torch.equal(got[0].nan_to_num(), got[1].nan_to_num()), (shape, axis)
        assert got[0].isnan().equal(want.isnan()), (shape, axis)


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_step_follows_a_replaced_parameter(step_path):
    """A parameter replaced by another of the same shape, then given new storage (p.data = ...),
    is the one recorded from the next step on, on either step path."""
    from lrfluct_fast import ops
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    mon = lf.instrument(model)
    mon.step()
    model[0].weight = nn.Parameter(torch.full((3, 4), 5.0))
    mon.step()
    model[0].weight.data = torch.full((3, 4), 9.0)
    mon.step()
    count, mean, var = ops.temporal_stats(*mon.states["0"].temporal_state("weight"))
    assert (count == 3).all()
    torch.testing.assert_close(mean, torch.full((3, 4), 5.0, dtype=mean.dtype))
    torch.testing.assert_close(var, torch.full((3, 4), 32 / 3, dtype=var.dtype))


def test_step_refuses_a_cast_parameter(step_path):
    model = nn.Sequential(nn.Linear(4, 3))
    mon = lf.instrument(model)
    mon.step()
    model.double()
    with pytest.raises(RuntimeError, match="now torch.float64 on cpu.*cast the model before"):
        mon.step()
