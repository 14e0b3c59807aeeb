"""What the training-framework callbacks share: their options, the framework's GradScaler
handed to instrument, the metrics as flat log entries, and the monitor state files.

Owns no model and no training loop: it reads the options a callback was given and the
scaler a framework made, and writes or reads one monitor state file at a time.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .. import distributed
from .. import options as options_
from ..monitor import Monitor, instrument

LOG_PREFIX = "lrfluct"


class MonitorHolder:
    """What every callback holds: the checked instrument() options, `keep`, and the Monitor
    once the model is instrumented (`monitor`; None before)."""

    def __init__(self, keep: bool, options: dict[str, Any]):
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be True or False, got {keep!r}")
        self.options = check_options(options)
        self.keep = keep
        self.monitor: Monitor | None = None

    def _live(self) -> bool:
        return self.monitor is not None and not self.monitor._removed


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The instrument() options a callback was given, checked now (an unknown one raises a
    TypeError naming it) and returned as given: instrument checks them again when it runs."""
    options_.check(dict(options))
    return dict(options)


def instrument_with_scaler(model: torch.nn.Module, options: dict[str, Any], scaler) -> Monitor:
    """instrument(model, **options), with the framework's GradScaler (None without one) as the
    grad_scaler option: gradient statistics in unscaled units, and those of a step the scaler
    skipped (an inf or nan gradient) dropped. A grad_scaler option of another scaler is refused."""
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        scaler = None
    given = options.get("grad_scaler")
    if scaler is not None and given is not None and given is not scaler:
        raise ValueError("grad_scaler must be the training framework's own GradScaler (or left "
                         f"out: the callback passes it), got another one: {options_.describe(given)}")
    if scaler is not None:
        options = {**options, "grad_scaler": scaler}
    return instrument(model, **options)


def log_entries(monitor: Monitor) -> dict[str, float]:
    """{"lrfluct/{layer}/{metric}": value} of monitor.metrics() (a collective under a process
    group: every rank calls it at the same steps)."""
    return {f"{LOG_PREFIX}/{layer}/{name}": value
            for layer, values in monitor.metrics().items() for name, value in values.items()}


def state_file_name() -> str:
    """This rank's monitor state file in a checkpoint: each rank's activation and gradient
    statistics are its own (distributed.py), so every rank of a multi-process run keeps one."""
    if distributed.world_size() > 1:
        return f"lrfluct_monitor_rank{distributed.rank()}.pt"
    return "lrfluct_monitor.pt"


def save_state(monitor: Monitor, folder: str) -> str:
    """monitor.state_dict() into `folder` (written under a temp name, then renamed: a killed
    save leaves no partial file); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, state_file_name())
    tmp = path + ".tmp"
    torch.save(monitor.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str) -> dict[str, Any]:
    """A state file of save_state, on the CPU (load_state_dict copies it to the statistics' device)."""
    return torch.load(path, map_location="cpu", weights_only=True)
