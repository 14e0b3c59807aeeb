"""integrations: callbacks that monitor a training framework's run with no change to its loop.

    from lrfluct_fast.integrations import HFTrainerCallback   # transformers.Trainer (hf.py)
    from lrfluct_fast.integrations import LightningCallback   # Lightning 2.x (lightning.py)

Each is imported when first named, so importing this package needs neither framework.
common.py holds what both share.
"""
from __future__ import annotations

import importlib

_WHERE = {"HFTrainerCallback": ".hf", "LightningCallback": ".lightning"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
