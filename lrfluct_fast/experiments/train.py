"""Training loop of the learning-rate experiment: one monitored autoencoder at one lr.

Owns the optimisation (optimizer, MSE loss, batching, shuffling), when the monitor is
stepped, read and reset, and the layout of one run's results (a flat dict of numpy arrays,
the keys below, saved as one npz by `reproduce`). It does not build the data or the model,
write files or plot.

Loop: Adam (default: the usual choice for a small PyTorch autoencoder, and plain SGD at
1e-4 barely moves in a short window; `optimizer="sgd"` for plain SGD) on the mean squared
reconstruction error, mini-batches of `batch_size` in an order reshuffled every epoch from `seed`
(`batch_size` >= the number of images: one full batch per step, so SGD is full-batch gradient
descent);
`monitor.step()` after every optimizer step. Statistics windows of `window` epochs (default
1, so each history row is one epoch's fluctuations: a weight's temporal std over that
epoch's steps, activations and gradients of that epoch's forwards); the last window is also
closed at the final epoch. The fused monitor closes them itself (instrument's `windows`
option, one window length for every statistic; its whole-run statistics stay beside them);
a monitor without windows (the hook baselines) is read and reset at each window's end.
The "final" summary and metrics are the last window's (with windows: its per-neuron rows,
so no weight.temporal_var). `window=epochs` gives statistics over the whole run instead.
Evaluation forwards (test loss every epoch, reconstructions) run in eval mode under
no_grad, so a monitor following DESIGN's counting rules does not count them.

Result keys (N = a layer's neurons, W = windows, E = epochs):
  lr, seed, epochs, steps_per_epoch, wall_s                scalars
  layers, relu_layers                                      layer names (str arrays)
  history/epoch, history/train_loss, history/test_loss     [E] (train loss: mean over the
                                                           epoch's batches, in training)
  history/window_end                                       [W] epoch closing each window
  history/<layer>/weight.spread, .../bias.spread,
  history/<layer>/activation.active_fraction               [W, N] float32
  history/<layer>/metric.<name>                            [W], every key of mon.metrics()
  summary/<layer>/<key>                                    the last window's mon.summary()
  metrics/<layer>/<name>                                   the last window's mon.metrics()
  final/train_loss, final/test_loss                        MSE over the whole set, eval mode
  recon/inputs, recon/outputs, recon/labels                one test image per class and its
                                                           reconstruction [k, 1, H, W]
  probe_s                                                  seconds spent in sharpness/spectra
  sharpness/..., spectra/...                               probes.py, when measured
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .autoencoder import monitored_layers, relu_layers
from .probes import TrainingProbes

MONITORS = ("fused", "hooks")
OPTIMIZERS = ("adam", "sgd")
HISTORY_KEYS = ("weight.spread", "bias.spread", "activation.active_fraction")


class MonitorUnavailable(RuntimeError):
    """The requested monitor is not part of this installation."""


def resolve_monitor(monitor) -> Callable[[nn.Module], object]:
    """A monitor factory: a callable model -> Monitor, or a name.

    "fused" (default): lrfluct_fast.instrument; "hooks": lrfluct_fast.baselines.HookStreaming;
    "snapshot": lrfluct_fast.baselines.HookSnapshot (float64 reference, memory grows per step).
    """
    if callable(monitor):
        return monitor
    if monitor in (None, "fused"):
        import lrfluct_fast
        fn = getattr(lrfluct_fast, "instrument", None)
        if fn is None:
            raise MonitorUnavailable("lrfluct_fast.instrument is not available in this build "
                                     "(use --monitor hooks)")
        return fn
    if monitor in ("hooks", "snapshot"):
        from .. import baselines
        return baselines.HookStreaming if monitor == "hooks" else baselines.HookSnapshot
    raise ValueError(f"monitor must be a callable or one of {(*MONITORS, 'snapshot')}, "
                     f"got {monitor!r}")


def _instrument():
    import lrfluct_fast
    return getattr(lrfluct_fast, "instrument", None)


WINDOWED = ("activation", "gradient", "weight", "bias")


def _close_window(mon, windowed: bool):
    """(summary, metrics) of the window that ends now: the closed windows' rows of a monitor
    with windows, else its summary, after which it is reset."""
    if not windowed:
        summary, metrics = mon.summary(), mon.metrics()
        mon.reset()
        return summary, metrics
    from .. import metrics as lf_metrics
    mon.close_windows()  # a no-op for windows step() has just closed
    summary: dict[str, dict] = {}
    for row in mon.closed_windows():
        for layer, values in row.layers.items():
            summary.setdefault(layer, {}).update(values)
            summary[layer]["steps"] = np.int64(row.last_step - row.first_step + 1)
    options = {k: mon.options[k] for k in ("dead_threshold", "energy")}
    return summary, {layer: lf_metrics.layer_metrics(s, **options) for layer, s in summary.items()}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> float:
    """Mean squared reconstruction error over images, in eval mode (not counted by monitors)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        total += nn.functional.mse_loss(model(x), x, reduction="sum").double()
    model.train(was_training)
    return total.item() / max(images.numel(), 1)


def _first_of_each_class(labels: np.ndarray) -> np.ndarray:
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)],
                    dtype=np.int64)


def train_autoencoder(model: nn.Module, train_images: torch.Tensor, test_images: torch.Tensor,
                      test_labels, *, lr: float, epochs: int, batch_size: int = 64,
                      optimizer: str = "adam", window: int = 1, seed: int = 0,
                      monitor="fused", progress=None, sharpness_every: int = 0,
                      sharpness_probe: int = 256, spectra_every: int = 0
                      ) -> dict[str, np.ndarray]:
    """Train `model` (already on the images' device) and return its results (module docstring).

    monitor: a factory model -> Monitor, or a name for `resolve_monitor`. progress: an
    optional tqdm-like object, advanced by one per epoch. sharpness_every, spectra_every:
    optimizer steps between measurements (0: off), on the first `sharpness_probe` training
    images for the sharpness (probes.py).
    """
    if lr <= 0 or epochs < 1 or batch_size < 1 or window < 1 or sharpness_probe < 1:
        raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1, window >= 1, "
                         f"sharpness_probe >= 1, got lr={lr}, epochs={epochs}, batch_size="
                         f"{batch_size}, window={window}, sharpness_probe={sharpness_probe}")
    factory = resolve_monitor(monitor)
    layers = monitored_layers(model)
    relus = relu_layers(model)
    device = train_images.device
    n = train_images.shape[0]
    steps_per_epoch = -(-n // batch_size)
    order_gen = torch.Generator().manual_seed(seed)

    train_loss, test_loss, window_end = [], [], []
    history: dict[str, list] = {}
    summary = metrics = None
    model.train()
    start_time = time.perf_counter()
    windowed = factory is _instrument()
    steps_per_window = window * steps_per_epoch
    mon = (factory(model, windows=dict.fromkeys(WINDOWED, steps_per_window)) if windowed
           else factory(model))
    # after instrumenting: the optimizer must hold the parameters the wrapped modules use
    opt = make_optimizer(optimizer, model.parameters(), lr)
    probes = (TrainingProbes(model, mon, opt, train_images[:sharpness_probe], layers,
                             sharpness_every=sharpness_every, spectra_every=spectra_every)
              if sharpness_every or spectra_every else None)
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            total = torch.zeros((), dtype=torch.float64, device=device)
            order = torch.randperm(n, generator=order_gen).to(device)
            for start in range(0, n, batch_size):
                x = train_images[order[start:start + batch_size]]
                loss = nn.functional.mse_loss(model(x), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                mon.step()
                step += 1
                if probes is not None:
                    probes.after_step(step)
                total += loss.detach().double() * x.shape[0]
            train_loss.append(total.item() / n)
            test_loss.append(evaluate(model, test_images))
            if epoch % window == 0 or epoch == epochs:
                summary, metrics = _close_window(mon, windowed)
                window_end.append(epoch)
                for layer in layers:
                    for key in HISTORY_KEYS:
                        history.setdefault(f"history/{layer}/{key}", []).append(summary[layer][key])
                    for name, value in metrics[layer].items():
                        history.setdefault(f"history/{layer}/metric.{name}", []).append(value)
                if probes is not None:
                    probes.window_closed(epoch)
            if progress is not None:
                progress.set_postfix(lr=f"{lr:g}", loss=f"{train_loss[-1]:.4g}", refresh=False)
                progress.update(1)
        probe_results = probes.results(step) if probes is not None else {"probe_s": 0.0}
    finally:
        mon.remove()
    wall = time.perf_counter() - start_time

    labels = np.asarray(test_labels)
    pick = _first_of_each_class(labels)
    with torch.no_grad():
        model.eval()
        inputs = test_images[torch.as_tensor(pick, device=device)]
        outputs = model(inputs)
        model.train()

    out: dict[str, np.ndarray] = {
        "lr": np.float64(lr),
        "seed": np.int64(seed),
        "epochs": np.int64(epochs),
        "steps_per_epoch": np.int64(steps_per_epoch),
        "wall_s": np.float64(wall),
        "layers": np.array(layers, dtype=str),
        "relu_layers": np.array(relus, dtype=str),
        "history/epoch": np.arange(1, epochs + 1, dtype=np.int64),
        "history/train_loss": np.array(train_loss, dtype=np.float64),
        "history/test_loss": np.array(test_loss, dtype=np.float64),
        "history/window_end": np.array(window_end, dtype=np.int64),
        "final/train_loss": np.float64(evaluate(model, train_images)),
        "final/test_loss": np.float64(evaluate(model, test_images)),
        "recon/inputs": inputs.float().cpu().numpy(),
        "recon/outputs": outputs.float().cpu().numpy(),
        "recon/labels": labels[pick].astype(np.int64),
        **probe_results,
    }
    for key, rows in history.items():
        # per-neuron histories in float32: they dominate the file size on long runs
        dtype = np.float64 if "/metric." in key else np.float32
        out[key] = np.stack([np.asarray(r, dtype=dtype) for r in rows])
    for layer in layers:
        for key, value in summary[layer].items():
            out[f"summary/{layer}/{key}"] = np.asarray(value)
        for name, value in metrics[layer].items():
            out[f"metrics/{layer}/{name}"] = np.float64(value)
    return out
