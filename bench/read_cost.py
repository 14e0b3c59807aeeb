"""What consistent reads (lrfluct_fast/reads.py) cost the training thread's Monitor.step().

    python bench/read_cost.py

- mon.step() per call with no read pending, on 8 x Linear(16, 16) (a step that does
  almost nothing else, so the check is as visible as it can be): medians of interleaved
  repeats. Run it on two checkouts to compare with a Monitor without the check.
- the statements a step runs for the check alone (record the training thread, look at
  the pending request), timed on their own;
- a step that serves a pending read (another thread waiting): the host copy of every
  statistics buffer, for a Linear(1024, 1024) (element mode: 40 bytes per weight).
Prints a markdown table; every number is measured in this run.
"""
from __future__ import annotations

import statistics
import threading
import time
import timeit

import torch
from torch import nn

import lrfluct_fast as lf
from host_cost import per_call


def step_alone(repeats=9, calls=5000):
    torch.manual_seed(0)
    mon = lf.instrument(nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)]))
    return statistics.median(per_call(mon.step, calls) for _ in range(repeats)), mon


def check_alone(mon, repeats=9, number=200000):
    get_ident = threading.get_ident

    def check():
        reads = mon._reads
        reads.training_thread = get_ident()
        if reads.pending is not None:
            pass
    return statistics.median(timeit.timeit(check, number=number) / number for _ in range(repeats))


def serving_step(repeats=5):
    torch.manual_seed(0)
    mon = lf.instrument(nn.Linear(1024, 1024))
    plain, served = [], []
    while len(served) < repeats:
        plain.append(per_call(mon.step, 20))
        done, serving = threading.Event(), []

        def train():  # steps while a reader asks; a step that finds the request serves it
            while not done.is_set():
                pending = mon._reads.pending is not None
                t = time.perf_counter()
                mon.step()
                if pending:
                    serving.append(time.perf_counter() - t)
        trainer = threading.Thread(target=train)
        trainer.start()
        time.sleep(0.02)  # the trainer has stepped: it is the training thread
        mon.summary(timeout=10)
        done.set()
        trainer.join()
        served += serving[:1]  # none when the request came just after the check
    return statistics.median(plain), statistics.median(served)


def main() -> None:
    torch.set_num_threads(1)
    step, mon = step_alone()
    check = check_alone(mon)
    plain, served = serving_step()
    print(f"backend {lf.backend('cpu')}, torch {torch.__version__}, one thread\n")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| mon.step(), 8 x Linear(16, 16), no read pending | {step * 1e6:.2f} us |")
    print(f"| of which the consistent-read check | {check * 1e9:.0f} ns |")
    print(f"| mon.step(), Linear(1024, 1024), no read pending | {plain * 1e6:.0f} us |")
    print(f"| the step that serves a read from another thread | {served * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
