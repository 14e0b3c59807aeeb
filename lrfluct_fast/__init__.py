"""lrfluct_fast: streaming per-neuron fluctuation statistics for PyTorch training.

    mon = lrfluct_fast.instrument(model)     # wraps every layer of a registered kind in place
    lrfluct_fast.register_layer(MyLayer, neuron_dim=-1)  # a kind of your own
    ... loss.backward(); opt.step(); mon.step()
    mon.summary(); mon.metrics(); mon.remove()
    lrfluct_fast.instrument(model, log_dir="runs/a")   # + a crash-safe run directory
    lrfluct_fast.load_run("runs/a")                     # metrics and summaries back
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from ._backend import backend
from .layers import register_layer, unregister_layer
from .monitor import Monitor, instrument
from .rundir import load_run

__all__ = ["__version__", "Monitor", "backend", "instrument", "load_run", "ops", "register_layer",
           "unregister_layer"]
