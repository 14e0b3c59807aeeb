"""Hand-computed cases for lrfluct_fast.metrics."""
import math

import numpy as np
import pytest

from lrfluct_fast import metrics

nan = float("nan")


def test_weight_spread_linear_and_conv():
    tv = np.array([[1.0, 3.0], [4.0, 4.0]])  # [N=2, in=2]
    np.testing.assert_allclose(metrics.weight_spread(tv), [math.sqrt(2.0), 2.0])
    conv = np.zeros((3, 2, 2, 2))  # [N, in, kh, kw]
    conv[1] = 9.0
    conv[2, 0, 0, 0] = 8.0  # mean over 8 elements = 1
    np.testing.assert_allclose(metrics.weight_spread(conv), [0.0, 3.0, 1.0])


def test_spread_of_spread_and_cv():
    assert metrics.spread_of_spread(np.full(5, 0.3)) == 0.0
    assert metrics.spread_cv(np.full(5, 0.3)) == 0.0
    assert metrics.spread_of_spread([1.0, 3.0]) == pytest.approx(1.0)  # population std
    assert metrics.spread_cv([1.0, 3.0]) == pytest.approx(0.5)
    assert math.isnan(metrics.spread_cv(np.zeros(4)))
    assert math.isnan(metrics.spread_of_spread([]))


def test_participation_ratio():
    assert metrics.participation_ratio(np.full(6, 2.5)) == pytest.approx(6.0)
    assert metrics.participation_ratio([0.0, 0.0, 7.0, 0.0]) == pytest.approx(1.0)
    assert metrics.participation_ratio([1.0, 1.0, 2.0]) == pytest.approx(16 / 6)
    assert math.isnan(metrics.participation_ratio(np.zeros(3)))
    assert math.isnan(metrics.participation_ratio([]))


def test_layer_metrics_full_summary():
    summary = {
        "weight.spread": np.array([1.0, 1.0, 1.0, 1.0]),
        "gradient.var": np.array([1.0, 0.0, 0.0, 0.0]),
        "activation.var": np.array([1.0, 1.0, 0.0, 0.0]),
        # neuron 2 had no finite observation: neither dead nor in the mean
        "activation.active_fraction": np.array([0.0, 0.005, nan, 0.5]),
    }
    m = metrics.layer_metrics(summary)
    assert set(m) == {"spread_of_spread", "spread_cv", "participation_ratio", "dead_fraction",
                      "mean_active_fraction", "dead_count", "participating_count"}
    assert m["spread_of_spread"] == 0.0 and m["spread_cv"] == 0.0
    assert m["participation_ratio"] == pytest.approx(4.0)
    assert m["dead_count"] == 2.0
    assert m["dead_fraction"] == pytest.approx(2 / 4)
    assert m["participating_count"] == 2.0
    assert m["mean_active_fraction"] == pytest.approx(0.505 / 3)
    assert metrics.layer_metrics(summary, energy="gradient")["participation_ratio"] == 1.0
    assert metrics.layer_metrics(summary, energy="activation")["participation_ratio"] == 2.0
    assert metrics.layer_metrics(summary, dead_threshold=0.001)["dead_count"] == 1.0


def test_layer_metrics_missing_or_unobserved_is_nan():
    m = metrics.layer_metrics({"weight.spread": np.array([1.0, 2.0])}, energy="gradient")
    assert m["spread_of_spread"] == pytest.approx(0.5)
    for key in ("participation_ratio", "dead_fraction", "mean_active_fraction",
                "dead_count", "participating_count"):
        assert math.isnan(m[key]), key
    m = metrics.layer_metrics({"activation.active_fraction": np.full(3, nan)})
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError):
        metrics.layer_metrics({}, energy="bogus")


def test_summarize_stats_matches_numpy():
    cols = [np.array([1.0, -2.0, 4.0]), np.array([0.5]), np.array([])]
    counts = np.array([[len(c) for c in cols],
                       [int((c > 0).sum()) for c in cols],
                       [1, 0, 2]])
    shift = np.array([1.0, 0.5, 0.0])  # moments hold the mean of (x - shift)
    moments = np.array([[c.mean() - s if len(c) else 0.0 for c, s in zip(cols, shift)],
                        [((c - c.mean()) ** 2).sum() if len(c) else 0.0 for c in cols],
                        shift], dtype=np.float32)
    s = metrics.summarize_stats("activation", counts, moments)
    assert set(s) == {"activation.count", "activation.mean", "activation.var",
                      "activation.nonfinite", "activation.active_fraction"}
    np.testing.assert_array_equal(s["activation.count"], [3, 1, 0])
    np.testing.assert_array_equal(s["activation.nonfinite"], [1, 0, 2])
    np.testing.assert_allclose(s["activation.mean"], [np.mean(cols[0]), 0.5, nan])
    np.testing.assert_allclose(s["activation.var"], [np.var(cols[0]), 0.0, nan], rtol=1e-6)
    np.testing.assert_allclose(s["activation.active_fraction"], [2 / 3, 1.0, nan])
    g = metrics.summarize_stats("gradient", counts, moments)
    assert set(g) == {"gradient.count", "gradient.mean", "gradient.var", "gradient.nonfinite"}
    with pytest.raises(ValueError):
        metrics.summarize_stats("gradient", counts[:2], moments)
