"""Neurons x step maps as small PNG images (data URIs), several on one colour scale.

A map's records (summaries or closed windows, [T, N]) are resampled onto a uniform grid of
at most COLUMNS steps (each record covers the steps since the previous one) and ROWS neuron
bins (the mean of each bin), coloured by log10 of the value; zeros are white (a neuron that
did not move in a window has spread 0) and missing or non-finite values grey.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.image import imsave

COLUMNS, ROWS = 200, 128
CMAP = colormaps["viridis"].with_extremes(bad="#d9d9d9")
ZERO = (255, 255, 255, 255)


def resampled(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """([rows, columns] grid, neuron 0 in row 0; (first step, last step) it spans)."""
    first_span = int(steps[1] - steps[0]) if len(steps) > 1 else 1
    lo, hi = int(steps[0]) - first_span, int(steps[-1])
    cols = min(COLUMNS, max(1, hi - lo))
    centres = lo + (np.arange(cols) + 0.5) * (hi - lo) / cols
    grid = values[np.minimum(np.searchsorted(steps, centres, side="left"), len(steps) - 1)]
    n = grid.shape[1]
    if n > ROWS:
        size = math.ceil(n / ROWS)
        padded = np.full((grid.shape[0], size * math.ceil(n / size)), np.nan)
        padded[:, :n] = grid
        bins = padded.reshape(grid.shape[0], -1, size)
        seen = np.isfinite(bins).sum(axis=2)
        with np.errstate(invalid="ignore"):
            grid = np.where(seen > 0, np.nansum(bins, axis=2) / np.maximum(seen, 1), np.nan)
    return grid.T, (lo + 1, hi)


def log10(values: np.ndarray) -> np.ndarray:
    """log10 of the values: -inf for 0, nan for what is negative or not finite."""
    positive = np.isfinite(values) & (values > 0)
    logs = np.log10(np.where(positive, values, 1.0))
    return np.where(positive, logs, np.where(values == 0, -np.inf, np.nan))


def scale(grids) -> tuple[float, float]:
    """One colour scale for log10 grids: their 1st to 99th percentile."""
    finite = np.concatenate([g[np.isfinite(g)] for g in grids] or [np.zeros(0)])
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def image(grid: np.ndarray, lo: float, hi: float) -> str:
    """A log10 grid as a PNG data URI, neuron 0 at the bottom."""
    grid = grid[::-1]
    rgba = CMAP(np.ma.masked_invalid((grid - lo) / (hi - lo)), bytes=True)
    rgba[grid == -np.inf] = ZERO
    buf = io.BytesIO()
    imsave(buf, rgba, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gradient_css(stops: int = 9) -> str:
    """The colour map as a CSS linear-gradient, for the colour bar."""
    colours = [CMAP(i / (stops - 1), bytes=True) for i in range(stops)]
    return "linear-gradient(to right," + ",".join(f"rgb({r},{g},{b})" for r, g, b, _ in colours) + ")"
