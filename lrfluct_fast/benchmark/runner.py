"""The interleaved overhead runner: one process, every mode, round-robin steps.

Modes: none (no monitoring), lrfluct (lf.instrument: activations + gradients + weights every
step), hook-streaming and hook-snapshot (lrfluct_fast.baselines). Each mode trains its own
copy of the same seeded workload; after warm-up, step i of every mode runs back to back (the
order rotated each round) so drift in the machine's speed hits all modes alike. Reported per
mode: median step time and its spread, overhead against none, monitor memory and its growth
per step. The snapshot's memory grows without bound; past `snapshot_budget` bytes it is
reset (its growth per step is measured before that), so a long run stays within memory.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import baselines
from ..monitor import instrument
from .models import Workload

MODES = ("none", "lrfluct", "hook-streaming", "hook-snapshot")


def attach(mode: str, model):
    if mode == "none":
        return None
    if mode == "lrfluct":
        return instrument(model)
    return {"hook-streaming": baselines.HookStreaming,
            "hook-snapshot": baselines.HookSnapshot}[mode](model)


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


def run(make_workload, device, modes=MODES, steps=20, warmup=3, progress=None,
        snapshot_budget=4 << 30) -> dict[str, ModeResult]:
    """make_workload(device) -> Workload; returns {mode: ModeResult}."""
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        w: Workload = make_workload(device)
        runs[mode] = (w, attach(mode, w.model))
    results = {mode: ModeResult() for mode in modes}

    def step(mode):
        w, monitor = runs[mode]
        w.optimizer.zero_grad(set_to_none=True)
        w.loss_fn(w.model, w.batch).backward()
        w.optimizer.step()
        if monitor is not None:
            monitor.step()

    for i in range(warmup + steps):
        order = list(modes[i % len(modes):]) + list(modes[:i % len(modes)])
        for mode in order:
            _sync(device)
            t0 = time.perf_counter()
            step(mode)
            _sync(device)
            dt = time.perf_counter() - t0
            monitor = runs[mode][1]
            if i >= warmup:
                results[mode].times.append(dt)
                results[mode].memory.append(monitor_bytes(monitor))
            if mode == "hook-snapshot" and monitor_bytes(monitor) > snapshot_budget:
                monitor.reset()
                results[mode].resets += 1
            if progress:
                progress(mode)
    for _, monitor in runs.values():
        if monitor is not None:
            monitor.remove()
    return results


def overheads(results: dict[str, ModeResult]) -> dict[str, float]:
    base = results["none"].median
    return {mode: r.median / base - 1 for mode, r in results.items()}
