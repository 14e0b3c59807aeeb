"""spectra: the singular-value spectra of layer weights, tracked while a model trains.

Owns the spectral summary of one weight matrix (spectral norm, stable rank, the power-law
exponent of its eigenvalue density), the power-law fit itself, and SpectraTracker, which
follows each layer's top singular value by warm-started power iteration. It reads weights
under torch.no_grad() and never writes them: no parameter, gradient, autograd graph or
statistic of a Monitor is touched.

    tracker = SpectraTracker(mon_or_model, every=10)  # a Monitor's layers, or a plain model's
    ... opt.step(); mon.step(); tracker.step(step)     # one W v, W^T u pair per layer, no sync
    tracker.top_singular()    # {layer: the current estimate of the largest singular value}
    tracker.summary()         # {layer: spectral_summary(weight)}: one full SVD per layer
    tracker.history           # {"step": [...], "<layer>/top_singular": [...]}

The matrix of a layer: neuron j's incoming weights in row j, [out, fan_in] (a Linear's
weight; a conv kernel flattened to [out_channels, in * k...]; an Embedding's table
transposed to [features, entries]); the singular values do not depend on which side is which.
Which layers: with a Monitor, its layers whose weight has >= 2 dims; with a plain model,
every module of a registered layer kind (lrfluct_fast.layers: Linear, ConvNd, Embedding,
MultiheadAttention's in-projection, ...) with such a weight. Layers that cannot be tracked
are listed in `tracker.skipped` as (name, reason): 1-D weights (norms, biases), empty
weights, weights that are not real floating point, weights sharded as DTensors (FSDP2,
tensor parallel: the spectrum needs the whole matrix, gathered across ranks, which this
module does not do), and a second name of a tied weight. Naming such a layer in `layers=`
raises instead.

Power iteration (SpectraTracker.step): per layer, v (fan_in) is kept on the weight's device
in float32 (float64 for a float64 weight); one step computes u = W v / ||W v||,
b = W^T u, the estimate sigma = ||b|| (a lower bound of the largest singular value that
rises to it at the rate (s2 / s1)^2 per step, s1 > s2 the two largest singular values) and
v = b / ||b||. Across steps v is the warm start, so a weight that changes slowly is followed
in a step or a few. A step with a non-finite weight gives a nan estimate and keeps v
(the warm start survives); W v = 0 (a zero weight) gives 0 and restarts v from its initial
random vector. No host synchronisation: estimates stay on the device until history or
top_singular() is read, and a nan among them is warned of then, naming the layer.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from . import fsdp
from .layers import kind_of, parameter_value

MIN_EIGENVALUES = 10       # fewer positive eigenvalues: alpha is nan (WeightWatcher's min_evals)
_CANDIDATES_PER_CHUNK = 1 << 20  # (candidate, tail point) pairs of one KS block: 8 MiB per array
_COMPACT_EVERY = 256       # pending device estimates per layer stacked into one tensor
_SUMMARY_KEYS = ("spectral_norm", "stable_rank", "alpha", "alpha_xmin", "alpha_ks")
_LOGGED_KEYS = ("spectral_norm", "stable_rank", "alpha")  # to a Monitor's scalars.csv


def fit_power_law(eigenvalues) -> tuple[float, float, float]:
    """Fit a continuous power law p(x) ~ x^-alpha, x >= xmin, to the tail of `eigenvalues`
    (the empirical spectral density of W^T W: squared singular values), choosing xmin by the
    Kolmogorov-Smirnov distance as WeightWatcher (0.7.x, its own "ww" fit) does.

    Returns (alpha, xmin, ks_distance). Exactly:
    1. x: the finite eigenvalues > 0, sorted ascending (values <= 0 are zeros of a
       rank-deficient matrix; spectral_summary drops numerical zeros before calling this).
       Fewer than MIN_EIGENVALUES (10) of them, or all equal (an orthogonal matrix):
       (nan, nan, nan).
    2. Candidates: every distinct value of x except the largest, as xmin. For a candidate,
       the tail is t_0 = xmin <= t_1 <= ... <= t_{n-1}, every x >= xmin (n >= 2), and
         alpha(xmin) = 1 + n / sum_k log(t_k / xmin)              (the MLE)
         D(xmin)     = max_k | 1 - (t_k / xmin)^(1 - alpha) - k / n |
       i.e. the fitted CDF against the empirical CDF k / n just below each tail point (the
       form WeightWatcher evaluates; ties are counted as separate points).
    3. xmin = the candidate of smallest D (the smallest such xmin on a tie); alpha =
       alpha(xmin), ks_distance = D(xmin).
    WeightWatcher's differences: it drops eigenvalues <= 1e-5 (an absolute threshold;
    spectral_summary uses a relative one), and below 20 eigenvalues it switches to a
    bias-corrected small-sample fit; with >= 20 eigenvalues above 1e-5 and no ties the two
    give the same alpha (tests/test_spectra.py measures it).
    """
    x = np.asarray(eigenvalues.detach().cpu() if isinstance(eigenvalues, torch.Tensor)
                   else eigenvalues, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"fit_power_law: eigenvalues must be 1-D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"fit_power_law: eigenvalues must be finite, got "
                         f"{int((~np.isfinite(x)).sum())} non-finite of {x.size}")
    x = np.sort(x[x > 0])
    if x.size < MIN_EIGENVALUES:
        return math.nan, math.nan, math.nan
    log_x = np.log(x)
    # first index of each distinct value, leaving out the largest value (its tail has n = 1)
    first = np.flatnonzero(np.r_[True, x[1:] > x[:-1]])
    first = first[x[first] < x[-1]]
    if first.size == 0:  # every eigenvalue equal (an orthogonal matrix): no tail to fit
        return math.nan, math.nan, math.nan
    n = (x.size - first).astype(np.float64)
    log_tail_sum = np.cumsum(log_x[::-1])[::-1]  # sum of log x[i:]
    alpha = 1.0 + n / (log_tail_sum[first] - n * log_x[first])
    ks = np.empty_like(alpha)
    chunk = max(1, _CANDIDATES_PER_CHUNK // x.size)
    for lo in range(0, first.size, chunk):
        ks[lo:lo + chunk] = _ks_distances(log_x, first[lo:lo + chunk], alpha[lo:lo + chunk])
    best = int(np.argmin(ks))
    return float(alpha[best]), float(x[first[best]]), float(ks[best])


def _ks_distances(log_x, starts, alpha) -> np.ndarray:
    """D(xmin) of fit_power_law for the candidates x[starts], one row each. A row runs past
    the tail's end on log_x padded with its last value, where it repeats its last point."""
    size = log_x.size
    padded = np.concatenate([log_x, np.full(size, log_x[-1])])
    rows = np.lib.stride_tricks.sliding_window_view(padded, size)[starts]  # log t_k, [C, size]
    rows -= log_x[starts][:, None]
    rows *= (1.0 - alpha)[:, None]
    fitted = np.expm1(rows, out=rows)  # (t_k / xmin)^(1 - alpha) - 1: the fitted CDF negated
    n = (size - starts)[:, None].astype(np.float64)
    fitted += np.minimum(np.arange(size)[None, :], n - 1) / n
    return np.abs(fitted, out=fitted).max(axis=1)


def spectral_summary(weight: torch.Tensor) -> dict[str, float]:
    """The spectrum of `weight` viewed as a matrix, weight.flatten(1) ([out, in]; a conv
    kernel [out_channels, in * k...]), from its singular values s_1 >= s_2 >= ... computed in
    float64 (torch.linalg.svdvals, on the weight's device):
      spectral_norm  s_1
      stable_rank    ||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2 (nan for a zero matrix)
      alpha, alpha_xmin, alpha_ks   fit_power_law of the eigenvalues s_i^2 of W^T W, after
                     dropping numerical zeros: s_i <= s_1 * max(out, in) * eps, eps that of
                     float32 (float64 for a float64 weight), numpy's matrix_rank tolerance.
    A weight with a non-finite element gives nan for every key, with a warning.
    """
    matrix = _check_weight("spectral_summary: weight", weight).flatten(1)
    if not torch.isfinite(matrix).all():
        warnings.warn(f"spectral_summary: the weight (shape {tuple(weight.shape)}) has "
                      f"non-finite elements: its spectrum is nan", RuntimeWarning, stacklevel=2)
        return dict.fromkeys(_SUMMARY_KEYS, math.nan)
    return _summary_of_finite(matrix)


def _summary_of_finite(matrix: torch.Tensor) -> dict[str, float]:
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.mT  # 2x faster on CPU
    s = torch.linalg.svdvals(tall.detach().to(torch.float64)).cpu().numpy()
    top = float(s[0])
    eps = torch.finfo(_vector_dtype(matrix.dtype)).eps
    nonzero = s[s > top * max(matrix.shape) * eps]
    alpha, xmin, ks = fit_power_law(nonzero * nonzero)
    return {"spectral_norm": top,
            "stable_rank": float(np.sum(s * s) / (top * top)) if top > 0 else math.nan,
            "alpha": alpha, "alpha_xmin": xmin, "alpha_ks": ks}


def _vector_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _check_weight(what: str, weight) -> torch.Tensor:
    """The reason-named error for a weight no spectrum can be taken of; the weight otherwise."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if fsdp.is_dtensor(weight):
        raise ValueError(f"{what} is a DTensor (sharded, placements {tuple(weight.placements)}): "
                         f"its spectrum needs the whole matrix, gathered across ranks, which "
                         f"lrfluct_fast.spectra does not do")
    if weight.dim() < 2:
        raise ValueError(f"{what} must have at least 2 dims ([out, in, *kernel]), got shape "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(weight.shape)}): it has no spectrum")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{what} must be real floating point, got {weight.dtype}")
    return weight


class _Layer:
    """One tracked layer: where its weight is read, and its power-iteration state."""

    def __init__(self, name: str, module: nn.Module, attr: str, rows, matrix: torch.Tensor,
                 seed: int):
        self.name, self.module, self.attr, self.rows = name, module, attr, rows
        self.shape = tuple(matrix.shape)
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(self.shape[1], generator=gen, dtype=torch.float64)
        self.start = (start / start.norm()).to(matrix.device, _vector_dtype(matrix.dtype))
        self.v = self.start.clone()
        self.pending: list[torch.Tensor] = []   # device estimates not yet read, 0-d
        self.compacted: list[torch.Tensor] = []  # older ones, stacked in blocks

    def matrix(self) -> torch.Tensor:
        """The weight now, as [out, fan_in] (a view where the layout allows)."""
        weight = parameter_value(self.module, self.attr)
        if fsdp.is_dtensor(weight):
            raise ValueError(f"SpectraTracker: layer {self.name!r}'s weight became a DTensor "
                             f"(sharded after the tracker was made): it cannot be tracked")
        matrix = self.rows(weight.detach())
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"SpectraTracker: layer {self.name!r}'s weight is now "
                             f"{tuple(matrix.shape)} as a matrix, was {self.shape}: make a new "
                             f"tracker after replacing weights")
        return matrix

    def power_step(self) -> None:
        w = self.matrix()
        dtype = _vector_dtype(w.dtype)
        if self.v.device != w.device or self.v.dtype != dtype:  # the model was moved or cast
            self.v, self.start = self.v.to(w.device, dtype), self.start.to(w.device, dtype)
        w = w.to(dtype)
        a = torch.mv(w, self.v)
        u = a / a.norm().clamp_min(torch.finfo(dtype).tiny)
        b = torch.mv(w.mT, u)
        sigma = b.norm()
        ok = torch.isfinite(sigma) & (sigma > 0)
        # non-finite weight: keep the warm start; W v = 0: restart from the initial vector
        kept = torch.where(torch.isfinite(sigma), self.start, self.v)
        self.v = torch.where(ok, b / sigma, kept)
        self.pending.append(sigma)
        if len(self.pending) >= _COMPACT_EVERY:
            self.compacted.append(torch.stack(self.pending))
            self.pending = []

    def read(self) -> list[float]:
        """The estimates since the last read, on the host."""
        blocks = self.compacted + ([torch.stack(self.pending)] if self.pending else [])
        self.pending, self.compacted = [], []
        return torch.cat(blocks).tolist() if blocks else []


class SpectraTracker:
    """The top singular value of each layer's weight, followed by warm-started power
    iteration one matrix-vector pair per sampled step, and full spectra on demand (the
    module docstring says which layers, and how).

    model_or_monitor  a Monitor (its layers) or an nn.Module (its layers of registered kinds)
    every      step(step) measures when step % every == 0 (an int >= 1)
    layers     names of the layers to track (None: every layer that can be)

    With a Monitor that has a run directory, each summary() is also logged to its scalars.csv
    at the monitor's step, as "spectra/{layer}/{quantity}" for top_singular (the latest
    estimate), spectral_norm, stable_rank and alpha.
    """

    def __init__(self, model_or_monitor, *, every: int = 1, layers: Iterable[str] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SpectraTracker: every must be an int >= 1, got {every!r}")
        self.every = every
        candidates = _candidate_layers(model_or_monitor)
        self._monitor = model_or_monitor if not isinstance(model_or_monitor, nn.Module) else None
        if layers is not None:
            if isinstance(layers, str):
                raise TypeError(f"SpectraTracker: layers must be a list of layer names, got the "
                                f"string {layers!r}")
            wanted = list(layers)
            unknown = [n for n in wanted if n not in candidates]
            if unknown:
                raise ValueError(f"SpectraTracker: unknown layers {unknown}; the layers with a "
                                 f"weight are {sorted(candidates)}")
            candidates = {n: candidates[n] for n in wanted}
        self.skipped: list[tuple[str, str]] = []
        self._layers: dict[str, _Layer] = {}
        owners: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor keeps its id unique
        for seed, (name, (module, attr, rows)) in enumerate(candidates.items()):
            weight = parameter_value(module, attr)
            reason = _untrackable(weight) or (
                f"the same weight as layer {owners[id(weight)][0]!r} (tied)"
                if id(weight) in owners else None)
            if reason is not None:
                if layers is not None:
                    raise ValueError(f"SpectraTracker: layer {name!r} cannot be tracked: {reason}")
                self.skipped.append((name, reason))
                continue
            owners[id(weight)] = (name, weight)
            self._layers[name] = _Layer(name, module, attr, rows, rows(weight.detach()), seed)
        if not self._layers:
            raise ValueError(f"SpectraTracker: no layer with a weight matrix to track "
                             f"(skipped: {self.skipped or 'none'})")
        self._history: dict[str, list[float]] = {"step": []}
        self._history.update({f"{name}/top_singular": [] for name in self._layers})
        self._warned_nan: set[str] = set()

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """One power-iteration pair per layer when step % every == 0; nothing otherwise."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"SpectraTracker.step: step must be an int, got {step!r}")
        if step % self.every:
            return
        for layer in self._layers.values():
            layer.power_step()
        self._history["step"].append(step)

    @property
    def history(self) -> dict[str, list[float]]:
        """{"step": sampled steps, "<layer>/top_singular": the estimate after each}."""
        for name, layer in self._layers.items():
            values = layer.read()
            if any(math.isnan(v) for v in values) and name not in self._warned_nan:
                self._warned_nan.add(name)
                warnings.warn(f"SpectraTracker: layer {name!r} had a non-finite weight at some "
                              f"steps: its top_singular is nan there", RuntimeWarning,
                              stacklevel=2)
            self._history[f"{name}/top_singular"].extend(values)
        return self._history

    def top_singular(self) -> dict[str, float]:
        """{layer: the latest estimate of its largest singular value} (nan before any step)."""
        history = self.history
        if not history["step"]:
            warnings.warn("SpectraTracker.top_singular: no step has been measured yet: nan",
                          RuntimeWarning, stacklevel=2)
        return {name: (history[f"{name}/top_singular"] or [math.nan])[-1] for name in self._layers}

    @torch.no_grad()
    def summary(self) -> dict[str, dict[str, float]]:
        """{layer: spectral_summary of its matrix now} (one float64 SVD per layer). A layer
        whose weight has a non-finite element gives nan, with a warning naming it."""
        out = {}
        for name, layer in self._layers.items():
            matrix = layer.matrix()
            if torch.isfinite(matrix).all():
                out[name] = _summary_of_finite(matrix)
            else:
                warnings.warn(f"SpectraTracker.summary: layer {name!r}'s weight has non-finite "
                              f"elements: its spectrum is nan", RuntimeWarning, stacklevel=2)
                out[name] = dict.fromkeys(_SUMMARY_KEYS, math.nan)
        if self._monitor is not None:
            self._log(out)
        return out

    def _log(self, summaries: dict[str, dict[str, float]]) -> None:
        values = {}
        latest = self.top_singular() if self._history["step"] else {}
        for name, summary in summaries.items():
            if name in latest:
                values[f"spectra/{name}/top_singular"] = latest[name]
            for key in _LOGGED_KEYS:
                values[f"spectra/{name}/{key}"] = summary[key]
        self._monitor.log_scalars(values)


def _candidate_layers(model_or_monitor) -> dict[str, tuple[nn.Module, str, object]]:
    """{name: (module, weight attribute, weight -> [out, fan_in])} of every layer with a weight."""
    from .monitor import Monitor  # monitor imports much; spectra is imported without it
    if isinstance(model_or_monitor, Monitor):
        return {name: (module, st.params["weight"],
                       lambda w, k=st.kind, m=module: k.neuron_rows_of_weight(m, w))
                for name, module in model_or_monitor.layers.items()
                for st in (model_or_monitor.states[name],) if st.kind.weight is not None}
    if not isinstance(model_or_monitor, nn.Module):
        raise TypeError(f"SpectraTracker: model_or_monitor must be an lrfluct_fast Monitor or a "
                        f"torch.nn.Module, got {type(model_or_monitor).__name__}")
    found = {}
    for name, module in model_or_monitor.named_modules():
        kind = kind_of(module)
        if kind is None or kind.weight is None or parameter_value(module, kind.weight[0]) is None:
            continue
        found[name] = (module, kind.weight[0],
                       lambda w, k=kind, m=module: k.neuron_rows_of_weight(m, w))
    return found


def _untrackable(weight) -> str | None:
    """Why a weight cannot be tracked, or None."""
    try:
        _check_weight("its weight", weight)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


__all__ = ["MIN_EIGENVALUES", "SpectraTracker", "fit_power_law", "spectral_summary"]
