"""The observation kernels at the paper autoencoder's shapes: what one training step spends in
them, on one thread.

Per step, each of the six layers runs `batch_stats` on its output in the forward and
`accumulate_stats` on its output gradient (with the forward's pending batch merged) in the
backward: the work of the C++ observation path, here through the dispatched ops. Timed as
CPU time of this thread (steadier than wall time on a shared VM); each figure is the median of
`repeats` and a run prints one line. Compare builds by alternating processes:

    PYTHONPATH=. python bench/observe_cost.py
"""
from __future__ import annotations

import statistics
import time

import torch

import lrfluct_fast  # noqa: F401  registers torch.ops.lrfluct

WIDTHS = (256, 64, 16, 64, 256, 1024)  # the autoencoder's layers, encoder then decoder
BATCH = 64


def per_step_us(repeats=7, steps=500) -> float:
    ops = torch.ops.lrfluct
    g = torch.Generator().manual_seed(0)
    layers = []
    for n in WIDTHS:
        state = [torch.zeros(3, n, dtype=torch.long), torch.zeros(3, n, dtype=torch.double)]
        into = [torch.zeros(3, n, dtype=torch.long), torch.zeros(3, n, dtype=torch.double)]
        layers.append((torch.randn(BATCH, n, generator=g), 1e-3 * torch.randn(BATCH, n, generator=g),
                       state, into))

    def step():
        for z, dz, state, into in layers:
            pending = ops.batch_stats(z)
            ops.accumulate_stats(dz, *state, *pending, *into)

    def timed():
        for _ in range(steps // 10):
            step()
        t = time.thread_time()
        for _ in range(steps):
            step()
        return (time.thread_time() - t) / steps * 1e6

    return statistics.median(timed() for _ in range(repeats))


def main() -> None:
    torch.set_num_threads(1)
    print(f"observation kernels, autoencoder shapes, batch {BATCH}: {per_step_us():.1f} us per step")


if __name__ == "__main__":
    main()
