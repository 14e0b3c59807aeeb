"""lrfluct_fast.spectra: the tracker's top singular value against float64 singular values, the
spectral summary against them, the power-law fit against a brute-force reference, against
known exponents, and against WeightWatcher when it is installed; bad input."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast.spectra import SpectraTracker, fit_power_law, spectral_summary


def _top_singular(weight: torch.Tensor) -> float:
    return float(_svdvals(weight.detach().flatten(1))[0])


def _svdvals(matrices: torch.Tensor) -> np.ndarray:
    """Singular values in float64 by numpy (torch's batched CPU SVD is slow on busy cores)."""
    return np.linalg.svd(matrices.double().numpy(), compute_uv=False)


def _matrix_with_singular_values(s: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    """U diag(s) V^T, U [m, k] and V [n, k] with orthonormal columns drawn at random."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return (u * s.double()) @ v.T


def _pareto(n: int, alpha: float, seed: int) -> np.ndarray:
    """n draws of density (alpha - 1) x^-alpha on [1, inf)."""
    return np.random.default_rng(seed).random(n) ** (-1.0 / (alpha - 1.0))


def _layers_model():
    torch.manual_seed(0)
    return nn.ModuleDict({"fc": nn.Linear(40, 60), "conv": nn.Conv2d(3, 8, 3),
                          "deconv": nn.ConvTranspose2d(4, 6, 3), "emb": nn.Embedding(30, 12),
                          "norm": nn.LayerNorm(12)})


# -- the tracker's power iteration ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tracker_converges_to_svdvals(dtype):
    model = _layers_model().to(dtype)
    tracker = SpectraTracker(model)
    assert tracker.layers == ["fc", "conv", "deconv", "emb"]
    assert tracker.skipped[0][0] == "norm" and "at least 2 dims" in tracker.skipped[0][1]
    for step in range(2000):
        tracker.step(step)
    # a ConvTranspose's matrix is its neurons' rows (out channels), not weight.flatten(1)
    deconv_rows = model["deconv"].weight.detach().transpose(0, 1)
    want = {"fc": _top_singular(model["fc"].weight), "conv": _top_singular(model["conv"].weight),
            "deconv": _top_singular(deconv_rows), "emb": _top_singular(model["emb"].weight)}
    got = tracker.top_singular()
    for name in want:
        assert abs(got[name] / want[name] - 1) < 1e-4, (name, got[name], want[name])
        # float32 vectors, float64 for a float64 weight
        vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert tracker._layers[name].v.dtype == vector_dtype
    assert len(tracker.history["fc/top_singular"]) == 2000


def test_tracker_follows_a_slowly_changing_weight():
    """One matvec pair per step keeps up with a weight that moves 1e-3 of its norm per step
    (largest singular values 3, 1.5: the error contracts by 4 per step); a cold start, one
    pair from a fresh random vector each step, does not."""
    s = torch.cat([torch.tensor([3.0, 1.5]), torch.linspace(1.0, 0.1, 38)])
    w0 = _matrix_with_singular_values(s, 50, 40, seed=1).float()
    drift = torch.randn(50, 40, generator=torch.Generator().manual_seed(2)) * 3e-3 / 40 ** 0.5
    layer = nn.Linear(40, 50, bias=False)
    tracker = SpectraTracker(layer)
    weights, warm, cold = [], [], []
    for step in range(130):
        with torch.no_grad():
            layer.weight.copy_(w0 + step * drift)
        tracker.step(step)
        cold_tracker = SpectraTracker(layer)
        cold_tracker.step(0)
        weights.append(layer.weight.detach().clone())
        warm.append(tracker.history["/top_singular"][-1])
        cold.append(cold_tracker.history["/top_singular"][-1])
    want = _svdvals(torch.stack(weights))[:, 0]
    warm_errors = np.abs(np.array(warm) / want - 1)[30:]
    cold_errors = np.abs(np.array(cold) / want - 1)[30:]
    assert warm_errors.max() < 1e-4, warm_errors.max()
    assert cold_errors.max() > 1e-2, cold_errors.max()


def test_tracker_every_and_history():
    layer = nn.Linear(8, 6)
    tracker = SpectraTracker(layer, every=3)
    for step in range(10):
        tracker.step(step)
    history = tracker.history
    assert history["step"] == [0, 3, 6, 9]
    assert len(history["/top_singular"]) == 4 and all(v > 0 for v in history["/top_singular"])
    assert set(history) == {"step", "/top_singular"}


def test_tracker_step_does_not_synchronise(monkeypatch):
    tracker = SpectraTracker(_layers_model())
    tracker.step(0)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in SpectraTracker.step")
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for step in range(1, 600):  # past the compaction of pending estimates
        tracker.step(step)
    monkeypatch.undo()
    assert len(tracker.history["conv/top_singular"]) == 600


def test_tracker_of_a_monitor_changes_nothing():
    """The tracker on a Monitor's layers: the same parameters, gradients and statistics as
    the same training without it."""
    def train(with_tracker):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
        mon = lf.instrument(model)
        tracker = SpectraTracker(mon, every=2) if with_tracker else None
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.randn(6, 8, 12, generator=torch.Generator().manual_seed(1))
        for step, x in enumerate(data):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            mon.step()
            if tracker is not None:
                tracker.step(step)
        return model, mon, tracker

    plain_model, plain_mon, _ = train(False)
    model, mon, tracker = train(True)
    assert tracker.layers == ["0", "3"]
    assert [name for name, _ in tracker.skipped] == ["1"]  # the LayerNorm's 1-D weight
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    want, got = plain_mon.summary(), mon.summary()
    for layer in want:
        for key in want[layer]:
            np.testing.assert_array_equal(got[layer][key], want[layer][key])
    assert tracker.history["step"] == [0, 2, 4]


def test_summary_of_a_monitor_is_logged_to_its_run_directory(tmp_path):
    """summary() of a tracker on a Monitor with log_dir: a scalars.csv row per layer and
    quantity at the monitor's step, equal to what summary() returned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    mon = lf.instrument(model, log_dir=str(tmp_path))
    tracker = SpectraTracker(mon)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
        mon.step()
        tracker.step(step)
        if step % 3 == 2:
            logged.append((mon.steps, tracker.summary(), tracker.top_singular()))
    mon.close()
    scalars = lf.load_run(tmp_path).scalars
    for layer in ("0", "2"):
        for key in ("spectral_norm", "stable_rank", "alpha", "top_singular"):
            steps, values = scalars[f"spectra/{layer}/{key}"]
            assert steps.tolist() == [at for at, _, _ in logged]
            want = [top[layer] if key == "top_singular" else summary[layer][key]
                    for _, summary, top in logged]
            np.testing.assert_allclose(values, want, rtol=1e-12, equal_nan=True)


# -- spectral_summary ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (8, 3, 3, 3), (5, 4, 7)])
def test_spectral_summary_against_svdvals(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    s = _svdvals(weight.flatten(1))
    got = spectral_summary(weight)
    assert got["spectral_norm"] == pytest.approx(s[0], rel=1e-12)
    assert got["stable_rank"] == pytest.approx(np.sum(s * s) / s[0] ** 2, rel=1e-12)
    assert set(got) == {"spectral_norm", "stable_rank", "alpha", "alpha_xmin", "alpha_ks"}


def test_spectral_summary_degenerate_matrices():
    zero = spectral_summary(torch.zeros(20, 15))
    assert zero["spectral_norm"] == 0 and math.isnan(zero["stable_rank"]) and math.isnan(zero["alpha"])
    orthogonal = spectral_summary(torch.eye(20, dtype=torch.float64))  # every eigenvalue 1
    assert orthogonal["stable_rank"] == pytest.approx(20) and math.isnan(orthogonal["alpha"])
    small = spectral_summary(torch.randn(9, 40))  # 9 eigenvalues < MIN_EIGENVALUES
    assert math.isnan(small["alpha"]) and small["spectral_norm"] > 0


def test_alpha_of_a_matrix_is_the_fit_of_its_squared_singular_values():
    """The matrix route (float32 weight, SVD, numerical zeros dropped) gives the fit of the
    eigenvalues it was built from, for a full-rank and a rank-deficient matrix."""
    for seed, (m, n, rank) in enumerate([(120, 90, 90), (120, 90, 60)]):
        lam = _pareto(rank, 2.5, seed)
        weight = _matrix_with_singular_values(torch.from_numpy(np.sqrt(lam)), m, n, seed)
        got = spectral_summary(weight.float())
        alpha, xmin, ks = fit_power_law(lam)
        assert got["alpha"] == pytest.approx(alpha, rel=1e-4)
        assert got["alpha_xmin"] == pytest.approx(xmin, rel=1e-5)
        assert got["alpha_ks"] == pytest.approx(ks, abs=1e-4)


# -- fit_power_law -------------------------------------------------------------------------

def _brute_force_fit(eigenvalues):
    """fit_power_law's definition, one candidate xmin at a time."""
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    x = x[x > 0]
    best = None
    for xmin in np.unique(x)[:-1]:
        tail = x[x >= xmin]
        n = tail.size
        alpha = 1 + n / np.sum(np.log(tail / xmin))
        ks = max(abs(1 - (t / xmin) ** (1 - alpha) - k / n) for k, t in enumerate(tail))
        if best is None or ks < best[2]:
            best = (alpha, xmin, ks)
    return best


@pytest.mark.parametrize("case", ["pareto", "lognormal", "ties", "bulk_and_tail"])
def test_fit_matches_brute_force(case):
    rng = np.random.default_rng(4)
    x = {"pareto": lambda: _pareto(150, 3.0, 5),
         "lognormal": lambda: rng.lognormal(0.0, 1.5, 120),
         "ties": lambda: np.round(rng.lognormal(0.0, 1.0, 200), 1),   # repeated values
         "bulk_and_tail": lambda: np.r_[rng.uniform(0.1, 1, 150), _pareto(40, 2.0, 6), 0, 0]}[case]()
    got = fit_power_law(x)
    want = _brute_force_fit(x)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_alpha_recovers_the_pareto_exponent():
    """Eigenvalues drawn from density ~ x^-alpha (x >= 1), 200 of them (the ESD of a
    200-neuron layer): measured over 300 draws per alpha (seeds 0-299), the error has bias
    0.022 / 0.044 / 0.066 and std 0.10 / 0.20 / 0.31 for alpha 2 / 3 / 4 (about
    (alpha - 1) / sqrt(n_tail), KS picking a tail shorter than 200); every error was within
    0.31 alpha, and the median of each group of 15 draws within 0.05 alpha. Asserted on
    seeds 0-14: every error within 0.35 alpha, their median within 0.075 alpha."""
    for alpha in (2.0, 3.0, 4.0):
        errors = np.array([fit_power_law(_pareto(200, alpha, seed))[0] - alpha for seed in range(15)])
        assert np.abs(errors).max() < 0.35 * alpha, (alpha, errors)
        assert abs(np.median(errors)) < 0.075 * alpha, (alpha, errors)


def test_ks_finds_the_start_of_the_tail():
    """A flat bulk on [0.1, 1) (800 eigenvalues) under a Pareto tail from 1 (200): the KS
    choice of xmin lands at the tail's start (measured over 100 draws, median xmin 1.03 for
    alpha 2, 1.0003 for alpha 3)."""
    for alpha in (2.0, 3.0):
        xmins = []
        for seed in range(9):
            rng = np.random.default_rng(seed)
            x = np.r_[rng.uniform(0.1, 1.0, 800), _pareto(200, alpha, seed + 100)]
            xmins.append(fit_power_law(x)[1])
        assert 0.95 < np.median(xmins) < 1.1, (alpha, xmins)


@pytest.mark.skipif(importlib.util.find_spec("weightwatcher") is None,
                    reason="weightwatcher is not installed")
def test_alpha_agrees_with_weightwatcher():
    """WeightWatcher 0.7.7 (pip install --no-deps weightwatcher powerlaw pandas scikit-learn
    joblib threadpoolctl narwhals python-dateutil pytz tzdata) analyzing a torch model of
    Linear layers: on these seven matrices (Pareto exponents 1.5-5 and a Gaussian one, 100 to
    400 eigenvalues, all above its 1e-5 cut-off), max |alpha_ours - alpha_ww| was 5.9e-8 and
    the xmins agreed to 1e-8 relative (its SVD and ours differ in the last digits)."""
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    cases = [(256, 128, 2.0), (300, 200, 3.0), (128, 256, 4.0), (400, 400, 2.5),
             (512, 128, 5.0), (200, 100, 1.5)]
    weights = [_matrix_with_singular_values(torch.from_numpy(np.sqrt(_pareto(min(m, n), a, i))),
                                            m, n, i) for i, (m, n, a) in enumerate(cases)]
    weights.append(torch.randn(300, 150, generator=torch.Generator().manual_seed(9),
                               dtype=torch.float64) / 300 ** 0.5)
    model = nn.Sequential(*[nn.Linear(w.shape[1], w.shape[0], bias=False).double() for w in weights])
    with torch.no_grad():
        for layer, w in zip(model, weights):
            layer.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = weightwatcher.WeightWatcher(model=model).analyze()
    ours = [spectral_summary(w) for w in weights]
    np.testing.assert_allclose([o["alpha"] for o in ours], details["alpha"], atol=1e-6)
    np.testing.assert_allclose([o["alpha_xmin"] for o in ours], details["xmin"], rtol=1e-6)


# -- bad input -----------------------------------------------------------------------------

def test_bad_arguments():
    model = _layers_model()
    for every in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            SpectraTracker(model, every=every)
    with pytest.raises(ValueError, match=r"unknown layers \['nope'\].*'conv'"):
        SpectraTracker(model, layers=["fc", "nope"])
    with pytest.raises(TypeError, match="list of layer names"):
        SpectraTracker(model, layers="fc")
    with pytest.raises(ValueError, match="layer 'norm' cannot be tracked: .*at least 2 dims"):
        SpectraTracker(model, layers=["norm"])
    with pytest.raises(ValueError, match="no layer with a weight matrix"):
        SpectraTracker(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    with pytest.raises(TypeError, match="Monitor or a torch.nn.Module"):
        SpectraTracker(torch.zeros(3, 3))
    tracker = SpectraTracker(model, layers=["fc"])
    assert tracker.layers == ["fc"]
    with pytest.raises(TypeError, match="step must be an int"):
        tracker.step(1.0)
    with pytest.raises(ValueError, match="at least 2 dims"):
        spectral_summary(torch.ones(5))
    with pytest.raises(ValueError, match="is empty"):
        spectral_summary(torch.ones(0, 5))
    with pytest.raises(TypeError, match="real floating point"):
        spectral_summary(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        spectral_summary(np.ones((3, 3)))
    with pytest.raises(ValueError, match="must be 1-D"):
        fit_power_law(np.ones((3, 3)))
    with pytest.raises(ValueError, match="must be finite"):
        fit_power_law([1.0, math.nan, 2.0])


def test_empty_weight_is_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initializing zero-element tensors is a no-op
        model = nn.Sequential(nn.Linear(4, 0), nn.Linear(4, 3))
    tracker = SpectraTracker(model)
    assert tracker.layers == ["1"] and "is empty" in tracker.skipped[0][1]


def test_tied_weight_is_tracked_once():
    emb, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = emb.weight
    tracker = SpectraTracker(nn.ModuleDict({"emb": emb, "head": head}))
    assert tracker.layers == ["emb"] and tracker.skipped == [
        ("head", "the same weight as layer 'emb' (tied)")]


def test_non_finite_weight_gives_nan_with_a_warning_and_keeps_the_warm_start():
    model = _layers_model()
    tracker = SpectraTracker(model, layers=["fc", "conv"])
    for step in range(1500):
        tracker.step(step)
    saved = model["fc"].weight.detach().clone()
    with torch.no_grad():
        model["fc"].weight[3, 4] = math.nan
    tracker.step(1500)
    with pytest.warns(RuntimeWarning, match="layer 'fc' had a non-finite weight"):
        history = tracker.history
    assert math.isnan(history["fc/top_singular"][-1])
    assert not math.isnan(history["conv/top_singular"][-1])
    with pytest.warns(RuntimeWarning, match="layer 'fc'.s weight has non-finite"):
        summary = tracker.summary()
    assert all(math.isnan(v) for v in summary["fc"].values())
    assert summary["conv"]["spectral_norm"] > 0
    with pytest.warns(RuntimeWarning, match="non-finite elements"):
        assert math.isnan(spectral_summary(model["fc"].weight)["spectral_norm"])
    with torch.no_grad():
        model["fc"].weight.copy_(saved)
    tracker.step(1501)  # the vector survived the nan step: accurate at once
    assert abs(tracker.top_singular()["fc"] / _top_singular(saved) - 1) < 1e-4


def test_zero_weight_gives_zero_then_restarts():
    layer = nn.Linear(10, 12)
    tracker = SpectraTracker(layer)
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.zero_()
    tracker.step(0)
    assert tracker.top_singular()[""] == 0
    with torch.no_grad():
        layer.weight.copy_(saved)
    for step in range(1, 1500):
        tracker.step(step)
    assert abs(tracker.top_singular()[""] / _top_singular(saved) - 1) < 1e-4


def test_top_singular_before_any_step_is_nan_with_a_warning():
    tracker = SpectraTracker(nn.Linear(3, 3))
    with pytest.warns(RuntimeWarning, match="no step has been measured"):
        assert math.isnan(tracker.top_singular()[""])


def test_a_replaced_weight_of_another_shape_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    tracker = SpectraTracker(model)
    model[0].weight = nn.Parameter(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"layer '0'.s weight is now \(5, 4\)"):
        tracker.step(0)


def test_sharded_weight_is_skipped(tmp_path):
    """FSDP2 on one rank: its DTensor weights are skipped with the reason, the others tracked."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp_path, 'rendezvous')}",
                            rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
        fully_shard(model[0])
        tracker = SpectraTracker(model)
        assert tracker.layers == ["1"]
        assert tracker.skipped[0][0] == "0" and "DTensor" in tracker.skipped[0][1]
        with pytest.raises(ValueError, match="weight is a DTensor"):
            spectral_summary(model[0].weight)
    finally:
        dist.destroy_process_group()
