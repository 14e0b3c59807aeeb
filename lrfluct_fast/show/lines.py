"""Line charts as inline SVG: one small panel of one or more series against step.

Built as text (no figure objects): a panel costs microseconds, so a model of many layers gets
one panel per layer in every metric's grid. Tick positions come from matplotlib's
MaxNLocator; a series of more than MAX_POINTS points is thinned to that many.
"""
from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

WIDTH, HEIGHT = 210, 118
LEFT, RIGHT, TOP, BOTTOM = 42, 8, 6, 16  # plot area margins, px
MAX_POINTS = 800
AXIS, GRID, TEXT = "#9aa3ad", "#e7eaee", "#5a6372"


def fmt(v: float) -> str:
    """A tick or a value in at most 4 significant digits."""
    return "0" if v == 0 else f"{v:.3g}".replace("e-0", "e-").replace("e+0", "e")


def _range(arrays) -> tuple[float, float] | None:
    finite = [a[np.isfinite(a)] for a in arrays]
    finite = [a for a in finite if a.size]
    if not finite:
        return None
    lo, hi = min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _ticks(lo: float, hi: float, bins: int) -> list[float]:
    eps = (hi - lo) * 1e-9
    return [float(t) for t in MaxNLocator(bins).tick_values(lo, hi) if lo - eps <= t <= hi + eps]


def step_range(series) -> tuple[float, float]:
    """The steps spanned by the (steps, values, ...) tuples of `series`, for panels that share
    their x axis."""
    steps = [np.asarray(s[0], dtype=np.float64) for s in series if len(s[0])]
    return _range(steps) or (0.0, 1.0)


def panel(series: list[tuple[np.ndarray, np.ndarray, str]], xrange: tuple[float, float] | None = None,
          width: int = WIDTH, height: int = HEIGHT) -> str:
    """An <svg> of the (steps, values, colour) series; xrange: the step axis (default: theirs)."""
    x0, x1 = xrange or step_range(series)
    yr = _range([np.asarray(v, dtype=np.float64) for _, v, _ in series])
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x):
        return LEFT + (np.asarray(x, dtype=np.float64) - x0) / (x1 - x0 or 1) * pw

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-size="9" font-family="sans-serif">']
    for t in _ticks(x0, x1, 4):
        x = float(px(t))
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="{GRID}"/>'
                   f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle" fill="{TEXT}">{fmt(t)}</text>')
    if yr is None:
        out.append(f'<text x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" '
                   f'fill="{TEXT}">no finite values</text>')
    else:
        y0, y1 = yr

        def py(y):
            return TOP + ph - (np.asarray(y, dtype=np.float64) - y0) / (y1 - y0) * ph

        for t in _ticks(y0, y1, 3):
            y = float(py(t))
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="{GRID}"/>'
                       f'<text x="{LEFT - 3}" y="{y + 3:.1f}" text-anchor="end" fill="{TEXT}">{fmt(t)}</text>')
        for steps, values, colour in series:
            out.append(_series(px(steps), py(values), colour))
    out.append(f'<path d="M{LEFT} {TOP}V{TOP + ph}H{LEFT + pw}" fill="none" stroke="{AXIS}"/></svg>')
    return "".join(out)


def _series(xs: np.ndarray, ys: np.ndarray, colour: str) -> str:
    if len(xs) > MAX_POINTS:
        keep = np.linspace(0, len(xs) - 1, MAX_POINTS).round().astype(np.int64)
        xs, ys = xs[keep], ys[keep]
    ok = np.isfinite(ys)
    parts, pen_down = [], False  # a non-finite value breaks the line
    for x, y, good in zip(xs, ys, ok):
        if good:
            parts.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
        pen_down = bool(good)
    out = f'<path d="{"".join(parts)}" fill="none" stroke="{colour}" stroke-width="1.3"/>' if parts else ""
    if len(xs) < 30:  # few points: mark each (a lone point has no line)
        out += "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.8" fill="{colour}"/>'
                       for x, y, good in zip(xs, ys, ok) if good)
    return out
