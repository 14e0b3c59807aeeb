"""The interleaved overhead runner: one process, every mode, round-robin steps.

Modes: none (no monitoring), lrfluct (lf.instrument: activations + gradients + weights every
step), hook-streaming and hook-snapshot (lrfluct_fast.baselines), and, when the package
backpack-for-pytorch is installed, backpack (its Variance extension: per-parameter variance of
the per-sample gradients, an outside peer that also instruments every layer). On request, lrfluct
with other options (LRFLUCT_VARIANTS), to split lrfluct's cost, and none-twin: a second plain
copy of the model, whose overhead against none is what two identical models differ by on this
machine (the noise floor an overhead is read against). Each mode trains its own
copy of the same seeded workload; after warm-up, the modes take turns (the order rotated each
round) so drift in the machine's speed hits all modes alike. A turn is one step by default, so
every step starts with caches that the other modes' models evicted; with `run_length` K > 1 a
turn is K steps and its first is untimed, so the timed steps see the caches a training run that
monitors one model sees (the paper's autoencoder: medians of +9.7% one step per turn and
+10.0% in turns of 10, with the twin within -2.5 to +1.7%; bench/RESULTS.md). Reported per
mode: median step time and its spread, overhead against none (paired by round), monitor
memory and its growth per step. The snapshot's memory grows without bound; past `snapshot_budget` bytes it is
reset (its growth per step is measured before that), so a long run stays within memory.
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import baselines
from ..monitor import instrument
from .models import Workload

MODES = ("none", "lrfluct", "hook-streaming", "hook-snapshot")
PLAIN_TWIN = "none-twin"  # a second unmonitored copy: the measurement's own noise against none
# lrfluct with other options: run only when asked for by name, to split lrfluct's cost.
LRFLUCT_VARIANTS = {
    "lrfluct": {},
    "lrfluct-neuron": {"weight_mode": "neuron"},                  # O(neurons) weight statistics
    "lrfluct-no-weights": {"weights": False, "biases": False},    # activations + gradients only
    "lrfluct-activations": {"weights": False, "biases": False, "gradients": False},
    "lrfluct-gradients": {"weights": False, "biases": False, "activations": False},
    "lrfluct-weights": {"activations": False, "gradients": False},  # weights + biases only
    "lrfluct-drift": {"drift": True},                             # + weight.drift, weight.update_size
}


def available_modes() -> tuple[str, ...]:
    """The modes a run without --modes measures."""
    return MODES + (("backpack",) if importlib.util.find_spec("backpack") else ())


def known_modes() -> tuple[str, ...]:
    """Every mode --modes accepts."""
    return available_modes() + tuple(m for m in LRFLUCT_VARIANTS if m not in MODES) + (PLAIN_TWIN,)


def report_modes() -> tuple[str, ...]:
    """The modes `lrfluct bench` measures without --modes: the available ones with the plain
    twin next to none, so every report carries its own noise floor."""
    return ("none", PLAIN_TWIN) + tuple(m for m in available_modes() if m != "none")


def attach(mode: str, model):
    """Returns (monitor or None, a context manager factory the step runs in)."""
    if mode in ("none", PLAIN_TWIN):
        return None, contextlib.nullcontext
    if mode in LRFLUCT_VARIANTS:
        return instrument(model, **LRFLUCT_VARIANTS[mode]), contextlib.nullcontext
    if mode == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import Variance
        warnings.filterwarnings("ignore", module="backpack")  # per-step notes on unextended modules
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        extend(model)
        return None, lambda: backpack(Variance())
    return {"hook-streaming": baselines.HookStreaming,
            "hook-snapshot": baselines.HookSnapshot}[mode](model), contextlib.nullcontext


def train_step(w: Workload, monitor=None, context=contextlib.nullcontext) -> None:
    """One optimizer step of a workload, then the monitor's step."""
    w.optimizer.zero_grad(set_to_none=True)
    with context():
        w.loss_fn(w.model, w.batch).backward()
    w.optimizer.step()
    if monitor is not None:
        monitor.step()


def monitor_bytes(monitor) -> int:
    return 0 if monitor is None else monitor.memory_bytes()


@dataclass
class ModeResult:
    times: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # monitor bytes after each timed step
    resets: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]

    def growth_per_step(self) -> float:
        m = self.memory
        return (m[-1] - m[0]) / (len(m) - 1) if len(m) > 1 and not self.resets else float("nan")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def untimed_per_turn(run_length: int) -> int:
    """A turn of K > 1 steps leaves its first untimed: it refills the caches."""
    return 1 if run_length > 1 else 0


def turns_for(steps: int, run_length: int = 1) -> int:
    """Turns per mode that give `steps` timed steps."""
    return -(-steps // (run_length - untimed_per_turn(run_length)))


def run(make_workload, device, modes=MODES, steps=20, warmup=3, progress=None,
        snapshot_budget=4 << 30, run_length=1) -> dict[str, ModeResult]:
    """make_workload(device) -> Workload; returns {mode: ModeResult}: `steps` timed steps per
    mode after `warmup` untimed rounds, in turns of `run_length` steps per mode."""
    if run_length < 1:
        raise ValueError(f"run_length must be >= 1, got {run_length}")
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        w: Workload = make_workload(device)
        runs[mode] = (w, attach(mode, w.model))
    results = {mode: ModeResult() for mode in modes}
    settle = untimed_per_turn(run_length)

    def one_step(mode, timed):
        w, (monitor, context) = runs[mode]
        _sync(device)
        t0 = time.perf_counter()
        train_step(w, monitor, context)
        _sync(device)
        dt = time.perf_counter() - t0
        if timed:
            results[mode].times.append(dt)
            results[mode].memory.append(monitor_bytes(monitor))
        if mode == "hook-snapshot" and monitor_bytes(monitor) > snapshot_budget:
            monitor.reset()
            results[mode].resets += 1
        if progress:
            progress(mode)

    turns = turns_for(steps, run_length)
    for i in range(warmup + turns):
        order = list(modes[i % len(modes):]) + list(modes[:i % len(modes)])
        length = 1 if i < warmup else run_length
        for mode in order:
            for k in range(length):
                one_step(mode, i >= warmup and k >= settle and len(results[mode].times) < steps)
    for _, (monitor, _) in runs.values():
        if monitor is not None:
            monitor.remove()
    return results


def memory_curve(make_workload, device, mode: str, steps: int, every: int,
                 budget: int = 1 << 30) -> list[tuple[int, int]]:
    """(step, monitor bytes) every `every` steps; stops early past `budget` bytes."""
    torch.manual_seed(0)
    w = make_workload(device)
    monitor, context = attach(mode, w.model)
    curve = [(0, monitor_bytes(monitor))]
    for i in range(1, steps + 1):
        train_step(w, monitor, context)
        if i % every == 0 or i == steps:
            curve.append((i, monitor_bytes(monitor)))
            if curve[-1][1] > budget:
                break
    if monitor is not None:
        monitor.remove()
    return curve


def agreement(make_workload, device, steps: int = 2) -> tuple[float, str]:
    """Max relative difference over every summary key between lrfluct and hook-streaming,
    and the key where it is: the check that both modes compute the same statistics. Both
    monitor one model on one trajectory (the hooks sit on the wrapped layers), since two
    separate runs round their float32 weights differently and would test that instead."""
    torch.manual_seed(0)
    w = make_workload(device)
    ours, _ = attach("lrfluct", w.model)
    theirs, _ = attach("hook-streaming", w.model)
    for _ in range(steps):
        train_step(w, ours)
        theirs.step()
    summaries = [ours.summary(), theirs.summary()]
    theirs.remove()
    ours.remove()
    worst, where = 0.0, ""
    ours, theirs = summaries
    for layer, keys in ours.items():
        for key, a in keys.items():
            a, b = np.asarray(a, np.float64), np.asarray(theirs[layer][key], np.float64)
            scale = np.nanmax(np.abs(b)) if b.size and np.isfinite(b).any() else 1.0
            diff = np.abs(a - b)[np.isfinite(a - b)]
            if diff.size and diff.max() / (scale or 1.0) > worst:
                worst, where = float(diff.max() / (scale or 1.0)), f"{layer} {key}"
    return worst, where


def overheads(results: dict[str, ModeResult]) -> dict[str, float]:
    """Per mode: the median over rounds of (its step time / none's in the same round) - 1.

    Pairing the steps of one round cancels the machine's drift, which on a shared VM moves
    whole rounds by more than the overhead being measured.
    """
    base = results["none"].times
    return {mode: statistics.median(t / b for t, b in zip(r.times, base)) - 1
            for mode, r in results.items()}
