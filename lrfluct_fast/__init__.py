"""lrfluct_fast: streaming per-neuron fluctuation statistics for PyTorch training.

    mon = lrfluct_fast.instrument(model)     # wraps Linear/Conv layers in place
    ... loss.backward(); opt.step(); mon.step()
    mon.summary(); mon.metrics(); mon.remove()
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from ._backend import backend
from .monitor import Monitor, instrument

__all__ = ["__version__", "Monitor", "backend", "instrument", "ops"]
