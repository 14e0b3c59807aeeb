"""observe: a wrapped layer's Observe (nn/observe.py) as one op with its own C++ autograd.

    observe(z, dim, act_counts?, act_moments?, grad_counts?, grad_moments?, live) -> z

The identity on z. Its forward computes the batch statistics of z viewed as [rows, neurons]
(neurons: dim `dim`); its backward, while the 0-d bool CPU tensor `live` is true, merges them
and the statistics of dL/dz into the given running state (an absent pair: not tracked). The
kernel is C++ only (csrc/observe.cpp): it exists to keep Python out of a layer's fixed cost
per step, so there is no other backend; without the extension nn/observe.py's Python function
does the same. Eager mode only: under torch.compile the Python function is traced instead.
"""
from __future__ import annotations

from ._library import LIB

SCHEMA = ("observe(Tensor z, int dim, Tensor? act_counts, Tensor? act_moments, "
          "Tensor? grad_counts, Tensor? grad_moments, Tensor live) -> Tensor")

LIB.define(SCHEMA)
