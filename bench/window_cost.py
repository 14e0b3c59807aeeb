"""What windows per statistic (lrfluct_fast/windows.py) cost Monitor.step().

    python bench/window_cost.py

On 8 x Linear(256, 256) (524k weights), one thread, medians of interleaved repeats:
- mon.step() without windows, and with windows of every statistic that do not close at
  that step (what a step between two closes pays);
- one close of the four statistics' windows (mon.close_windows() after a step): device
  copies of the per-neuron rows, the merge into the whole-run totals, the zeroing. It is
  O(state): a weight window's close reads its whole per-element state, so its cost per
  step is this divided by the window's length.
Prints a markdown table.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import lrfluct_fast as lf

ALL = ("activation", "gradient", "weight", "bias")


def _monitor(windows):
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    mon = lf.instrument(net, windows=windows)
    net(torch.randn(4, 256)).square().mean().backward()
    mon.step()
    return mon


def _step(mon, calls=100):
    t = time.perf_counter()
    for _ in range(calls):
        mon.step()
    return (time.perf_counter() - t) / calls


def _close(mon):
    mon.step()
    t = time.perf_counter()
    mon.close_windows()
    elapsed = time.perf_counter() - t
    mon.closed_windows()  # the rows a user would read
    return elapsed


def main(repeats=9) -> None:
    torch.set_num_threads(1)
    plain = _monitor(None)
    windowed = _monitor(dict.fromkeys(ALL, 10 ** 9))  # never closes by itself
    times = {"plain": [], "windowed": [], "close": []}
    for _ in range(repeats):
        times["plain"].append(_step(plain))
        times["windowed"].append(_step(windowed))
        times["close"].append(_close(windowed))
    p, w, c = (statistics.median(times[k]) for k in ("plain", "windowed", "close"))
    weights = sum(st.buffers["weight.skipped"].numel() for st in windowed.states.values())
    print(f"backend {lf.backend('cpu')}, torch {torch.__version__}, one thread\n")
    print("| 8 x Linear(256, 256) | time |")
    print("|---|---|")
    print(f"| mon.step(), no windows | {p * 1e6:.0f} us |")
    print(f"| mon.step(), windows of every statistic, none closing | {w * 1e6:.0f} us |")
    print(f"| closing the four windows | {c * 1e3:.1f} ms ({c / weights * 1e9:.0f} ns per weight) |")


if __name__ == "__main__":
    main()
