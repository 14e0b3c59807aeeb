"""drift=True (lrfluct_fast/drift.py): weight.drift and weight.update_size per neuron equal
their float64 definitions from snapshots of the weights after every observed Monitor.step,
for every layer kind's neurons; and reset, windows, state_dict / resume, every=k, non-finite
weights, the run directory and the refusals behave as drift.py documents.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lrfluct_fast as lf
from lrfluct_fast.layers import parameter_value
from lrfluct_fast.rundir.writer import snapshot

from models import batches, build

KEYS = ("weight.drift", "weight.update_size")


class Kinds(nn.Module):
    """An Embedding (neurons are columns), a grouped ConvTranspose1d, and a Linear with a
    weight_norm parametrization (its weight computed each step). Input: token ids [B, 6]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.up = nn.ConvTranspose1d(4, 6, 3, groups=2)
        self.head = parametrizations.weight_norm(nn.Linear(6 * 8, 3))

    def forward(self, ids):
        return self.head(torch.tanh(self.up(self.emb(ids).transpose(1, 2))).flatten(1))


class Tied(nn.Module):
    """A head tied to the embedding (one weight, two layers' neurons: its columns and its
    rows) and a parameter of the model itself (tracked alone). Input: token ids [B, 6]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, ids):
        return self.head(self.emb(ids) * self.gain)


def _setup(name, **options):
    if name in ("kinds", "tied"):
        torch.manual_seed(0)
        model = Kinds() if name == "kinds" else Tied()
        g = torch.Generator().manual_seed(5)
        data = [torch.randint(0, 11, (5, 6), generator=g) for _ in range(8)]
    else:
        model, data = build(name), batches(name, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    return model, opt, lf.instrument(model, **options), data


def _train(model, opt, mon, data, snaps=None):
    """A training step per input; `snaps`: {layer: [float64 weight after each mon.step]}."""
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        mon.step()
        if snaps is not None:
            for name, st in mon.states.items():
                if "drift.first" in st.buffers:
                    w = parameter_value(mon.layers[name], st.params["weight"]).detach()
                    snaps.setdefault(name, []).append(w.double().clone())


def _reference(mon, snaps, observed=None):
    """{layer: (drift, update_size)} in float64 from the snapshots (of the observed steps)."""
    out = {}
    for name, ws in snaps.items():
        rows = torch.stack([mon.states[name].weight_rows(w) for w in ws])
        rows = rows if observed is None else rows[observed]
        drift = (rows[-1] - rows[0]).norm(dim=-1)
        updates = (rows[1:] - rows[:-1]).norm(dim=-1)
        out[name] = (drift.numpy(), updates.mean(0).numpy() if len(rows) > 1 else np.full(len(drift), np.nan))
    return out


def _assert_matches(summary, reference):
    assert reference
    for name, (drift, update) in reference.items():
        np.testing.assert_allclose(summary[name]["weight.drift"], drift, rtol=1e-6, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(summary[name]["weight.update_size"], update, rtol=1e-6, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("name", ["mlp", "cnn", "block", "kinds", "tied"])
@pytest.mark.parametrize("weight_mode", ["element", "neuron"])
def test_matches_float64_reference(name, weight_mode):
    model, opt, mon, data = _setup(name, drift=True, weight_mode=weight_mode)
    snaps = {}
    _train(model, opt, mon, data[:5], snaps)
    s = mon.summary()
    _assert_matches(s, _reference(mon, snaps))
    for layer, st in mon.states.items():
        assert (s[layer]["weight.drift"].shape == (st.neurons,)) == ("drift.first" in st.buffers)
    assert {name for name, st in mon.states.items() if st.track["weight"]} == set(snaps)


def test_off_by_default_and_memory_of_two_weight_copies():
    model, _, mon, _ = _setup("mlp")
    assert not any(k in s for s in mon.summary().values() for k in KEYS)
    plain_bytes = mon.memory_bytes()
    mon.remove()
    model, _, mon, _ = _setup("mlp", drift=True)
    weights = sum(m.weight.numel() for m in mon.layers.values())
    neurons = sum(st.neurons for st in mon.states.values())
    assert mon.memory_bytes() - plain_bytes == 2 * 4 * weights + 8 * neurons + 8 * len(mon.states)


def test_nan_before_two_observed_steps():
    model, opt, mon, data = _setup("mlp", drift=True)
    s = mon.summary()
    assert np.isnan(s["fc1"]["weight.drift"]).all() and np.isnan(s["fc1"]["weight.update_size"]).all()
    _train(model, opt, mon, data[:1])
    s = mon.summary()
    assert (s["fc1"]["weight.drift"] == 0).all() and np.isnan(s["fc1"]["weight.update_size"]).all()


def test_reset_starts_from_the_next_steps_weights():
    model, opt, mon, data = _setup("cnn", drift=True)
    _train(model, opt, mon, data[:3])
    mon.reset()
    snaps = {}
    _train(model, opt, mon, data[3:7], snaps)
    _assert_matches(mon.summary(), _reference(mon, snaps))


def test_every_k_uses_the_observed_steps_only():
    model, opt, mon, data = _setup("mlp", drift=True, every=3)
    snaps = {}
    _train(model, opt, mon, data[:8], snaps)   # observed: mon.step calls 1, 4, 7 (steps 0, 3, 6)
    _assert_matches(mon.summary(), _reference(mon, snaps, observed=[0, 3, 6]))


def test_windows_rows_leave_them_out_and_summary_stays_the_whole_run():
    model, opt, mon, data = _setup("mlp", drift=True, windows={"weight": 2})
    snaps = {}
    _train(model, opt, mon, data[:5], snaps)
    rows = mon.closed_windows("weight")
    assert len(rows) == 2 and all(set(r.layers["fc1"]) == {"weight.spread"} for r in rows)
    _assert_matches(mon.summary(), _reference(mon, snaps))


def test_resume_equals_a_straight_run():
    model, opt, mon, data = _setup("cnn", drift=True)
    _train(model, opt, mon, data[:6])
    straight = mon.summary()

    model, opt, mon, _ = _setup("cnn", drift=True)
    _train(model, opt, mon, data[:3])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()})
    model2, opt2, mon2, _ = _setup("cnn", drift=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    mon2.load_state_dict(saved["mon"])
    _train(model2, opt2, mon2, data[3:6])
    resumed = mon2.summary()
    for name in straight:
        for key in KEYS:
            np.testing.assert_allclose(resumed[name][key], straight[name][key], rtol=1e-12, err_msg=name)


def test_state_without_drift_loads_and_drift_starts_after_the_load():
    model, opt, mon, data = _setup("mlp")                # drift off: no drift state saved
    _train(model, opt, mon, data[:3])
    saved = mon.state_dict()
    mon.remove()
    mon = lf.instrument(model, drift=True)
    with pytest.warns(RuntimeWarning, match="no drift state .* count from the first step after this load"):
        mon.load_state_dict(saved)
    snaps = {}
    _train(model, opt, mon, data[3:6], snaps)
    assert mon.steps == 6
    _assert_matches(mon.summary(), _reference(mon, snaps))
    # and a state with drift loads into a monitor without it (the drift state is not used)
    mon2 = lf.instrument(build("mlp"))
    mon2.load_state_dict(mon.state_dict())
    assert not any(k in s for s in mon2.summary().values() for k in KEYS)


def test_nonfinite_weights_give_nan_and_a_warning_naming_the_layer():
    model, opt, mon, data = _setup("mlp", drift=True)
    _train(model, opt, mon, data[:2])
    with torch.no_grad():
        model.fc2.weight[3, 0] = float("nan")
    mon.step()
    with pytest.warns(RuntimeWarning, match=re.escape("non-finite weights in layer(s) 'fc2'")):
        s = mon.summary()
    drift, update = s["fc2"]["weight.drift"], s["fc2"]["weight.update_size"]
    assert np.isnan(drift[3]) and np.isnan(update[3])
    assert np.isfinite(np.delete(drift, 3)).all() and np.isfinite(np.delete(update, 3)).all()
    assert np.isfinite(s["fc1"]["weight.drift"]).all()


def test_run_directory_summaries_carry_them_and_snapshots_stay_per_neuron(tmp_path):
    model, opt, mon, data = _setup("cnn", drift=True, log_dir=tmp_path / "run", summary_every=2)
    _train(model, opt, mon, data[:4])
    for name, bufs in snapshot(mon._states()).items():
        assert all(t.numel() <= 3 * mon.states[name].neurons for k, t in bufs.items()
                   if not k.startswith(("activation.", "gradient.", "run.")) and "tally" not in k), name
    s = mon.summary()
    mon.close()
    run = lf.load_run(tmp_path / "run")
    step, logged = run.summaries[-1]
    assert step == 4
    for name in s:
        for key in KEYS:
            np.testing.assert_array_equal(logged[name][key], s[name][key])


def test_drift_needs_the_weights():
    with pytest.raises(ValueError, match="drift=True .* needs weights=True"):
        lf.instrument(build("mlp"), drift=True, weights=False)


def test_run_directory_resumed_with_drift_switched_on(tmp_path):
    model, opt, mon, data = _setup("mlp", log_dir=tmp_path / "run", summary_every=2)
    _train(model, opt, mon, data[:2])
    saved = mon.state_dict()
    mon.remove()
    mon = lf.instrument(model, drift=True, log_dir=tmp_path / "run", summary_every=2)
    with pytest.warns(RuntimeWarning, match="no drift state"):
        mon.load_state_dict(saved)
    _train(model, opt, mon, data[2:4])
    mon.close()
    summaries = dict(lf.load_run(tmp_path / "run").summaries)
    assert sorted(summaries) == [2, 4]
    assert "weight.drift" not in summaries[2]["fc1"] and np.isfinite(summaries[4]["fc1"]["weight.drift"]).all()
