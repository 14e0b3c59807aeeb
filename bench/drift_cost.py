"""What drift=True (weight.drift, weight.update_size; lrfluct_fast/drift.py) costs.

    python bench/drift_cost.py [--repeats 9] [--steps 20] [--threads 2]

On the paper's autoencoder (`lrfluct bench --model autoencoder`: MLP, 32x32 images, batch 64,
Adam), three copies of the same model in one process, timed in interleaved rounds (the order
rotated each round, so a change of the machine's speed hits all alike), medians over rounds:
- a whole training step: plain, instrument(model), instrument(model, drift=True);
- mon.step() alone, without and with drift (the per-step pass itself);
- mon.memory_bytes() of both monitors.
The drift cost is reported against the plain training step. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lrfluct_fast as lf
from lrfluct_fast.benchmark.models import autoencoder


def _workload(options):
    """(workload, its monitor or None when `options` is None)."""
    torch.manual_seed(0)
    w = autoencoder("cpu")
    return w, None if options is None else lf.instrument(w.model, **options)


def _train_time(w, mon, steps):
    def step():
        w.optimizer.zero_grad(set_to_none=True)
        w.loss_fn(w.model, w.batch).backward()
        w.optimizer.step()
        if mon is not None:
            mon.step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def _monitor_step_time(mon, calls):
    t = time.perf_counter()
    for _ in range(calls):
        mon.step()
    return (time.perf_counter() - t) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=20, help="training steps per timing")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"plain": _workload(None), "lrfluct": _workload({}),
            "lrfluct drift=True": _workload({"drift": True})}
    train = {k: [] for k in runs}
    step = {k: [] for k in runs if k != "plain"}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:
            w, mon = runs[name]
            train[name].append(_train_time(w, mon, args.steps))
            if mon is not None:
                step[name].append(_monitor_step_time(mon, 5 * args.steps))
    med = {k: statistics.median(v) for k, v in train.items()}
    med_step = {k: statistics.median(v) for k, v in step.items()}
    plain = med["plain"]
    extra = med_step["lrfluct drift=True"] - med_step["lrfluct"]
    print(f"autoencoder, {args.threads} threads, {args.repeats} interleaved rounds of "
          f"{args.steps} steps, medians\n")
    print("| mode | training step ms | vs plain | mon.step() ms | monitor MB |")
    print("|---|---|---|---|---|")
    for name, (w, mon) in runs.items():
        ms = f"{1e3 * med_step[name]:.3f}" if name in med_step else "-"
        mb = f"{mon.memory_bytes() / 2 ** 20:.2f}" if mon is not None else "-"
        print(f"| {name} | {1e3 * med[name]:.3f} | {100 * (med[name] / plain - 1):+.1f}% | {ms} | {mb} |")
    weights = sum(st.buffers["drift.first"].numel() for st in runs["lrfluct drift=True"][1].states.values()
                  if "drift.first" in st.buffers)
    print(f"\ndrift's extra mon.step(): {1e3 * extra:.3f} ms = {100 * extra / plain:.1f}% of the plain "
          f"training step ({weights:,} weights)")


if __name__ == "__main__":
    main()
