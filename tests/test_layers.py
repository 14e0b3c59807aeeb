"""Every built-in layer kind, a user's own kind (lf.register_layer) and the registry's errors.

Each kind on odd shapes: gradients bit for bit the plain twin's, statistics equal to the
float64 hook snapshot, per-neuron weight spread from the right slices of the weight.
MultiheadAttention's projections, which no hook sees, against a float64 re-derivation.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast.baselines import HookSnapshot

from twins import assert_summaries_close, loss_of


class Conv1D(nn.Module):
    """transformers' Conv1D, by its qualified name, without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).unflatten(0, x.shape[:-1])


Conv1D.__module__ = "transformers.pytorch_utils"


class SubLinear(nn.Linear):
    """A user's subclass: served by nn.Linear's entry."""


LAYERS = {  # name: (module factory, input factory)  odd sizes on purpose
    "linear": (lambda: nn.Linear(7, 5), lambda g: torch.randn(4, 7, generator=g)),
    "linear_nobias_3d": (lambda: nn.Linear(7, 5, bias=False), lambda g: torch.randn(2, 3, 7, generator=g)),
    "linear_1d": (lambda: nn.Linear(7, 5), lambda g: torch.randn(7, generator=g)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                      lambda g: torch.randn(3, 4, 7, 6, generator=g)),
    "conv2d_nobias_dilated": (lambda: nn.Conv2d(3, 5, (3, 2), dilation=(2, 1), bias=False),
                              lambda g: torch.randn(2, 3, 8, 5, generator=g)),
    "conv3d_same_circular": (lambda: nn.Conv3d(2, 5, 3, padding="same", padding_mode="circular"),
                             lambda g: torch.randn(3, 2, 4, 5, 3, generator=g)),
    "conv2d_reflect_strided": (lambda: nn.Conv2d(3, 7, (3, 2), stride=2, padding=1, padding_mode="reflect"),
                               lambda g: torch.randn(2, 3, 7, 6, generator=g)),
    "conv1d_unbatched": (lambda: nn.Conv1d(3, 5, 2, dilation=2), lambda g: torch.randn(3, 9, generator=g)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2),
                lambda g: torch.randn(3, 4, 5, generator=g)),
    "convT2d_groups3": (lambda: nn.ConvTranspose2d(6, 9, 2, stride=2, groups=3, dilation=2, bias=False),
                        lambda g: torch.randn(2, 6, 3, 4, generator=g)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 3, 2, padding=1), lambda g: torch.randn(2, 2, 3, 4, 3, generator=g)),
    "embedding": (lambda: nn.Embedding(11, 5, padding_idx=0),
                  lambda g: torch.randint(0, 11, (4, 6), generator=g)),
    "embedding_bag": (lambda: nn.EmbeddingBag(11, 5, mode="mean"),
                      lambda g: torch.randint(0, 11, (4, 6), generator=g)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((3, 5)), lambda g: torch.randn(4, 2, 3, 5, generator=g) * 3 + 1),
    "rmsnorm": (lambda: nn.RMSNorm(7), lambda g: torch.randn(5, 7, generator=g) * 2),
    "groupnorm": (lambda: nn.GroupNorm(2, 6), lambda g: torch.randn(3, 6, 5, generator=g)),
    "batchnorm1d_2d_input": (lambda: nn.BatchNorm1d(5), lambda g: torch.randn(7, 5, generator=g)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), lambda g: torch.randn(4, 3, 2, 5, generator=g)),
    "conv1d_transformers": (lambda: Conv1D(7, 5), lambda g: torch.randn(2, 3, 5, generator=g)),
    "linear_subclass": (lambda: SubLinear(5, 4), lambda g: torch.randn(6, 5, generator=g)),
}


def _float_input(x):
    return x.clone().requires_grad_() if x.is_floating_point() else x


def plain_and_wrapped(case, seed):
    """A LAYERS case built twice, the second copy instrumented: (plain, wrapped, monitor, inputs)."""
    make, inputs = LAYERS[case]
    torch.manual_seed(seed)
    plain = make()
    wrapped = copy.deepcopy(plain)
    return plain, wrapped, lf.instrument(wrapped), inputs


@pytest.mark.parametrize("case", list(LAYERS))
def test_kind_equals_plain_and_float64_snapshot(case):
    plain, wrapped, mon, inputs = plain_and_wrapped(case, seed=1)
    ref = HookSnapshot(plain)
    assert list(mon.layers) == [""] and mon.coverage()["fraction"] == 1.0
    g = torch.Generator().manual_seed(2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, wrapped)]
    for step in range(3):
        x = inputs(g)
        xs = [_float_input(x) for _ in range(2)]
        for m, xi, opt in zip((plain, wrapped), xs, opts):
            opt.zero_grad()
            loss_of(torch.tanh(m(xi))).backward()
            opt.step()
        if x.is_floating_point():
            assert torch.equal(xs[0].grad, xs[1].grad)
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            assert torch.equal(p.grad, q.grad)
        mon.step()
        ref.step()
    got, want = mon.summary(), ref.summary()
    assert (got[""]["activation.count"] > 0).all()
    assert_summaries_close(got, want)


@pytest.mark.parametrize("case", ["linear", "conv2d_groups", "conv1d_unbatched"])
def test_nonfinite_upstream_gradient_gives_torchs_grads_and_is_counted(case):
    plain, wrapped, mon, inputs = plain_and_wrapped(case, seed=14)
    x = inputs(torch.Generator().manual_seed(3))
    g = torch.randn_like(plain(x))
    j = 2                                     # one value of neuron j's dL/dz is nan
    index = [0] * g.dim()
    index[-1 if case == "linear" else (0 if g.dim() == 2 else 1)] = j
    g[tuple(index)] = float("nan")
    plain(x).backward(g)
    wrapped(x).backward(g)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(wrapped.bias.grad[j])
    s = mon.summary()[""]
    assert s["gradient.nonfinite"][j] == 1 and s["gradient.nonfinite"].sum() == 1
    assert np.isfinite(s["gradient.mean"]).all()


def test_transposed_conv_groups_weight_spread_takes_each_channels_slice():
    torch.manual_seed(3)
    layer = nn.ConvTranspose2d(6, 9, 2, groups=3)   # weight [6, 3, 2, 2]: in, out / groups
    mon = lf.instrument(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(4):
        opt.zero_grad()
        loss_of(torch.tanh(layer(torch.randn(2, 6, 3, 3)))).backward()
        opt.step()
        mon.step()
    s = mon.summary()[""]
    tv = s["weight.temporal_var"]
    assert tv.shape == (6, 3, 2, 2)
    for channel in range(9):
        group, local = divmod(channel, 3)
        block = tv[2 * group:2 * group + 2, local]          # its group's inputs, its column
        np.testing.assert_allclose(s["weight.spread"][channel], np.sqrt(block.mean()), rtol=1e-12)


def _mha_reference(m: nn.MultiheadAttention, x, kv):
    """float64 q/k/v projections, attention output and their gradients of loss_of(output),
    derived step by step (need_weights=False, no mask, batch_first=False)."""
    w, b = m.in_proj_weight.detach().double(), m.in_proj_bias.detach().double()
    e, h = m.embed_dim, m.num_heads
    q = F.linear(x.double(), w[:e], b[:e]).requires_grad_()
    kvp = F.linear(kv.double(), w[e:], b[e:]).requires_grad_()
    k, v = kvp.split(e, -1)

    def heads(t):
        return t.reshape(t.shape[0], -1, e // h).transpose(0, 1)   # [B * h, L, hd]
    att = torch.softmax(heads(q) @ heads(k).transpose(1, 2) / (e // h) ** 0.5, -1) @ heads(v)
    att = att.transpose(0, 1).reshape(x.shape[0], x.shape[1], e)
    out = F.linear(att, m.out_proj.weight.detach().double(), m.out_proj.bias.detach().double())
    out.retain_grad()
    loss_of(out).backward()
    return (q, kvp, out)


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_projections_equal_float64(cross):
    torch.manual_seed(4)
    plain = nn.MultiheadAttention(8, 2)
    wrapped = copy.deepcopy(plain)
    mon = lf.instrument(wrapped)
    assert set(mon.layers) == {"", "out_proj"}
    x = torch.randn(5, 3, 8)
    kv = torch.randn(4, 3, 8) if cross else x
    outs = [m(x, kv, kv, need_weights=False)[0] for m in (plain, wrapped)]
    for o in outs:
        loss_of(o).backward()
    assert torch.equal(outs[0], outs[1])
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p.grad, q.grad)
    q, kvp, out = _mha_reference(plain, x, kv)
    s = mon.summary()
    np.testing.assert_array_equal(s[""]["activation.count"], [15] * 8 + [kv.shape[0] * 3] * 16)
    want_mean = np.concatenate([q.detach().flatten(0, 1).mean(0).numpy(),
                                kvp.detach().flatten(0, 1).mean(0).numpy()])
    want_gmean = np.concatenate([q.grad.flatten(0, 1).mean(0).numpy(),
                                 kvp.grad.flatten(0, 1).mean(0).numpy()])
    np.testing.assert_allclose(s[""]["activation.mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s[""]["gradient.mean"], want_gmean, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want_gmean).max()))
    np.testing.assert_allclose(s["out_proj"]["activation.mean"],
                               out.detach().flatten(0, 1).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["out_proj"]["gradient.var"],
                               out.grad.flatten(0, 1).var(0, unbiased=False).numpy(), rtol=1e-4)


def test_multihead_attention_masks_and_batch_first_equal_plain():
    torch.manual_seed(5)
    plain = nn.MultiheadAttention(12, 3, batch_first=True, add_bias_kv=True, add_zero_attn=True)
    wrapped = copy.deepcopy(plain)
    mon = lf.instrument(wrapped)
    assert {"bias_k", "bias_v"} <= set(mon.layers)          # parameters alone
    x = torch.randn(2, 5, 12)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for m in (plain, wrapped):
        o, w = m(x, x, x, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False)
        (loss_of(o) + w.sum()).backward()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert (mon.summary()[""]["gradient.count"] == 10).all()


def test_multihead_attention_with_separate_weights():
    # kdim, vdim != embed_dim: q, k, v from q/k/v_proj_weight, each a block of the 3E neurons;
    # those weights are tracked alone, neurons along their rows
    torch.manual_seed(7)
    plain = nn.MultiheadAttention(8, 2, kdim=5, vdim=6)
    wrapped = copy.deepcopy(plain)
    mon = lf.instrument(wrapped)
    assert set(mon.layers) == {"", "out_proj", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
    assert mon.coverage()["fraction"] == 1.0
    q, k, v = torch.randn(4, 3, 8), torch.randn(6, 3, 5), torch.randn(6, 3, 6)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, wrapped)]
    for _ in range(2):
        for m, opt in zip((plain, wrapped), opts):
            opt.zero_grad()
            loss_of(m(q, k, v)[0]).backward()
            opt.step()
        mon.step()
    for p, r in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, r)
    s = mon.summary()
    np.testing.assert_array_equal(s[""]["activation.count"], [2 * 12] * 8 + [2 * 18] * 16)
    np.testing.assert_array_equal(s[""]["gradient.count"], s[""]["activation.count"])
    assert "weight.spread" not in s[""] and s[""]["bias.spread"].shape == (24,)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert s[name]["weight.spread"].shape == (8,) and np.isfinite(s[name]["weight.spread"]).all()


# ---------------------------------------------------------------------------------------
# a user's own layer kind
# ---------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Neurons along dim 1 of a [B, C, T] output; its weight is [C, T'] and its bias [C]."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, 4))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):                      # x [B, 4, T]
        return torch.einsum("ci,bit->bct", self.weight, x) + self.bias[:, None]


@pytest.fixture
def gate_registered():
    lf.register_layer(Gate, neuron_dim=1)
    yield
    lf.unregister_layer(Gate)


def test_register_layer_monitors_a_users_module(gate_registered):
    torch.manual_seed(6)
    plain = nn.Sequential(Gate(3), nn.Tanh())
    wrapped = copy.deepcopy(plain)
    mon, ref = lf.instrument(wrapped), HookSnapshot(plain)
    for m in (plain, wrapped):
        loss_of(m(torch.ones(2, 4, 5) * torch.arange(5.0))).backward()
    mon.step()
    ref.step()
    assert_summaries_close(mon.summary(), ref.summary())
    assert (mon.summary()["0"]["activation.count"] == 10).all()


def test_register_layer_errors(gate_registered):
    with pytest.raises(ValueError, match="Gate is already registered"):
        lf.register_layer(Gate, neuron_dim=1)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        lf.register_layer(int)
    with pytest.raises(TypeError, match="weight must be"):
        lf.register_layer(nn.PReLU, weight="weight")
    lf.register_layer(Gate, neuron_dim=2, replace=True)          # the wrong axis, on purpose
    model = Gate(3)
    mon = lf.instrument(model)
    with pytest.raises(ValueError, match=r"layer '' \(Gate\): its output \[2, 3, 5\].*gives \[6, 5\].*3 neurons"):
        model(torch.ones(2, 4, 5))
    assert (mon.summary()[""]["activation.count"] == 0).all()  # nothing recorded half-way


def test_parameter_replaced_after_instrument_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 3))
    mon = lf.instrument(model)
    model[0].weight = nn.Parameter(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"layer '0': its weight has shape \[5, 4\].*\[3, 4\]"):
        mon.step()
