"""The options of instrument(): their defaults and the check of each one's type and range.

Owns the option names, their defaults and what each accepts (monitor.py documents what
they mean). `check` refuses a bad option before anything is built or touched, with an error
naming the option, what it accepts and what it got: TypeError for a value of the wrong
type, ValueError for one out of range. It touches no model and no file.
"""
from __future__ import annotations

import numbers
import os
from typing import Any

import torch

from . import distributed, metrics, rundir, windows

DEFAULTS = dict(activations=True, gradients=True, weights=True, biases=True, every=1,
                weight_mode="element", dead_threshold=0.01, energy="weight",
                log_dir=None, log_every=100, summary_every=1000, tensorboard=False,
                log_errors="warn", grad_scaler=None, windows=None, overlap_weights=False,
                drift=False)

WEIGHT_MODES = ("element", "neuron")
# options that may differ between a saved state (or a run directory) and the monitor resuming
# it: the statistics they add start at the resume (drift.py)
FREE_AT_RESUME = ("drift",)
LOG_ERRORS = ("warn", "raise")


def describe(value) -> str:
    """A bad value as an error message shows it: its repr and its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _refuse(what: str, allowed: str, value, *, wrong_type: bool):
    error = TypeError if wrong_type else ValueError
    raise error(f"{what} must be {allowed}, got {describe(value)}")


def check_flag(what: str, value) -> None:
    if not isinstance(value, bool):
        _refuse(what, "True or False", value, wrong_type=True)


def check_count(what: str, value, minimum: int = 1) -> None:
    """An int (not a bool) >= minimum."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        _refuse(what, f"an integer >= {minimum}", value, wrong_type=True)
    if value < minimum:
        _refuse(what, f"an integer >= {minimum}", value, wrong_type=False)


def check_choice(what: str, value, choices) -> None:
    allowed = "one of " + ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        _refuse(what, allowed, value, wrong_type=True)
    if value not in choices:
        _refuse(what, allowed, value, wrong_type=False)


def check_fraction(what: str, value) -> None:
    """A real number in [0, 1] (not a bool, not nan)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _refuse(what, "a number in [0, 1]", value, wrong_type=True)
    if not (0 <= value <= 1):  # nan fails too
        _refuse(what, "a number in [0, 1]", value, wrong_type=False)


def check_seconds(what: str, value) -> None:
    """A real number of seconds >= 0 (not a bool, not nan)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _refuse(what, "a number of seconds >= 0 or None", value, wrong_type=True)
    if not value >= 0:
        _refuse(what, "a number of seconds >= 0 or None", value, wrong_type=False)


def check_log_dir(value) -> None:
    allowed = "None or the path of a directory (str or os.PathLike)"
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        _refuse("log_dir", allowed, value, wrong_type=True)
    path = os.fspath(value)
    if not isinstance(path, str):
        _refuse("log_dir", "a text path (str), not bytes", value, wrong_type=True)
    if path.strip() == "":
        _refuse("log_dir", allowed + ", not empty", value, wrong_type=False)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"log_dir must be a directory, but {path} is a file")


def check(options: dict[str, Any]) -> dict[str, Any]:
    """Every option of instrument() checked; returns them with the defaults filled in."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"instrument() got unknown options {sorted(unknown)}; "
                        f"known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    for key in ("activations", "gradients", "weights", "biases", "tensorboard", "overlap_weights",
                "drift"):
        check_flag(key, opts[key])
    if opts["drift"] and not opts["weights"]:
        raise ValueError("drift=True measures the weights: it needs weights=True")
    for key in ("every", "log_every", "summary_every"):
        check_count(key, opts[key])
        opts[key] = int(opts[key])  # a numpy integer too; saved in run.json: a plain int
    check_choice("weight_mode", opts["weight_mode"], WEIGHT_MODES)
    check_choice("energy", opts["energy"], sorted(metrics.ENERGIES))
    check_choice("log_errors", opts["log_errors"], LOG_ERRORS)
    check_fraction("dead_threshold", opts["dead_threshold"])
    opts["dead_threshold"] = float(opts["dead_threshold"])  # saved with the state: a plain float
    check_log_dir(opts["log_dir"])
    opts["windows"] = windows.check_option(opts["windows"], distributed.world_size()) or None
    scaler = opts["grad_scaler"]
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        _refuse("grad_scaler", "None or a torch.amp.GradScaler", scaler, wrong_type=True)
    if opts["tensorboard"]:
        if opts["log_dir"] is None:
            raise ValueError("tensorboard=True writes into the run directory: pass log_dir too")
        rundir.summary_writer_class()  # ImportError now, not at the first write
    return opts
