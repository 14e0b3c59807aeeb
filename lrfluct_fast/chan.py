"""Chan's merge of two (count, mean, M2) summaries, in plain arithmetic.

Owns the formula only: it works on numpy arrays and torch tensors alike (float64 operands),
so the host-side summaries (metrics.py) and the ops (ops/temporal_update.py) read the same
two-level temporal state with one definition. It holds no state and imports nothing.
"""
from __future__ import annotations


def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two disjoint sets of observations.

    Empty sides are fine: an empty b leaves a as it is, an empty a gives b, two empty sides
    give (0, mean_a, M2_a + M2_b), without a 0 / 0. delta^2 * n_a n_b / n is formed as
    (delta * (n_a * w)) * delta so an empty a never makes inf * 0 out of a huge delta.
    """
    n = n_a + n_b
    w = n_b / (n + (n == 0))
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * (n_a * w) * delta
