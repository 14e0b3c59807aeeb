"""lrfluct_fast: streaming per-neuron fluctuation statistics for PyTorch training.

    mon = lrfluct_fast.instrument(model)     # wraps Linear/Conv layers in place
    ... loss.backward(); opt.step(); mon.step()
    mon.summary(); mon.metrics(); mon.remove()
    lrfluct_fast.instrument(model, log_dir="runs/a")   # + a crash-safe run directory
    lrfluct_fast.load_run("runs/a")                     # metrics and summaries back
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from ._backend import backend
from .monitor import Monitor, instrument
from .rundir import load_run

__all__ = ["__version__", "Monitor", "backend", "instrument", "load_run", "ops"]
