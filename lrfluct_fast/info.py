"""`lrfluct info`: what this installation runs on."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    pass


def describe() -> dict[str, str]:
    import torch

    from . import __version__
    from ._backend import backend, cpp_error

    info = {
        "lrfluct_fast": __version__,
        "backend (cpu)": backend("cpu"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "not available",
    }
    if torch.cuda.is_available():
        info["backend (cuda)"] = backend("cuda")
    if cpp_error():
        info["c++ extension"] = cpp_error()
    return info


def run(args) -> int:
    for key, value in describe().items():
        print(f"{key:16} {value}")
    return 0
