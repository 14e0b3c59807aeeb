"""What the page shows, taken from a Run (lf.load_run): the series and the per-neuron maps.

Pure numpy on the Run's arrays; draws nothing and writes nothing. A quantity the run did not
log (no windows, no drift, no scalars.csv) is simply absent from what these return.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # {panel: (steps [T], values [T])}
Maps = dict[str, tuple[np.ndarray, np.ndarray]]    # {layer: (steps [T], values [T, N])}


# what each metrics.csv column is (metrics.layer_metrics); a column not listed is shown by name
METRIC_NOTES = {
    "spread_of_spread": "std over neurons of the weight spread spread_j",
    "spread_cv": "spread of the spread / mean spread",
    "participation_ratio": "(Σ e_j)² / Σ e_j² of the neuron energies e_j (run option 'energy')",
    "dead_fraction": "fraction of neurons active on fewer than dead_threshold of inputs",
    "mean_active_fraction": "mean over neurons of the fraction of inputs on which it is active",
    "dead_count": "neurons active on fewer than dead_threshold of inputs",
    "participating_count": "neurons minus dead neurons",
}
# the per-neuron quantities drawn as neurons x time maps: (title, summary key, transform)
NEURON_QUANTITIES = (
    ("weight spread", "weight.spread", None),
    ("activation std", "activation.var", np.sqrt),
    ("gradient std", "gradient.var", np.sqrt),
    ("bias spread", "bias.spread", None),
    ("weight drift", "weight.drift", None),
    ("weight update size", "weight.update_size", None),
)
SPECTRA = "spectra/"  # scalars.csv names "spectra/{layer}/{quantity}"


class NeuronMaps(NamedTuple):
    title: str
    key: str
    windows: Maps     # one column per closed window (instrument's `windows` option)
    summaries: Maps   # one column per summary file (cumulative since reset)


def last_step(run) -> int | None:
    """The last step anything was logged at (metrics, summaries or windows), None if none."""
    steps = [int(run.metrics["step"][-1])] if len(run.metrics["step"]) else []
    steps += [run.summaries[-1][0]] if run.summaries else []
    steps += [int(w.step[-1]) for w in run.windows.values() if len(w.step)]
    return max(steps) if steps else None


def metric_series(run) -> dict[str, Series]:
    """{metric: {layer: (steps, values)}} of every metrics.csv column, layers in run.json order."""
    layers = run.layers
    masks = {layer: run.metrics["layer"] == layer for layer in layers}
    steps = run.metrics["step"]
    return {metric: {layer: (steps[m], values[m]) for layer, m in masks.items() if m.any()}
            for metric, values in run.metrics.items() if metric not in ("step", "layer")}


def _transformed(values: np.ndarray, fn: Callable | None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if fn is None:
        return values
    with np.errstate(invalid="ignore"):
        return fn(values)


def summary_maps(run, key: str, fn: Callable | None = None) -> Maps:
    """{layer: (summary steps, [T, N])} of one per-neuron summary key."""
    out: Maps = {}
    for layer in run.layers:
        rows = [(step, s[layer][key]) for step, s in run.summaries
                if layer in s and key in s[layer] and np.ndim(s[layer][key]) == 1]
        n = rows[-1][1].shape[0] if rows else 0
        rows = [(step, v) for step, v in rows if v.shape[0] == n]
        if rows and n:
            out[layer] = (np.array([s for s, _ in rows], dtype=np.int64),
                          _transformed(np.stack([v for _, v in rows]), fn))
    return out


def window_maps(run, key: str, fn: Callable | None = None) -> Maps:
    """{layer: (closing steps, [W, N])} of one per-neuron key of the closed windows."""
    rows = run.windows.get(key.partition(".")[0])
    if rows is None or not len(rows.step):
        return {}
    return {layer: (rows.step, _transformed(keys[key], fn))
            for layer in run.layers if key in (keys := rows.layers.get(layer, {}))}


def neuron_maps(run) -> list[NeuronMaps]:
    """The per-neuron quantities that the run logged, in NEURON_QUANTITIES order."""
    out = []
    for title, key, fn in NEURON_QUANTITIES:
        maps = NeuronMaps(title, key, window_maps(run, key, fn), summary_maps(run, key, fn))
        if maps.windows or maps.summaries:
            out.append(maps)
    return out


def scalar_groups(run) -> list[tuple[str, Series]]:
    """scalars.csv grouped into figures: ("sharpness and other scalars", {name: series}), then
    one ("spectra: {quantity}", {layer: series}) per spectral quantity."""
    scalars = run.scalars
    plain = {name: s for name, s in scalars.items() if not name.startswith(SPECTRA)}
    spectra: dict[str, Series] = {}
    for name, s in scalars.items():
        if name.startswith(SPECTRA):
            layer, _, quantity = name[len(SPECTRA):].rpartition("/")
            spectra.setdefault(quantity, {})[layer] = s
    groups = [("scalars", plain)] if plain else []
    order = {layer: i for i, layer in enumerate(run.layers)}
    for quantity, series in spectra.items():
        ordered = dict(sorted(series.items(), key=lambda kv: order.get(kv[0], len(order))))
        groups.append((f"spectra: {quantity}", ordered))
    return groups
