"""The backends every op test runs on CPU tensors, each behind a clean skip when unavailable.

`call(backend, op, *args, **kwargs)` runs one op on one backend: "torch" is the plain-torch fallback,
"cpp" the C++ kernel through the public entry points (lrfluct_fast.ops.<op>, which dispatch),
"triton" the Triton launcher lrfluct_fast.ops.<op>_triton: in Triton's interpreter when there is
no GPU (tests/conftest.py sets TRITON_INTERPRET=1), else compiled, on CUDA copies of the
arguments whose results (and in-place updates) are copied back.
"""
from __future__ import annotations

import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast import ops
from lrfluct_fast.ops import _triton_config

BACKENDS = ["torch", "cpp", "triton"]


def skip_unless_available(backend: str) -> None:
    if backend == "cpp" and lf.backend("cpu") != "cpp":
        pytest.skip("C++ extension not built")
    if backend == "triton":
        if _triton_config.TRITON_ERROR is not None:
            pytest.skip(f"triton not installed ({_triton_config.TRITON_ERROR})")
        if not (_triton_config.INTERPRET or torch.cuda.is_available()):
            pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton was imported")


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x


def _copy_back(host, dev) -> None:
    if isinstance(host, torch.Tensor):
        if host.device != dev.device:
            host.copy_(dev)
    elif isinstance(host, (list, tuple)):
        for h, d in zip(host, dev):
            _copy_back(h, d)


def _call_triton(op: str, *args, **kwargs):
    fn = ops.TRITON_IMPLS[op]
    if _triton_config.INTERPRET:
        return fn(*args, **kwargs)
    dev_args = _to(args, "cuda")
    out = fn(*dev_args, **kwargs)
    _copy_back(args, dev_args)  # in-place state updates
    return _to(out, "cpu")


def call(backend: str, op: str, *args, **kwargs):
    skip_unless_available(backend)
    if backend == "torch":
        return ops.TORCH_IMPLS[op](*args, **kwargs)
    if backend == "triton":
        return _call_triton(op, *args, **kwargs)
    return getattr(ops, op)(*args, **kwargs)
