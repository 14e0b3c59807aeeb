"""Shared by the instrumentation tests: twin models trained side by side and the comparison
of their summaries (counts exactly, statistics to a tolerance relative to the data's scale)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast.baselines import HookSnapshot

from models import build

DESIGN_KEYS = {"activation.count", "activation.mean", "activation.var",
               "activation.active_fraction", "activation.nonfinite", "gradient.count",
               "gradient.mean", "gradient.var", "gradient.nonfinite", "weight.temporal_var",
               "weight.spread", "bias.spread", "steps"}
COUNT_KEYS = {"activation.count", "activation.nonfinite", "gradient.count",
              "gradient.nonfinite", "steps"}
METRIC_KEYS = ("spread_of_spread", "spread_cv", "participation_ratio", "dead_fraction",
               "mean_active_fraction")
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)  # every kind of tests/models.py


def make_opt(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def loss_of(out):
    return torch.nan_to_num(out).square().mean()


def train(model, monitors, data, opt, micro=1, autocast=False, forward=None):
    """One optimizer step per `micro` consecutive inputs of `data`."""
    forward = model if forward is None else forward
    for i in range(0, len(data), micro):
        opt.zero_grad()
        for x in data[i:i + micro]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = forward(x)
            loss_of(out.float()).backward()
        opt.step()
        for mon in monitors:
            mon.step()


def twins(name, seed=0):
    """The same seeded model twice: (instrumented model, Monitor, reference model, HookSnapshot)."""
    a, b = build(name, seed), build(name, seed)
    return a, lf.instrument(a), b, HookSnapshot(b)


def _scale(ref_layer, key):
    """Magnitude a tolerance on `key` is relative to: a mean is compared on the scale of the
    data's std as well as its own (a near-zero gradient mean has no relative precision)."""
    vals = [np.abs(ref_layer[key])]
    if key.endswith(".mean"):
        vals.append(np.sqrt(np.abs(ref_layer[key.replace(".mean", ".var")])))
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in vals])
    return float(finite.max()) if finite.size else 0.0


# A weight's temporal variance is a small difference of float32 values (weights ~0.3 moving
# ~1e-4 per step): the last bits of each stored weight are ~1e-4 of its temporal std.
TEMPORAL_RTOL = 1e-3


def assert_summaries_close(got, ref, rtol=1e-5, atol_rel=1e-6, skip=()):
    """Every key `got` reports for every layer agrees with `ref` (counts exactly)."""
    assert set(got) == set(ref)
    for layer, s in got.items():
        for key, value in s.items():
            if key in skip:
                continue
            assert key in ref[layer], f"{layer}: {key} not in the reference"
            expected = ref[layer][key]
            assert np.shape(value) == np.shape(expected), f"{layer} {key}"
            msg = f"layer {layer!r} key {key}"
            if key in COUNT_KEYS:
                np.testing.assert_array_equal(value, expected, err_msg=msg)
                continue
            key_rtol = max(rtol, TEMPORAL_RTOL) if key in ("weight.temporal_var",
                                                           "weight.spread", "bias.spread") else rtol
            np.testing.assert_allclose(value, expected, rtol=key_rtol,
                                       atol=atol_rel * _scale(ref[layer], key),
                                       err_msg=msg)


def assert_summaries_equal(got, ref):
    assert set(got) == set(ref)
    for layer in got:
        assert set(got[layer]) == set(ref[layer])
        for key in got[layer]:
            np.testing.assert_array_equal(got[layer][key], ref[layer][key],
                                          err_msg=f"{layer} {key}")
