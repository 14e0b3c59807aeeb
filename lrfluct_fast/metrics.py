"""metrics: per-neuron spreads and layer metrics computed from summaries.

Owns the definitions of the derived quantities (weight spread, spread of the spread,
participation ratio, dead / participating neurons) and the conversion of the packed
statistics the ops produce into the summary keys of DESIGN section 2. Pure numpy on host
arrays; it owns no state and must not touch tensors, modules or the ops.

Conventions: every result is float64; a quantity that is undefined (no observations, a zero
denominator, a missing summary key) is nan rather than an exception.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from . import chan

ENERGIES = {"weight", "gradient", "activation"}

# Rows of the packed statistics (same layout as lrfluct_fast.ops).
_COUNT, _POSITIVE, _NONFINITE = 0, 1, 2
_MEAN, _M2, _SHIFT = 0, 1, 2
_CALLS = 0  # row of a temporal state's tally
_MASTER_MEAN, _MASTER_M2, _MASTER_COUNT = 0, 1, 2  # rows of a temporal state's master


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def weight_spread(temporal_var: np.ndarray) -> np.ndarray:
    """spread_j = sqrt(mean over every dim but the first of temporal_var[j, ...]).

    temporal_var has the weight's shape: [N, in] (Linear) or [N, in, k...] (ConvNd).
    An element with no finite observation has nan temporal var and makes its neuron nan.
    """
    tv = _f64(temporal_var)
    if tv.ndim == 0:
        raise ValueError("temporal_var must have at least one dim (neurons first)")
    per_neuron = tv.reshape(tv.shape[0], int(np.prod(tv.shape[1:])))  # (N, 0) for no inputs
    with np.errstate(invalid="ignore"):  # a neuron with no incoming weight: 0 / 0 = nan
        return np.sqrt(per_neuron.sum(axis=1) / per_neuron.shape[1])


def spread_of_spread(spread) -> float:
    """Population std over neurons of spread (nan when there are no neurons)."""
    s = _f64(spread).ravel()
    return float(s.std()) if s.size else float("nan")


def spread_cv(spread) -> float:
    """Coefficient of variation of spread: spread_of_spread / mean (nan when the mean is 0)."""
    s = _f64(spread).ravel()
    if s.size == 0:
        return float("nan")
    mean = s.mean()
    return float(s.std() / mean) if mean != 0 else float("nan")


def participation_ratio(v) -> float:
    """PR = (sum v)^2 / sum v^2, between 1 and N for non-negative v.

    N equal energies give N, a single non-zero energy gives 1. nan when there are no values
    or sum v^2 is 0.
    """
    v = _f64(v).ravel()
    if v.size == 0:
        return float("nan")
    s2 = np.square(v).sum()
    return float(v.sum() ** 2 / s2) if s2 != 0 else float("nan")


def _energy(summary: Mapping[str, np.ndarray], energy: str):
    if energy == "weight":
        spread = summary.get("weight.spread")
        return None if spread is None else np.square(_f64(spread))
    key = {"gradient": "gradient.var", "activation": "activation.var"}[energy]
    return summary.get(key)


def layer_metrics(summary: Mapping[str, np.ndarray], *, dead_threshold: float = 0.01,
                  energy: str = "weight") -> dict[str, float]:
    """Layer metrics from one layer's summary (a mapping of the DESIGN summary keys).

    - spread_of_spread: population std over neurons of spread_j = summary["weight.spread"].
    - spread_cv: spread_of_spread / mean_j spread_j (nan when the mean is 0).
    - participation_ratio: PR of the energies v_j: spread_j^2 (energy="weight", default),
      summary["gradient.var"] (energy="gradient") or summary["activation.var"]
      (energy="activation").
    - dead_count: neurons whose activation.active_fraction < dead_threshold, among the
      observed neurons (a neuron with no finite observation has active fraction nan and is
      neither dead nor counted in mean_active_fraction).
    - dead_fraction: dead_count / N, N = all neurons of the layer.
    - participating_count: N - dead_count.
    - mean_active_fraction: mean active fraction over the observed neurons.
    The dead / active metrics are nan when no neuron is observed. A missing key (e.g.
    activations not tracked) makes the metrics that need it nan; this function never raises
    for missing data (only for an unknown `energy`).
    """
    if energy not in ENERGIES:
        raise ValueError(f"energy must be one of {sorted(ENERGIES)}, got {energy!r}")
    nan = float("nan")
    out = dict.fromkeys(("spread_of_spread", "spread_cv", "participation_ratio", "dead_fraction",
                         "mean_active_fraction", "dead_count", "participating_count"), nan)

    spread = summary.get("weight.spread")
    if spread is not None:
        out["spread_of_spread"] = spread_of_spread(spread)
        out["spread_cv"] = spread_cv(spread)
    v = _energy(summary, energy)
    if v is not None:
        out["participation_ratio"] = participation_ratio(v)

    active = summary.get("activation.active_fraction")
    if active is not None:
        active = _f64(active).ravel()
        observed = active[np.isfinite(active)]
        if observed.size:
            dead = float(np.count_nonzero(observed < dead_threshold))
            out["dead_count"] = dead
            out["dead_fraction"] = dead / active.size
            out["participating_count"] = float(active.size) - dead
            out["mean_active_fraction"] = float(observed.mean())
    return out


def summarize_stats(prefix: str, counts: np.ndarray, moments: np.ndarray) -> dict[str, np.ndarray]:
    """Packed statistics -> summary keys `{prefix}.count/.mean/.var/.nonfinite`.

    counts int [3, N]: finite count, count of finite x > 0, non-finite count;
    moments [3, N]: mean of (x - shift), M2 (sum of squared deviations) and shift.
    var is the population variance M2 / count. mean and var are nan where count is 0.
    For prefix "activation" also `.active_fraction` = positive / count (nan where count is 0).
    Counts come back int64, the rest float64.
    """
    counts = np.asarray(counts).astype(np.int64, copy=False)
    moments = _f64(moments)
    if counts.ndim != 2 or counts.shape[0] != 3 or moments.shape != (3, counts.shape[1]):
        raise ValueError(f"expected counts [3, N] and moments [3, N], "
                         f"got {list(counts.shape)} and {list(moments.shape)}")
    n = counts[_COUNT]
    seen = n > 0
    denom = np.where(seen, n, 1).astype(np.float64)
    out = {
        f"{prefix}.count": n.copy(),
        f"{prefix}.mean": np.where(seen, moments[_SHIFT] + moments[_MEAN], np.nan),
        f"{prefix}.var": np.where(seen, moments[_M2] / denom, np.nan),
        f"{prefix}.nonfinite": counts[_NONFINITE].copy(),
    }
    if prefix == "activation":
        out[f"{prefix}.active_fraction"] = np.where(seen, counts[_POSITIVE] / denom, np.nan)
    return out


def temporal_var(tally: np.ndarray, skipped: np.ndarray, moments: np.ndarray,
                 master: np.ndarray) -> np.ndarray:
    """Population variance over steps from a temporal (tally, skipped, moments, master) state
    (ops.temporal_update): the master's closed blocks and the open block merged, M2 / count;
    nan where an element has no observation."""
    n = (np.asarray(tally)[_CALLS] - np.asarray(skipped)).astype(np.float64)
    block, master = _f64(moments), _f64(master)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        _, _, m2 = chan.merge(master[_MASTER_COUNT], master[_MASTER_MEAN], master[_MASTER_M2],
                              n - master[_MASTER_COUNT], block[_SHIFT] + block[_MEAN], block[_M2])
        return np.where(n > 0, m2 / n, np.nan)


def _temporal(buffers: Mapping[str, np.ndarray], kind: str):
    return tuple(buffers[f"{kind}.{part}"] for part in ("tally", "skipped", "moments", "master"))


def layer_summary(buffers: Mapping[str, np.ndarray], *, track: Mapping[str, bool],
                  weight_mode: str, steps: int, weight_rows=None) -> dict[str, np.ndarray]:
    """One layer's summary (the keys of DESIGN section 2) from its packed statistics on host.

    `buffers` holds the LayerState buffers as numpy arrays ("activation.counts",
    "activation.moments", ..., "weight.tally", "weight.skipped", "weight.moments", "weight.master");
    "weight.spread" may stand in for the weight's temporal state, already reduced per neuron, and
    then "weight.temporal_var" is absent; "bias.spread" likewise for the bias's.
    "weight.drift" and "weight.update_size" ([N], drift.per_neuron) are passed on when present.
    `weight_rows` maps a weight-shaped array to [N, fan_in], neuron j's incoming weights in
    row j (default: neurons are the first dim); "weight.temporal_var" keeps the weight's shape.
    """
    b, s = buffers, {}
    for kind in ("activation", "gradient"):
        if track[kind]:
            s.update(summarize_stats(kind, b[f"{kind}.counts"], b[f"{kind}.moments"]))
    if track["weight"]:
        if "weight.spread" in b:
            s["weight.spread"] = _f64(b["weight.spread"])
        elif weight_mode == "element":
            s["weight.temporal_var"] = temporal_var(*_temporal(b, "weight"))
            tv = s["weight.temporal_var"]
            s["weight.spread"] = weight_spread(tv if weight_rows is None else weight_rows(tv))
        else:
            s["weight.spread"] = np.sqrt(temporal_var(*_temporal(b, "weight"))).reshape(-1)
    for key in ("weight.drift", "weight.update_size"):  # drift=True, already per neuron (drift.py)
        if key in b:
            s[key] = _f64(b[key])
    if track["bias"]:
        s["bias.spread"] = (_f64(b["bias.spread"]) if "bias.spread" in b
                            else np.sqrt(temporal_var(*_temporal(b, "bias"))).reshape(-1))
    s["steps"] = np.array(steps, dtype=np.int64)
    return s
