"""pytest-benchmark: every op x backend x shape (float32). Numbers, not pass/fail.

    python -m pytest bench/bench_ops.py --benchmark-columns=median,iqr,rounds
GB/s is in each benchmark's extra_info (bytes moved / median time).
"""
import pytest
import torch

import lrfluct_fast as lf
from ops_cases import BACKENDS, OPS, SHAPES, make_case


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, backend, shape):
    if op == "copy" and backend != "cpp":
        pytest.skip("copy is measured once per shape")
    if backend == "cpp" and lf.backend("cpu") != "cpp":
        pytest.skip("C++ extension not built")
    case = make_case(op, backend, shape, torch.float32)
    if case is None:
        pytest.skip("no such case")
    fn, nbytes = case
    rounds = 3 if backend != "cpp" and shape[0] * shape[1] > 2**22 else 10
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run: no timing)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
