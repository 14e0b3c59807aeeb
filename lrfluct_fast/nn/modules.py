"""The drop-in wrappers: a subclass of a module's own class that observes its output.

`wrap(module, state)` turns a module into its wrapper in place: its class is swapped for
`wrapper_class(type(module))`, a subclass of the module's own class whose forward runs the
module's forward unchanged and passes the output through the LayerState (Observe). The
object, its parameters, hooks and state_dict stay. `unwrap` swaps back, also when a
parametrization was added after wrapping (its class is rebuilt on the original).
A copy of a wrapped module (copy.deepcopy, pickle, torch.save of the whole model) is the plain
module: no wrapper and no monitor state. This module owns the wrapper classes and the `_lrfluct`
attribute; it never touches parameters or gradients.
"""
from __future__ import annotations

import copy
import copyreg

import torch
from torch import nn

from .layer_state import LayerState


class Observed:
    """Mixin of every wrapper class: the module's own forward, its output observed."""

    def forward(self, *args, **kwargs):
        state = self._lrfluct
        around = state.kind.around
        if around is None:
            out = super().forward(*args, **kwargs)
            observer = state.observer  # the C++ path; it answers None when Python decides
            if (observer is not None and self.training and isinstance(out, torch.Tensor)
                    and not torch.compiler.is_compiling()):
                observed = observer.observe(out)
                if observed is not None:
                    return observed
            return state.observe(self, out)
        if state.why_unobserved(self) is not None:
            return super().forward(*args, **kwargs)
        with around(self, state):  # a kind whose neurons are inside the forward (attention)
            return super().forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        cls = plain_class(type(self))
        replica = cls.__new__(cls)
        memo[id(self)] = replica
        replica.__dict__ = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()
                            if k != "_lrfluct"}
        return replica

    def __reduce_ex__(self, protocol):
        # the plain class, rebuilt by the standard library (loading needs no lrfluct_fast)
        state = {k: v for k, v in self.__getstate__().items() if k != "_lrfluct"}
        return copyreg._reconstructor, (plain_class(type(self)), object, None), state


_WRAPPERS: dict[type, type] = {}


def wrapper_class(cls: type) -> type:
    """The wrapper of torch module class `cls` (made once per class): Fluct<cls name>."""
    w = _WRAPPERS.get(cls)
    if w is None:
        w = _WRAPPERS[cls] = type(f"Fluct{cls.__name__}", (Observed, cls),
                                  {"_lrfluct_original": cls, "__module__": __name__})
    return w


def plain_class(cls: type) -> type:
    """`cls` without the wrapper: the original class, or (for a class derived from a wrapper,
    such as the one torch's parametrize makes) the same class rebuilt on the original."""
    if "_lrfluct_original" in cls.__dict__:
        return cls._lrfluct_original
    if not issubclass(cls, Observed):
        return cls
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, tuple(plain_class(b) for b in cls.__bases__), body)


def wrap(module: nn.Module, state: LayerState) -> None:
    module._lrfluct = state
    module.__class__ = wrapper_class(type(module))


def unwrap(module: nn.Module) -> None:
    module.__class__ = plain_class(type(module))
    module.__dict__.pop("_lrfluct", None)


FluctLinear = wrapper_class(nn.Linear)
FluctConv1d = wrapper_class(nn.Conv1d)
FluctConv2d = wrapper_class(nn.Conv2d)
