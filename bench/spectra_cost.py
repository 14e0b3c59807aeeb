"""What weight spectra (lrfluct_fast/spectra.py) cost: SpectraTracker.step per sampled step,
and SpectraTracker.summary (per layer spectral_summary: one float64 SVD, one power-law fit).

    python bench/spectra_cost.py [--threads 1] [--repeats 7]

Two sets of layers on CPU: the paper's autoencoder (lrfluct reproduce's defaults: MLP,
32x32 images, widths 256, 64, latent 16) and GPT-2-small-sized Linear layers from random
weights (768x768, 3072x768, 768x3072, [out, in]). For the autoencoder, one plain training
step (batch 64, Adam) for scale. Medians of interleaved repeats; prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from lrfluct_fast.experiments.autoencoder import build_autoencoder
from lrfluct_fast.spectra import SpectraTracker, fit_power_law, spectral_summary


def _median_time(fn, repeats: int, calls: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def _gpt2_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"attn_c_proj": nn.Linear(768, 768), "mlp_c_fc": nn.Linear(768, 3072),
                          "mlp_c_proj": nn.Linear(3072, 768)})


def _train_step(model: nn.Module):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(64, 1, 32, 32)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), x).backward()
        opt.step()
    return step


def _report(title: str, model: nn.Module, repeats: int, train_step=None) -> None:
    tracker = SpectraTracker(model)
    counter = iter(range(10 ** 9))
    tracker.step(next(counter))  # first-call costs out of the measurement
    step_s = _median_time(lambda: tracker.step(next(counter)), repeats, calls=50)
    tracker.history  # noqa: B018  the device estimates to the host, outside the step timing
    print(f"\n### {title}\n")
    print(f"SpectraTracker.step (one W v, W^T u pair per layer, {len(tracker.layers)} layers): "
          f"{step_s * 1e6:.0f} us")
    if train_step is not None:
        train_step()
        plain_s = _median_time(train_step, repeats, calls=5)
        print(f"one plain training step (batch 64, Adam): {plain_s * 1e6:.0f} us, so tracking "
              f"every step adds {step_s / plain_s:.1%}")
    print("\n| layer | matrix | spectral_summary | of which the power-law fit | "
          "tracker.step, this layer alone |")
    print("|---|---|---|---|---|")
    total = 0.0
    for name, layer in tracker._layers.items():
        matrix = layer.matrix()
        summary_s = _median_time(lambda: spectral_summary(matrix), repeats)
        eigenvalues = torch.linalg.svdvals(matrix.double()).square().numpy()
        fit_s = _median_time(lambda: fit_power_law(eigenvalues), repeats)
        one = SpectraTracker(model, layers=[name])
        one.step(0)
        pair_s = _median_time(lambda: one.step(0), repeats, calls=50)
        total += summary_s
        print(f"| {name} | {tuple(matrix.shape)} | {summary_s * 1e3:.2f} ms | {fit_s * 1e3:.2f} ms "
              f"| {pair_s * 1e6:.0f} us |")
    summary_s = _median_time(tracker.summary, max(3, repeats // 2))
    print(f"\nSpectraTracker.summary(): {summary_s * 1e3:.1f} ms (sum of the rows: "
          f"{total * 1e3:.1f} ms)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="repeats per median (default 7)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error(f"--threads and --repeats must be >= 1, got {args.threads}, {args.repeats}")
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    torch.manual_seed(0)
    autoencoder = build_autoencoder("mlp", 32)
    _report("The paper's autoencoder (MLP, 32x32, widths 256, 64, latent 16)", autoencoder,
            args.repeats, _train_step(autoencoder))
    _report("GPT-2-small-sized Linear layers (random weights)", _gpt2_linears(), args.repeats)


if __name__ == "__main__":
    main()
