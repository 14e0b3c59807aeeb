"""What a sharpness measurement (lrfluct_fast/sharpness.py) costs, against a training step.

    PYTHONPATH=. python bench/sharpness_cost.py [--warmup 200] [--repeats 5] [--threads 1]

The paper's MLP autoencoder (default sizes, 32x32 images), instrumented, trained by Adam
(lr 1e-3, batch 64, MSE) for `warmup` steps so that Adam has a state and the Hessian its
shape; the probe is 256 images of the eight-shapes set. Medians of `repeats`:
- a training step (batch 64, the reproduce setting, and batch 256, the probe's size);
- the Hessian graph (one forward and one create_graph backward) and one HVP;
- SharpnessTracker.measure: cold (first call), and warm (10 training steps after the
  previous measurement), with the HVPs each quantity took (tol 1e-3, iters 20);
- Lanczos against power iteration: the HVPs each needs to come within 1e-3 of the top
  eigenvalue (a Lanczos run of tol 1e-9 is the reference), from the same random start.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lrfluct_fast as lf
from lrfluct_fast.experiments.autoencoder import build_autoencoder
from lrfluct_fast.experiments.shapes import make_shapes
from lrfluct_fast.sharpness import (HessianOperator, SharpnessTracker, adam_preconditioner,
                                    flatten, lanczos_top, start_vector)


def _loss(model, x):
    return nn.functional.mse_loss(model(x), x)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _power_iteration_products(matvec, start, reference, max_products):
    """HVPs power iteration needs for its Rayleigh quotient to come within 1e-3 of reference."""
    v = start / start.norm()
    for k in range(1, max_products + 1):
        w = matvec(v)
        value = float(w @ v)
        if abs(value - reference) <= 1e-3 * abs(reference):
            return k
        v = w / w.norm()
    return None


def _lanczos_products(matvec, start, reference, max_products):
    for k in range(1, max_products + 1):
        value, _, _ = lanczos_top(matvec, start, iters=k, tol=1e-12)
        if abs(value - reference) <= 1e-3 * abs(reference):
            return k
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=200, help="Adam steps before measuring")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on shared cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    images, _ = make_shapes(4096, 32, seed=0)
    images = torch.from_numpy(images)
    probe = torch.from_numpy(make_shapes(256, 32, seed=1)[0])
    model = build_autoencoder("mlp", 32)
    mon = lf.instrument(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def train_step(batch=64):
        x = images[torch.randint(0, images.shape[0], (batch,), generator=gen)]
        opt.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        opt.step()
        mon.step()

    for _ in range(args.warmup):
        train_step()
    params = [q for q in model.parameters() if q.requires_grad]
    n = sum(q.numel() for q in params)
    step64, _ = _timed(lambda: train_step(64), 10 * args.repeats)
    step256, _ = _timed(lambda: train_step(256), 4 * args.repeats)

    with mon.paused():
        build, hessian = _timed(lambda: HessianOperator(lambda: _loss(model, probe), params),
                                args.repeats)
        v = torch.randn(n, generator=gen)
        hvp, _ = _timed(lambda: hessian(v), 2 * args.repeats)

    rows = []
    for kind in ("cold", "warm"):
        times, products, values = [], [], []
        for r in range(args.repeats):
            tracker = SharpnessTracker(model, _loss, probe, every=1, optimizer=opt, monitor=mon)
            if kind == "warm":
                tracker.measure(0)
                for _ in range(10):
                    train_step()
            t = time.perf_counter()
            out = tracker.measure(1)
            times.append(time.perf_counter() - t)
            products.append(tracker.last_products)
            values.append(out)
        rows.append((kind, statistics.median(times),
                     [p["sharpness"] for p in products],
                     [p["preconditioned_sharpness"] for p in products], values[-1]))

    comparison = []
    with mon.paused():
        hessian = HessianOperator(lambda: _loss(model, probe), params)
        start = start_vector(None, params, hessian.dtype)
        scale = flatten(adam_preconditioner(opt, params), hessian.dtype).rsqrt()
        for name, matvec in (("sharpness", hessian),
                             ("preconditioned_sharpness", lambda u: scale * hessian(scale * u))):
            reference, _, used = lanczos_top(matvec, start, iters=200, tol=1e-9)
            comparison.append((name, reference, used,
                               _lanczos_products(matvec, start, reference, 60),
                               _power_iteration_products(matvec, start, reference, 300)))

    print(f"MLP autoencoder, {n:,} parameters, probe 256 images, Adam lr 1e-3 after "
          f"{args.warmup} steps, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | time (ms) | in training steps (batch 64) | in training steps (batch 256) |")
    print("|---|---|---|---|")
    print(f"| training step, batch 64 | {1e3 * step64:.1f} | 1 | |")
    print(f"| training step, batch 256 | {1e3 * step256:.1f} | {step256 / step64:.1f} | 1 |")
    print(f"| Hessian graph (forward + create_graph backward) | {1e3 * build:.1f} | "
          f"{build / step64:.1f} | {build / step256:.2f} |")
    print(f"| one HVP | {1e3 * hvp:.1f} | {hvp / step64:.1f} | {hvp / step256:.2f} |")
    for kind, wall, plain, precond, _ in rows:
        print(f"| measure(), {kind}: HVPs sharpness {plain}, preconditioned {precond} | "
              f"{1e3 * wall:.0f} | {wall / step64:.0f} | {wall / step256:.1f} |")
    print(f"\nlast values: {rows[-1][-1]}\n")
    print("| quantity | top eigenvalue | Lanczos HVPs to 1e-3 | power iteration HVPs to 1e-3 |")
    print("|---|---|---|---|")
    for name, reference, used, lanczos, power in comparison:
        print(f"| {name} | {reference:.6g} | {lanczos} | {power if power else '> 300'} |")


if __name__ == "__main__":
    main()
