"""Figures of the learning-rate experiment, drawn from saved per-(seed, lr) results.

Owns the five figures `reproduce` writes; reads only the result mappings of
`train.train_autoencoder` by seed and lr (as loaded from the npz files) and writes PNGs
atomically. Every curve or point is the mean over the seeds, with a shaded band or error bars
from the lowest to the highest seed (seeds.py). The per-layer
numbers plotted against lr are report.layer_rows_over_seeds', the same as report.md's table.
It uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global
backend or state.

  reconstructions.png     one test image per class and its reconstruction at every lr (the
                          first seed: images differ between seeds)
  fluctuations.png        per layer, weight and bias spread over training: the mean over
                          neurons of spread_j (solid) and their std, the spread of the
                          spread (dashed)
  spread_vs_lr.png        final-window mean spread and spread of the spread per layer vs lr
  participation_vs_lr.png participation ratio / N, dead fraction, mean active fraction vs lr
  loss.png                train and test reconstruction loss per epoch
  sharpness.png           per lr, the sharpness over training (Adam: and the preconditioned
                          sharpness) with its stability threshold, 2/lr (SGD) or 38/lr
                          (Adam, preconditioned); when measured
  spectra.png             per lr, each layer's top singular value over training, and its
                          alpha and stable rank at every window's close; when measured
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import probe_report, report
from .seeds import over_seeds
from .shapes import CLASSES

Results = Mapping[float, Mapping[str, np.ndarray]]  # one seed's results by lr
BySeed = Mapping[int, Results]
FIGURES = ("reconstructions.png", "fluctuations.png", "spread_vs_lr.png",
           "participation_vs_lr.png", "loss.png", "sharpness.png", "spectra.png")


def _save(fig: Figure, path: str, crop: bool = False) -> None:
    # crop (bbox_inches="tight") costs a second draw: only for figures without tight_layout
    FigureCanvasAgg(fig)
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight" if crop else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _log_y(ax) -> None:
    # log scale only with some positive data: a degenerate run (one step per window) has zeros
    ys = [np.asarray(line.get_ydata(), dtype=np.float64) for line in ax.get_lines()]
    if any(np.any(np.isfinite(y) & (y > 0)) for y in ys):
        ax.set_yscale("log", nonpositive="mask")


def _first(by_seed: BySeed) -> Results:
    return next(iter(by_seed.values()))


def _layers(by_seed: BySeed) -> list[str]:
    return [str(n) for n in next(iter(_first(by_seed).values()))["layers"]]


def _curve(ax, x, per_seed: list[np.ndarray], color, label: str, **line) -> None:
    """The seed mean of per_seed curves (nan-aware), with the seeds' range shaded."""
    stats = [over_seeds(column) for column in np.stack(per_seed, axis=1)]
    mean = np.array([o.mean for o in stats])
    ax.plot(x, mean, color=color, label=label, **line)
    if len(per_seed) > 1:
        lo, hi = np.array([(o.lo, o.hi) for o in stats]).T
        # the curves are positive quantities on log axes: a zero cannot be drawn there
        ax.fill_between(x, lo, hi, where=lo > 0, color=color, alpha=0.18, lw=0)


def _colors(lrs):
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    ordered = sorted(lrs, reverse=True)
    return {lr: cmap(i / max(len(ordered) - 1, 1) * 0.85) for i, lr in enumerate(ordered)}


def reconstructions(by_seed: BySeed, path: str) -> None:
    seed, results = next(iter(by_seed.items()))
    lrs = sorted(results, reverse=True)
    first = results[lrs[0]]
    inputs, labels = first["recon/inputs"], first["recon/labels"]
    k = inputs.shape[0]
    fig = Figure(figsize=(1.1 * k + 0.8, 1.15 * (len(lrs) + 1)))
    axes = fig.subplots(len(lrs) + 1, k, squeeze=False)
    rows = [("input", inputs)] + [(f"lr {lr:g}", results[lr]["recon/outputs"]) for lr in lrs]
    for r, (name, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(CLASSES[int(labels[c])], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"test images (top) and their reconstructions per learning rate (seed {seed})",
                 fontsize=9)
    _save(fig, path, crop=True)


def fluctuations(by_seed: BySeed, path: str) -> None:
    layers = _layers(by_seed)
    lrs = sorted(_first(by_seed), reverse=True)
    colors = _colors(lrs)
    fig = Figure(figsize=(9, 2.1 * len(layers) + 0.6))
    axes = fig.subplots(len(layers), 2, squeeze=False, sharex=True)
    for r, layer in enumerate(layers):
        for c, kind in enumerate(("weight", "bias")):
            ax = axes[r, c]
            for lr in lrs:
                means, stds = [], []
                for results in by_seed.values():
                    spread = results[lr][f"history/{layer}/{kind}.spread"]
                    with warnings.catch_warnings():  # a layer without bias has all-nan rows
                        warnings.simplefilter("ignore", RuntimeWarning)
                        means.append(np.nanmean(spread, axis=1))
                        stds.append(np.nanstd(spread, axis=1))
                x = _first(by_seed)[lr]["history/window_end"]
                _curve(ax, x, means, colors[lr], f"lr {lr:g} mean", lw=1.3)
                _curve(ax, x, stds, colors[lr], f"lr {lr:g} std", lw=0.9, ls="--")
            _log_y(ax)
            ax.set_title(f"{layer}: {kind} spread", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(layers) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle("fluctuations over training, per window: mean over neurons of spread_j "
                 "(solid) and its std over neurons, the spread of the spread (dashed)\n"
                 f"mean over {len(by_seed)} seed(s), band: their range", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _per_layer_vs_lr(ax, by_seed: BySeed, layers, key: str, ylabel: str, log: bool = True):
    rows = report.layer_rows_over_seeds(by_seed)
    every_layer = _layers(by_seed)  # a layer keeps its colour in panels showing a subset
    for layer in layers:
        pts = sorted((x["lr"], x[key]) for x in rows if x["layer"] == layer)
        lrs = [p[0] for p in pts]
        mean = np.array([p[1].mean for p in pts])
        lo, hi = np.array([(p[1].lo, p[1].hi) for p in pts]).T
        ax.errorbar(lrs, mean, yerr=(mean - lo, hi - mean) if len(by_seed) > 1 else None,
                    marker="o", lw=1, capsize=2, label=layer,
                    color=f"C{every_layer.index(layer) % 10}")
    ax.set_xscale("log")
    if log:
        _log_y(ax)
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def spread_vs_lr(by_seed: BySeed, path: str) -> None:
    layers = _layers(by_seed)
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    _per_layer_vs_lr(axes[0], by_seed, layers, "mean_spread", "mean weight spread")
    _per_layer_vs_lr(axes[1], by_seed, layers, "spread_of_spread", "spread of the spread (weights)")
    _per_layer_vs_lr(axes[2], by_seed, layers, "bias_spread_of_spread",
                     "spread of the spread (biases)")
    axes[0].legend(fontsize=7)
    fig.suptitle("final-window fluctuations per layer vs learning rate (seed mean, bars: "
                 "their range)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def participation_vs_lr(by_seed: BySeed, path: str) -> None:
    layers = _layers(by_seed)
    relus = [str(n) for n in next(iter(_first(by_seed).values()))["relu_layers"]]
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    _per_layer_vs_lr(axes[0], by_seed, layers, "pr_over_n", "participation ratio / N")
    _per_layer_vs_lr(axes[1], by_seed, relus, "dead_fraction",
                     "dead fraction (active < threshold)", log=False)
    _per_layer_vs_lr(axes[2], by_seed, relus, "mean_active_fraction", "mean active fraction",
                     log=False)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("participating neurons vs learning rate (final window, seed mean, bars: their "
                 "range; dead/active: ReLU layers)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def loss(by_seed: BySeed, path: str) -> None:
    lrs = sorted(_first(by_seed), reverse=True)
    colors = _colors(lrs)
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for lr in lrs:
        epochs = _first(by_seed)[lr]["history/epoch"]
        for key, name, line in (("test_loss", "test", {"lw": 1.3}),
                                ("train_loss", "train", {"lw": 0.8, "ls": "--"})):
            _curve(ax, epochs, [r[lr][f"history/{key}"] for r in by_seed.values()],
                   colors[lr], f"lr {lr:g} {name}", **line)
    _log_y(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"reconstruction loss over training (mean over {len(by_seed)} seed(s), "
                 f"band: their range)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def sharpness(by_seed: BySeed, path: str, optimizer: str) -> None:
    lrs = sorted(_first(by_seed), reverse=True)
    rows = [("sharpness/value", "sharpness")]
    if optimizer == "adam":
        rows.append(("sharpness/preconditioned", "preconditioned sharpness"))
    fig = Figure(figsize=(3.6 * len(lrs) + 0.4, 2.8 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), len(lrs), squeeze=False)
    limit_row = len(rows) - 1  # the threshold applies to the tracked (last) row
    for c, lr in enumerate(lrs):
        steps = _first(by_seed)[lr]["sharpness/step"]
        for r, (key, name) in enumerate(rows):
            ax = axes[r, c]
            _curve(ax, steps, [res[lr][key] for res in by_seed.values()], "C0", name, lw=1.2)
            if r == limit_row:
                label = "38/lr" if optimizer == "adam" else "2/lr"
                ax.axhline(probe_report.threshold(optimizer, lr), color="C3", ls="--", lw=1,
                           label=label)
            _log_y(ax)
            ax.set_title(f"lr {lr:g}: {name}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
            if r == len(rows) - 1:
                ax.set_xlabel("optimizer step", fontsize=8)
    fig.suptitle(f"sharpness on the probe batch over training ({optimizer}; mean over "
                 f"{len(by_seed)} seed(s), band: their range)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def spectra(by_seed: BySeed, path: str) -> None:
    lrs = sorted(_first(by_seed), reverse=True)
    layers = _layers(by_seed)
    panels = (("top_singular", "top singular value", "spectra/step", "optimizer step"),
              ("alpha", "power-law alpha of the ESD", "spectra/epoch", "epoch"),
              ("stable_rank", "stable rank", "spectra/epoch", "epoch"))
    fig = Figure(figsize=(12, 2.7 * len(lrs) + 0.5))
    axes = fig.subplots(len(lrs), len(panels), squeeze=False)
    for r, lr in enumerate(lrs):
        first = _first(by_seed)[lr]
        for c, (key, name, x_key, x_name) in enumerate(panels):
            ax = axes[r, c]
            for i, layer in enumerate(layers):
                _curve(ax, first[x_key], [res[lr][f"spectra/{layer}/{key}"]
                                          for res in by_seed.values()],
                       f"C{i % 10}", layer, lw=1.1)
            if key == "alpha":
                ax.axhspan(*probe_report.ALPHA_RANGE, color="0.85", zorder=0)
            if key != "alpha":  # both span decades; alpha a few units
                _log_y(ax)
            ax.set_title(f"lr {lr:g}: {name}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(lrs) - 1:
                ax.set_xlabel(x_name, fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"weight spectra per layer over training (mean over {len(by_seed)} seed(s), "
                 f"band: their range; grey: alpha {probe_report.ALPHA_RANGE[0]:g}-"
                 f"{probe_report.ALPHA_RANGE[1]:g})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def figures_for(by_seed: BySeed) -> list[str]:
    """The names of FIGURES these results have data for."""
    skip = set()
    if not probe_report.has_sharpness(by_seed):
        skip.add("sharpness.png")
    if not probe_report.has_spectra(by_seed):
        skip.add("spectra.png")
    return [name for name in FIGURES if name not in skip]


def write_all(by_seed: BySeed, out_dir: str, optimizer: str) -> list[str]:
    """Every figure of figures_for(by_seed) into out_dir; returns their paths."""
    draw = {"reconstructions.png": reconstructions, "fluctuations.png": fluctuations,
            "spread_vs_lr.png": spread_vs_lr, "participation_vs_lr.png": participation_vs_lr,
            "loss.png": loss, "spectra.png": spectra,
            "sharpness.png": lambda b, p: sharpness(b, p, optimizer)}
    paths = []
    for name in figures_for(by_seed):
        path = os.path.join(out_dir, name)
        draw[name](by_seed, path)
        paths.append(path)
    return paths
