"""Host cost of monitoring, per layer and per parameter tensor, on tiny tensors (no data cost).

    python bench/host_cost.py

- fixed cost per layer: 8 x Linear(16, 16) at batch 4, one thread (and once more with every
  core: a kernel that opened an OpenMP region for such tiny work waited milliseconds for a
  core another process held); the instrumented training step's time minus the plain twin's,
  over 8 layers (forward + backward + its share of Monitor.step), medians of interleaved
  repeats; split by phase twice: each part alone in a warm loop of its own, and each phase
  timed inside the whole step (where it pays for what the phase before it evicted);
- Monitor.step per parameter tensor: GPT-2-medium's parameter list (24 blocks: 2 LayerNorms,
  qkv, proj, fc1, fc2 with biases; embeddings, final LayerNorm, head) at width 8, so the
  update itself moves next to nothing;
- the Triton temporal_update launch path on GPT-2-medium's real parameter shapes (355M
  elements, CPU tensors), its two kernels stubbed out: the host work a GPU step would pay
  (argument checks, task tables), without a GPU;
- the Triton statistics launch path of one layer per step (forward batch_stats, backward
  accumulate_stats), its kernels stubbed out.
Prints a markdown table; every number is measured in this run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
from torch import nn

import lrfluct_fast as lf


def per_call(fn, calls):
    """Seconds per call of fn() over `calls` calls, after calls / 10 to warm up."""
    for _ in range(calls // 10):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def _step_time(model, mon, x, steps):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        if mon is not None:
            mon.step()
    return per_call(step, steps)


def _tiny_mlp(layers):
    """`layers` x Linear(16, 16), the same weights each call: the fixed-cost workload."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])


def fixed_cost_per_layer(layers=8, repeats=7, steps=1000):
    x = torch.randn(4, 16)
    plain, wrapped = _tiny_mlp(layers), _tiny_mlp(layers)
    mon = lf.instrument(wrapped)
    times = {"plain": [], "instrumented": []}
    for _ in range(repeats):
        times["plain"].append(_step_time(plain, None, x, steps))
        times["instrumented"].append(_step_time(wrapped, mon, x, steps))
    p, i = (statistics.median(times[k]) for k in ("plain", "instrumented"))
    return p, i, (i - p) / layers


def fixed_cost_breakdown(layers=8, repeats=7, calls=2000):
    """Per layer: (forward, forward + backward, Monitor.step) over the plain twin, in seconds,
    of 8 x Linear(16, 16) at batch 4 (the forward and backward with weights and biases off,
    so no step work hides in them)."""
    x = torch.randn(4, 16, requires_grad=True)
    plain, light, full = _tiny_mlp(layers), _tiny_mlp(layers), _tiny_mlp(layers)
    lf.instrument(light, weights=False, biases=False)
    mon = lf.instrument(full)
    cases = {"fwd plain": lambda: plain(x), "fwd": lambda: light(x),
             "fb plain": lambda: plain(x).sum().backward(), "fb": lambda: light(x).sum().backward(),
             "step": mon.step}
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(per_call(fn, calls))
    m = {k: statistics.median(v) for k, v in times.items()}
    return ((m["fwd"] - m["fwd plain"]) / layers, (m["fb"] - m["fb plain"]) / layers,
            m["step"] / layers)


def step_phases(layers=8, repeats=7, steps=1000):
    """Per layer: (forward, backward, optimizer step, Monitor.step) of the whole instrumented
    step minus the plain twin's, each phase timed inside the step loop (so a phase pays for
    what the one before it evicted from the caches), in seconds."""
    x = torch.randn(4, 16)
    plain, wrapped = _tiny_mlp(layers), _tiny_mlp(layers)
    runs = {"plain": (plain, None), "instrumented": (wrapped, lf.instrument(wrapped))}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, (m, _) in runs.items()}
    clock = time.perf_counter
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (model, mon) in runs.items():
            total = [0.0] * 4
            for i in range(steps + steps // 10):
                t0 = clock()
                opts[k].zero_grad(set_to_none=True)
                loss = model(x).square().mean()
                t1 = clock()
                loss.backward()
                t2 = clock()
                opts[k].step()
                t3 = clock()
                if mon is not None:
                    mon.step()
                t4 = clock()
                if i >= steps // 10:
                    for j, d in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        total[j] += d / steps
            times[k].append(total)
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in times.items()}
    return tuple((a - b) / layers for a, b in zip(med["instrumented"], med["plain"]))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


def gpt2_medium_like(d=8, blocks=24):
    model = nn.Module()
    model.tok, model.pos = nn.Embedding(64, d), nn.Embedding(32, d)
    model.blocks = nn.ModuleList(_Block(d) for _ in range(blocks))
    model.ln, model.head = nn.LayerNorm(d), nn.Linear(d, 64, bias=False)
    return model


def step_cost_per_tensor(repeats=7, calls=200):
    model = gpt2_medium_like()
    mon = lf.instrument(model)
    tensors = sum(1 for _ in model.parameters())
    times = []
    for _ in range(repeats):
        for _ in range(calls // 10):
            mon.step()
        t = time.perf_counter()
        for _ in range(calls):
            mon.step()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times), tensors


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _stubbed(module, *kernels):
    """The named Triton kernels of `module` launch nothing inside the block."""
    saved = [getattr(module, k) for k in kernels]
    for k in kernels:
        setattr(module, k, _NoLaunch())
    try:
        yield
    finally:
        for k, fn in zip(kernels, saved):
            setattr(module, k, fn)


def triton_launch_cost(repeats=20):
    """(first call, later calls) host seconds of ops.temporal_update_triton, kernels stubbed."""
    tu = importlib.import_module("lrfluct_fast.ops.temporal_update")
    if tu.triton is None:
        return None
    with _stubbed(tu, "_temporal_update_kernel", "_count_call_kernel"):
        d, shapes = 1024, [(50257, 1024), (1024, 1024), (1024,), (1024,)]
        for _ in range(24):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
                       (4 * d,), (d, 4 * d), (d,)]
        values = [torch.empty(s) for s in shapes]
        state = [list(x) for x in zip(*(tu.new_state(v) for v in values))]
        t = time.perf_counter()
        tu.temporal_update_triton(values, *state)
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            tu.temporal_update_triton(values, *state)
            times.append(time.perf_counter() - t)
        return first, statistics.median(times), len(values)


def triton_layer_cost(repeats=200):
    """Host seconds of one layer's Triton statistics per step, kernels stubbed: the forward's
    batch_stats and the backward's accumulate_stats (with the pending batch), on a [4096, 1024]
    output (the sizes do not matter: nothing is read)."""
    bs = importlib.import_module("lrfluct_fast.ops.batch_stats")
    acc = importlib.import_module("lrfluct_fast.ops.accumulate_stats")
    if bs.triton is None:
        return None
    with _stubbed(bs, "_batch_stats_chunk_kernel", "_batch_stats_combine_kernel"):
        z = torch.empty(4096, 1024)
        act = torch.zeros(3, 1024, dtype=torch.int64), torch.zeros(3, 1024, dtype=torch.float64)
        grad = torch.zeros(3, 1024, dtype=torch.int64), torch.zeros(3, 1024, dtype=torch.float64)

        def layer_step():
            pending = bs.batch_stats_triton(z)
            acc.accumulate_stats_triton(z, *grad, *pending, *act)
        for _ in range(repeats // 10):
            layer_step()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            layer_step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def main() -> None:
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    _, i_all, per_layer_all = fixed_cost_per_layer()
    torch.set_num_threads(1)
    p, i, per_layer = fixed_cost_per_layer()
    step, tensors = step_cost_per_tensor()
    print(f"backend {lf.backend('cpu')}, torch {torch.__version__}, one thread\n")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| 8 x Linear(16, 16), batch 4: plain step | {p * 1e6:.1f} us |")
    print(f"| same, instrumented | {i * 1e6:.1f} us |")
    print(f"| fixed cost per monitored layer per step | {per_layer * 1e6:.1f} us |")
    fwd, fwd_bwd, step_share = fixed_cost_breakdown()
    print(f"| of which: forward / forward + backward (weights off) / Monitor.step, per layer | "
          f"{fwd * 1e6:.1f} / {fwd_bwd * 1e6:.1f} / {step_share * 1e6:.1f} us |")
    phases = step_phases()
    print("| the same fixed cost, phase by phase inside the step: forward / backward / optimizer "
          "step / Monitor.step, per layer | " + " / ".join(f"{t * 1e6:.1f}" for t in phases) + " us |")
    print(f"| same with {cores} threads (torch's default): instrumented step, fixed cost per layer "
          f"| {i_all * 1e6:.1f} us, {per_layer_all * 1e6:.1f} us |")
    print(f"| Monitor.step, GPT-2-medium's {tensors} parameter tensors at width 8 | {step * 1e6:.0f} us |")
    print(f"| Monitor.step per parameter tensor | {step / tensors * 1e6:.2f} us |")
    launch = triton_launch_cost()
    if launch is None:
        print("| Triton launch path | skipped: triton not installed |")
    else:
        first, later, n = launch
        print(f"| Triton temporal_update launch path, GPT-2-medium's {n} tensors: first call | "
              f"{first * 1e3:.1f} ms |")
        print(f"| same, later calls (per tensor) | {later * 1e6:.0f} us ({later / n * 1e6:.2f} us) |")
        layer = triton_layer_cost()
        print(f"| Triton statistics launch path per layer per step (forward batch_stats + "
              f"backward accumulate_stats, 4 launches, stubbed) | {layer * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
