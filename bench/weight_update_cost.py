"""The weight update against its bytes: Monitor.step on the paper's autoencoder.

    python bench/weight_update_cost.py [--threads N]

The per-element temporal update moves 24 bytes per float32 weight (reads the value, shift,
mean and M2; writes mean and M2). Its floor is a sweep that moves the same bytes: two in-place
adds over four float32 arrays of as many elements. Measured, medians:
- warm: the update called twice in a row, the second timed; the sweep likewise;
- cold: right after a 64 MiB sweep that evicts the caches;
- in training: Monitor.step right after the Adam step of the autoencoder, against the sweep
  in the same place on alternate steps (the sweep's arrays are as cold as the state);
- the same in weight_mode="neuron", whose step reads each weight once (4 bytes per float32
  weight) for the per-neuron RMS: against a sum over as many float32 values.
Prints a markdown table; every number is measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lrfluct_fast as lf
from lrfluct_fast import ops
from lrfluct_fast.benchmark import models


def _median_us(samples, skip=20):
    return statistics.median(samples[skip:]) * 1e6


def isolated(steps=300):
    """(update warm, sweep warm, update cold, sweep cold) in us, and the element count."""
    w = models.autoencoder("cpu")
    values = [p.detach() for p in w.model.parameters()]
    state = [list(part) for part in zip(*(ops.new_state(v) for v in values))]
    n = sum(v.numel() for v in values)
    a, b, c, d = (torch.randn(n) for _ in range(4))
    evict = torch.zeros(16 << 20)

    def update():
        ops.temporal_update(values, *state)

    def sweep():
        c.add_(a)
        d.add_(b)
    for _ in range(3):
        update()
    times = {k: [] for k in ("update warm", "sweep warm", "update cold", "sweep cold")}
    clock = time.perf_counter
    for _ in range(steps):
        for name, fn in (("update", update), ("sweep", sweep)):
            evict.add_(1.0)
            t0 = clock()
            fn()
            t1 = clock()
            fn()
            t2 = clock()
            times[f"{name} cold"].append(t1 - t0)
            times[f"{name} warm"].append(t2 - t1)
    return {k: _median_us(v) for k, v in times.items()}, n


def in_training(weight_mode="element", steps=600):
    """(Monitor.step, sweep) in us right after the autoencoder's Adam step."""
    torch.manual_seed(0)
    w = models.autoencoder("cpu")
    mon = lf.instrument(w.model, weight_mode=weight_mode)
    n = sum(p.numel() for p in w.model.parameters())
    a, b, c, d = (torch.randn(n) for _ in range(4))

    def sweep():
        if weight_mode == "neuron":
            a.sum()
        else:
            c.add_(a)
            d.add_(b)
    times = {"Monitor.step": [], "sweep": []}
    clock = time.perf_counter
    for i in range(steps):
        w.optimizer.zero_grad(set_to_none=True)
        w.loss_fn(w.model, w.batch).backward()
        w.optimizer.step()
        t0 = clock()
        if i % 2:
            mon.step()
            times["Monitor.step"].append(clock() - t0)
        else:
            sweep()
            times["sweep"].append(clock() - t0)
            mon.step()
    return {k: _median_us(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    iso, n = isolated()
    train = in_training()
    neuron = in_training("neuron")
    mb = 24 * n / 1e6
    print(f"backend {lf.backend('cpu')}, torch {torch.__version__}, {args.threads} thread(s); "
          f"the autoencoder's {n} weights and biases, {mb:.1f} MB moved per update\n")
    print("| where | temporal update | 24-byte sweep (floor) | update / floor |")
    print("|---|---|---|---|")
    for where in ("warm", "cold"):
        u, s = iso[f"update {where}"], iso[f"sweep {where}"]
        print(f"| {where}, alone | {u:.0f} us ({mb / u * 1e3:.0f} GB/s) | {s:.0f} us | {u / s:.2f} |")
    u, s = train["Monitor.step"], train["sweep"]
    print(f"| after the Adam step (Monitor.step) | {u:.0f} us | {s:.0f} us | {u / s:.2f} |")
    u, s = neuron["Monitor.step"], neuron["sweep"]
    print(f"\nweight_mode=\"neuron\": one read of each weight, {4 * n / 1e6:.1f} MB\n")
    print("| where | Monitor.step | 4-byte sum (floor) | step / floor |")
    print("|---|---|---|---|")
    print(f"| after the Adam step | {u:.0f} us ({4 * n / u / 1e3:.0f} GB/s) | {s:.0f} us | {u / s:.2f} |")


if __name__ == "__main__":
    main()
