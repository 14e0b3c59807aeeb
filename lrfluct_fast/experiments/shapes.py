"""The eight-shapes dataset: seeded, procedural, vectorized grayscale images.

Owns the shape definitions and their rasterization; knows nothing of models or training.

Classes (label: name): 0 circle, 1 square, 2 triangle, 3 star, 4 pentagon, 5 hexagon,
6 ellipse, 7 cross. Each image holds one white shape (value 1) on black (value 0), placed
with a random centre offset (`jitter`, a fraction of the image side), size (`scale_range`:
circumradius as a fraction of the side), rotation (uniform in [0, 2 pi) when `rotation`)
and optional Gaussian pixel noise, clipped to [0, 1]. Edges are anti-aliased by
supersampling. Labels are balanced (as equal as n allows) and shuffled.

Every shape is an inside-test on local coordinates (u, v) = the pixel position relative to
the shape's centre, rotated back and divided by its radius, so a whole batch of one class
is rasterized in a few array operations. The same seed gives the same images on any machine
(numpy's PCG64 and float64 geometry).

Defaults (the paper's generator is not published): 32 x 32 pixels, jitter 0.12, radius
0.2-0.35 of the side (jitter + largest radius < 0.5: a shape never touches the border),
full rotation, no noise.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "ellipse", "cross")
NUM_CLASSES = len(CLASSES)

# a shape's area at radius 1 is kept within about 2x of the circle's so that no class is a speck
_SQUARE_HALF_SIDE = 0.8
_ELLIPSE_MINOR = 0.55
_STAR_INNER = 0.45
_CROSS_HALF_WIDTH = 0.3
_CHUNK = 2048  # samples rasterized at once, bounds memory to ~chunk * (s*H)^2 floats


def _inside_regular_polygon(u, v, k: int):
    # a point is inside iff its projection on the normal of its sector's edge is short enough
    sector = 2 * math.pi / k
    phi = np.mod(np.arctan2(v, u) - math.pi / 2, sector) - sector / 2  # a vertex points up
    return np.hypot(u, v) * np.cos(phi) <= math.cos(math.pi / k)


def _inside_star(u, v, points: int = 5, inner: float = _STAR_INNER):
    # fold every angle into [0, pi/points], between an outer vertex (angle 0) and an inner one
    half = math.pi / points
    phi = np.mod(np.arctan2(v, u) - math.pi / 2, 2 * half)
    phi = np.where(phi > half, 2 * half - phi, phi)
    r = np.hypot(u, v)
    x, y = r * np.cos(phi), r * np.sin(phi)
    ax, ay = 1.0, 0.0
    bx, by = inner * math.cos(half), inner * math.sin(half)
    # inside iff on the origin's side of the edge a->b: the origin's cross product is by > 0
    return (bx - ax) * (y - ay) - (by - ay) * (x - ax) >= 0


def _inside(label: int, u, v):
    name = CLASSES[label]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF_SIDE
    if name == "triangle":
        return _inside_regular_polygon(u, v, 3)
    if name == "star":
        return _inside_star(u, v)
    if name == "pentagon":
        return _inside_regular_polygon(u, v, 5)
    if name == "hexagon":
        return _inside_regular_polygon(u, v, 6)
    if name == "ellipse":
        return u * u + (v / _ELLIPSE_MINOR) ** 2 <= 1.0
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_HALF_WIDTH) & (av <= 1.0)) | ((av <= _CROSS_HALF_WIDTH) & (au <= 1.0))
    raise ValueError(f"unknown class {label}")


def render(labels, cx, cy, radius, angle, size: int, supersample: int = 3) -> np.ndarray:
    """Rasterize shapes given their pose; returns float32 [n, size, size] in [0, 1].

    labels: int [n] in 0..7; cx, cy: centres in pixels (0 = left/top edge); radius: circumradius
    in pixels; angle: rotation in radians (counter-clockwise as displayed, y grows downwards).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    cx, cy, radius, angle = (np.broadcast_to(np.asarray(a, dtype=np.float64), (n,))
                             for a in (cx, cy, radius, angle))
    s = int(supersample)
    # sub-pixel sample positions: centres of an s x s grid inside every pixel
    coords = (np.arange(size * s, dtype=np.float64) + 0.5) / s
    out = np.zeros((n, size, size), dtype=np.float32)
    for label in range(NUM_CLASSES):
        idx = np.nonzero(labels == label)[0]
        for start in range(0, idx.size, _CHUNK):
            sel = idx[start:start + _CHUNK]
            dx = coords[None, None, :] - cx[sel, None, None]
            dy = coords[None, :, None] - cy[sel, None, None]
            c = np.cos(angle[sel])[:, None, None]
            sn = np.sin(angle[sel])[:, None, None]
            r = radius[sel][:, None, None]
            # rotate back by the shape's angle; image y points down, so flip it to keep math axes
            u = (c * dx - sn * dy) / r
            v = -(sn * dx + c * dy) / r
            mask = _inside(label, u, v).astype(np.float32)
            out[sel] = mask.reshape(sel.size, size, s, size, s).mean(axis=(2, 4))
    return out


def make_shapes(n: int, size: int = 32, seed: int | np.random.SeedSequence = 0, jitter: float = 0.12,
                scale_range: tuple[float, float] = (0.2, 0.35), rotation: bool = True,
                noise: float = 0.0, supersample: int = 3):
    """n seeded images of the eight shapes.

    Returns (images float32 [n, 1, size, size] in [0, 1], labels int64 [n] in 0..7).
    """
    if n < 0 or size < 1:
        raise ValueError(f"need n >= 0 and size >= 1, got n={n}, size={size}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    centre = size / 2 + rng.uniform(-jitter, jitter, size=(2, n)) * size
    radius = rng.uniform(lo, hi, size=n) * size
    angle = rng.uniform(0, 2 * math.pi, size=n) if rotation else np.zeros(n)
    images = render(labels, centre[0], centre[1], radius, angle, size, supersample)
    if noise > 0:
        images += rng.normal(0.0, noise, size=images.shape).astype(np.float32)
        np.clip(images, 0.0, 1.0, out=images)
    return images[:, None], labels.astype(np.int64)
