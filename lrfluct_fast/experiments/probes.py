"""Sharpness and weight spectra of the learning-rate experiment, measured while it trains.

Owns what train.py records beside the monitor's statistics, when it is measured and its
result keys:
  sharpness  the top eigenvalue of the Hessian of the training loss (MSE) on a fixed probe
             batch (lrfluct_fast.sharpness.SharpnessTracker, power iteration warm-started from
             the previous eigenvector), every `sharpness_every` optimizer steps and after the
             last one; with Adam also the preconditioned sharpness, the top eigenvalue of
             P^-1 H with P = sqrt(v_hat) + eps, Adam's own step scale.
  spectra    each monitored layer's top singular value (lrfluct_fast.spectra.SpectraTracker,
             one warm-started power-iteration step per layer every `spectra_every` steps) and,
             at every statistics window's close, its spectral summary (alpha of the power
             law fitted to the eigenvalues of W^T W, stable rank, spectral norm).
The sharpness is measured on the trained model under `monitor.paused()` (SharpnessTracker
does it), so the monitor's statistics stay those of training alone; a monitor that cannot be
paused (the hook baselines) is refused. Nothing here changes the trained model.

Result keys (K sharpness measurements, S tracked steps, W windows):
  probe_s                                           seconds spent here (not in training)
  sharpness/step, sharpness/value                   [K]
  sharpness/preconditioned                          [K], Adam only
  spectra/step, spectra/<layer>/top_singular        [S]
  spectra/<layer>/eigenvalues                       [] eigenvalues of W^T W: min(out, fan-in)
  spectra/epoch                                     [W + 1]: 0 (before training), then
                                                    history/window_end
  spectra/<layer>/alpha, .../stable_rank, .../spectral_norm, .../alpha_ks
                                                    [W + 1], at spectra/epoch
"""
from __future__ import annotations

import functools
import time

import numpy as np
import torch
from torch import nn

SUMMARY_KEYS = ("alpha", "alpha_ks", "stable_rank", "spectral_norm")


def _timed(method):
    """Adds the method's wall time to self.seconds."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
    return wrapper


def probe_loss(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The experiment's training loss on the probe batch: reconstruction MSE."""
    return nn.functional.mse_loss(model(probe), probe)


class TrainingProbes:
    """Sharpness and spectra of one training run (module docstring); train.py calls
    after_step after each optimizer step and window_closed at each window's end."""

    seconds = 0.0

    @_timed
    def __init__(self, model: nn.Module, monitor, optimizer, probe: torch.Tensor,
                 layers: list[str], *, sharpness_every: int, spectra_every: int):
        from ..monitor import Monitor
        from ..sharpness import SharpnessTracker
        from ..spectra import SpectraTracker

        if sharpness_every < 0 or spectra_every < 0:
            raise ValueError(f"sharpness_every and spectra_every must be >= 0 (0: off), got "
                             f"{sharpness_every} and {spectra_every}")
        if sharpness_every and not isinstance(monitor, Monitor):
            raise ValueError(f"measuring the sharpness needs a monitor that can be paused (an "
                             f"lrfluct_fast Monitor), got {type(monitor).__name__}: its "
                             f"statistics would count the Hessian's forwards; use "
                             f"sharpness_every=0")
        self.model, self.layers = model, layers
        self.sharpness_every, self.spectra_every = sharpness_every, spectra_every
        self.sharpness = (SharpnessTracker(model, probe_loss, probe, every=sharpness_every,
                                           optimizer=optimizer, monitor=monitor)
                          if sharpness_every else None)
        self.spectra = (SpectraTracker(model, every=spectra_every, layers=layers)
                        if spectra_every else None)
        self._last_measured = None
        self._summaries: dict[str, list[float]] = {}
        if self.spectra is not None:
            self._summarise(0)

    def _measure_sharpness(self, step: int) -> None:
        self.sharpness.measure(step)
        self._last_measured = step

    @_timed
    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based)."""
        if self.spectra is not None:
            self.spectra.step(step)
        if self.sharpness is not None and step % self.sharpness_every == 0:
            self._measure_sharpness(step)

    def _summarise(self, epoch: int) -> None:
        self._summaries.setdefault("spectra/epoch", []).append(epoch)
        for layer, values in self.spectra.summary().items():
            for key in SUMMARY_KEYS:
                self._summaries.setdefault(f"spectra/{layer}/{key}", []).append(values[key])

    @_timed
    def window_closed(self, epoch: int) -> None:
        """Called when the statistics window ending at `epoch` closes."""
        if self.spectra is not None:
            self._summarise(epoch)

    @_timed
    def results(self, last_step: int) -> dict[str, np.ndarray]:
        """The result keys (module docstring); measures the sharpness at last_step first if
        the schedule did not."""
        out: dict[str, np.ndarray] = {"probe_s": np.float64(self.seconds)}
        if self.sharpness is not None:
            if self._last_measured != last_step:
                self._measure_sharpness(last_step)
            history = self.sharpness.history
            out["sharpness/step"] = np.asarray(history["step"], dtype=np.int64)
            out["sharpness/value"] = np.asarray(history["sharpness"], dtype=np.float64)
            if "preconditioned_sharpness" in history:
                out["sharpness/preconditioned"] = np.asarray(
                    history["preconditioned_sharpness"], dtype=np.float64)
        if self.spectra is not None:
            history = self.spectra.history
            out["spectra/step"] = np.asarray(history["step"], dtype=np.int64)
            for layer in self.layers:
                out[f"spectra/{layer}/top_singular"] = np.asarray(
                    history[f"{layer}/top_singular"], dtype=np.float64)
            for layer in self.layers:
                weight = self.model.get_submodule(layer).weight
                out[f"spectra/{layer}/eigenvalues"] = np.int64(min(weight.shape[0],
                                                                   weight[0].numel()))
            for key, values in self._summaries.items():
                out[key] = np.asarray(values, dtype=np.int64 if key == "spectra/epoch"
                                      else np.float64)
        return out
