"""The backends every op test runs on CPU tensors, each behind a clean skip when unavailable.

`call(backend, op, *args)` runs one op on one backend: "torch" is the plain-torch fallback,
"cpp" the C++ kernel through the public entry points (lrfluct_fast.ops.<op>, which dispatch).
"""
from __future__ import annotations

import pytest
import torch

import lrfluct_fast as lf
from lrfluct_fast import ops

BACKENDS = ["torch", "cpp"]


def skip_unless_available(backend: str) -> None:
    if backend == "cpp" and lf.backend("cpu") != "cpp":
        pytest.skip("C++ extension not built")


def call(backend: str, op: str, *args):
    skip_unless_available(backend)
    if backend == "torch":
        return ops.TORCH_IMPLS[op](*args)
    return getattr(ops, op)(*args)
