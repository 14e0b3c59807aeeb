"""Which kernels serve which device, decided once at import.

CPU: the C++ extension `lrfluct_fast._C` when it is built and loads, else plain torch ops
(with one warning). CUDA: the Triton kernels when triton imports (LRFLUCT_DISABLE_TRITON=1
opts out), else plain torch ops.
This module owns that choice and `backend()`; it defines no op.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import ops

_cpp_error: str | None = None
try:
    if os.environ.get("LRFLUCT_DISABLE_CPP") == "1":
        raise ImportError("disabled by LRFLUCT_DISABLE_CPP=1")
    from . import _C
    _C.register_kernels()
except (ImportError, OSError) as e:  # not built, built against another torch or other sources
    _cpp_error = f"{type(e).__name__}: {e}"
    ops.register_torch_fallback("cpu")
    warnings.warn(
        "lrfluct_fast: C++ extension not available, statistics run on plain torch ops "
        "(the paper's autoencoder then trains about 2.6x slower monitored, against about 1.1x "
        "with it). Build it with `pip install --no-build-isolation -e .` "
        f"({_cpp_error})",
        RuntimeWarning, stacklevel=2)

_cuda_backend = "triton" if torch.cuda.is_available() and ops.triton_usable() else "torch"
if _cuda_backend == "triton":
    ops.register_triton("cuda")
else:
    ops.register_torch_fallback("cuda")


def backend(device: str | torch.device | None = None) -> str:
    """Which kernels compute statistics for tensors on `device`: "cpp", "triton" or "torch".

    Without a device: CUDA when available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cpu":
        return "torch" if _cpp_error else "cpp"
    if kind == "cuda":
        return _cuda_backend
    return "torch"


def cpp_error() -> str | None:
    """Why the C++ extension is not in use, or None when it is."""
    return _cpp_error
