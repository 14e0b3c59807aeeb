"""Long-run accuracy and per-step cost of the weight/bias temporal statistics (temporal_update).

    python bench/long_run.py --steps 10000000               # soak: errors after 1e7 steps
    python bench/long_run.py --steps 1000000 --checkpoints 10000,100000,1000000
    python bench/long_run.py --cost                         # time per step, 16M float32 elements

The op is called directly (ops.temporal_update, the dispatched kernel: C++ on CPU tensors;
--backend torch for the plain-torch implementation), once per step, on a small float32 tensor
of trajectories that are functions of the step number, so the float64 reference is computed
exactly from the same float32 values, chunk by chunk (two passes, pairwise float64 sums):
- drift: a weight moving linearly from 0 to 1 over the run (and from 0.3 to 1.3, -2 to -1);
- jitter: 0.3 plus 3e-8 x N(0, 1) (1e-7 relative: one or two float32 ulps of 0.3), and 1e4
  plus 1e-3 relative;
- walk: 0.3 plus a random walk of 1e-5 a step.
Prints, at each checkpoint, the worst relative error of the variance and of the mean over the
elements of each kind against float64. --cost times one call on a 16M-element tensor (steady
state, medians of repeats, one thread: this machine's 2 cores are shared) and prints the
bandwidth at the 24 bytes an element the op's docstring states.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import lrfluct_fast  # noqa: F401  registers the kernels
from lrfluct_fast import ops

KINDS = ("drift", "jitter", "walk")
CHUNK = 1 << 16  # steps generated (and referenced) at a time


def trajectories(start: int, stop: int, total: int) -> tuple[torch.Tensor, list[str]]:
    """float32 [stop - start, E] values of every element at steps start..stop-1 of a run of
    `total` steps, and each element's kind. Deterministic in the step number."""
    t = torch.arange(start, stop, dtype=torch.float64)
    g = torch.Generator().manual_seed(start * 7919 + 1)
    cols, kinds = [], []
    for offset in (0.0, 0.3, -2.0):  # drift: 0 -> 1 over the run, shifted
        cols.append(offset + t / max(total - 1, 1))
        kinds.append("drift")
    for base, rel in ((0.3, 1e-7), (0.3, 1e-7), (1e4, 1e-3)):
        cols.append(base + base * rel * torch.randn(len(t), generator=g, dtype=torch.float64))
        kinds.append("jitter")
    walk = 1e-5 * torch.randn(len(t), generator=g, dtype=torch.float64)
    cols.append(walk)  # increments; the caller integrates them across chunks
    kinds.append("walk")
    return torch.stack(cols, 1), kinds


class Run:
    """Feeds the trajectories to the op step by step and keeps the float64 reference sums."""

    def __init__(self, total: int, update, flush_every: int | None = None):
        self.total = total
        extra = {} if flush_every is None else {"flush_every": flush_every}
        self.update = lambda *args: update(*args, **extra)
        self.walk_level = 0.3
        self.step = 0
        first, self.kinds = trajectories(0, 1, total)
        self.state = ops.new_state(first[0].float())
        self.values: list[np.ndarray] = []  # float32 chunks seen so far, as float64 (reference)
        self.sum = np.zeros(first.shape[1])

    def _chunk(self, start, stop):
        x, _ = trajectories(start, stop, self.total)
        w = x[:, -1].cumsum(0) + self.walk_level
        self.walk_level = float(w[-1])
        x[:, -1] = w
        return x.float().contiguous()

    def advance(self, stop: int) -> None:
        while self.step < stop:
            end = min(stop, (self.step // CHUNK + 1) * CHUNK)
            x = self._chunk(self.step, end)
            lists = [[t] for t in self.state]
            for row in x:
                self.update([row], *lists)
            self.values.append(x.double().numpy())
            self.step = end

    def errors(self) -> dict[str, tuple[float, float]]:
        """{kind: (worst relative error of the variance, of the mean)} against float64."""
        data = self.values
        n = sum(len(v) for v in data)
        mean = sum(np.sum(v, 0) for v in data) / n
        var = sum(np.sum(np.square(v - mean), 0) for v in data) / n
        count, got_mean, got_var = (t.double().numpy() for t in ops.temporal_stats(*self.state))
        assert (count == n).all(), (count, n)
        out = {}
        for kind in KINDS:
            cols = [i for i, k in enumerate(self.kinds) if k == kind]
            var_err = np.abs(got_var[cols] - var[cols]) / var[cols]
            mean_err = np.abs(got_mean[cols] - mean[cols]) / np.maximum(np.abs(mean[cols]), 1e-30)
            out[kind] = (float(var_err.max()), float(mean_err.max()))
        return out


def soak(steps: int, checkpoints: list[int], backend: str, flush_every: int | None) -> None:
    update = ops.temporal_update if backend == "dispatch" else ops.TORCH_IMPLS["temporal_update"]
    run = Run(steps, update, flush_every)
    print(f"| steps | " + " | ".join(f"{k} var rel. err | {k} mean rel. err" for k in KINDS) + " | s |")
    print("|---" * (2 * len(KINDS) + 2) + "|")
    t0 = time.perf_counter()
    for c in sorted(set(checkpoints + [steps])):
        run.advance(c)
        errs = run.errors()
        print(f"| {c:.0e} | " + " | ".join(f"{errs[k][0]:.2e} | {errs[k][1]:.2e}" for k in KINDS)
              + f" | {time.perf_counter() - t0:.0f} |", flush=True)


def cost(numel: int, threads: int, calls: int = 20, repeats: int = 7) -> None:
    """Median time of one call on `numel` float32 elements in steady state (clean, inside a
    block; the block starts that fall in the timed calls included)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    values = [0.3 + 1e-5 * torch.randn(numel, generator=g) for _ in range(4)]
    state = [[t] for t in ops.new_state(values[0])]
    for i in range(calls):
        ops.temporal_update([values[i % 4]], *state)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(calls):
            ops.temporal_update([values[i % 4]], *state)
        times.append((time.perf_counter() - t) / calls)
    per_call = statistics.median(times)
    print(f"temporal_update on {numel} float32 elements, {threads} thread(s): "
          f"{per_call * 1e3:.2f} ms a step, {per_call / numel * 1e9:.3f} ns an element, "
          f"{24 * numel / per_call / 1e9:.1f} GB/s at 24 bytes an element "
          f"(state: {sum(t[0].nbytes for t in state) / numel:.0f} bytes an element)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--checkpoints", default="", help="comma-separated step counts to report at")
    p.add_argument("--backend", choices=("dispatch", "torch"), default="dispatch")
    p.add_argument("--flush-every", type=int, default=None,
                   help="calls per float32 block (default: the op's FLUSH_EVERY)")
    p.add_argument("--cost", action="store_true", help="time a step instead of the soak")
    p.add_argument("--numel", type=int, default=1 << 24, help="elements timed by --cost")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --cost")
    a = p.parse_args()
    if a.cost:
        cost(a.numel, a.threads)
        return
    soak(a.steps, [int(float(c)) for c in a.checkpoints.split(",") if c], a.backend, a.flush_every)


if __name__ == "__main__":
    main()
