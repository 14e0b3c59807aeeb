"""lrfluct_fast: streaming per-neuron fluctuation statistics for PyTorch training.

Public API (see DESIGN): backend(), the ops in `lrfluct_fast.ops`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from ._backend import backend

__all__ = ["__version__", "backend", "ops"]
