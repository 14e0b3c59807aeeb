"""pytest-benchmark: one training step per model x monitoring mode. Numbers, not pass/fail.

    python -m pytest bench/bench_train.py --benchmark-columns=median,iqr,rounds
The interleaved overhead report (the figure to quote) is `lrfluct bench`; this file gives the
same steps to pytest-benchmark's statistics and comparisons (--benchmark-compare).
"""
import pytest
import torch

from lrfluct_fast.benchmark import models, runner

MODELS = ["autoencoder", "mlp"]


@pytest.mark.parametrize("mode", runner.available_modes())
@pytest.mark.parametrize("model", MODELS)
def test_train_step(benchmark, model, mode):
    torch.manual_seed(0)
    w = models.BUILTIN[model]("cpu")
    monitor, context = runner.attach(mode, w.model)

    benchmark.pedantic(runner.train_step, args=(w, monitor, context), rounds=5 if model == "mlp" else 30, warmup_rounds=2)
    benchmark.extra_info["monitor_bytes"] = runner.monitor_bytes(monitor)
    if monitor is not None:
        monitor.remove()
