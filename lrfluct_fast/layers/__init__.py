"""Layer kinds: where a module's neurons are. One table, one small file per family of kinds.

A LayerKind says, for a module type:
  rows     module -> (function viewing the module's output, or dL/dz, as [R, N]: neurons last);
           None for a parameter observed alone (parameter_kind)
  weight   (attribute, neuron axis) of the parameter whose slices along that axis are the
           neurons' incoming weights; None when the kind has none
  bias     (attribute, neuron axis) of the per-neuron bias (an attribute may be None: bias=False)
  weight_rows  (module, weight-shaped tensor) -> [N, fan_in], each neuron's incoming weights
           in a row (default: the weight axis moved first); for layouts an axis cannot say
  output   result of the module's forward -> the tensor observed (default: the result)
  rebuild  (result, observed tensor) -> the result handed on (default: the observed tensor)
  around   (module, LayerState) -> a context manager the module's forward runs in, for kinds
           whose neurons are inside the forward (MultiheadAttention's projections); it
           passes them through LayerState.observe_tensor. The result is then not observed.
  check    module -> why this module cannot be served, or None
A module is served by the entry of the first class of its MRO in the table, so subclasses
work; `name`-keyed entries ("package.module.Class") match classes of packages that need not
be installed (transformers' Conv1D). Users add kinds with `register_layer`.
This package owns the table; it holds no state of any layer and never touches a module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

RowsFn = Callable[[torch.Tensor], torch.Tensor]


def matrix(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim], rows = the product of the other dims (1 for a 1-D t). flatten,
    not reshape(-1, n): that is ambiguous for n = 0 (zero-width layers exist), and slower."""
    return t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)


def _last_rows(t: torch.Tensor) -> torch.Tensor:
    return matrix(t)


_last_rows.dim_of = lambda t: -1  # noqa: E731


def features_last(module: nn.Module) -> RowsFn:
    """Neurons in the last dim of the output: a view.

    A rows function may carry `dim_of(t)`, the one dim of t that holds the neurons (None when
    t has none): the layer's output is then read in place as [B, N, S] (ops.neuron_view), and
    in eager mode by the C++ Observer (csrc/observe.cpp)."""
    return _last_rows


def channels(spatial: Callable[[nn.Module], int]):
    """Neurons in dim 1 of a batched output (dim 0 unbatched), `spatial(module)` dims after
    them; moving them last copies."""
    def rows_for(module: nn.Module) -> RowsFn:
        n_spatial = spatial(module)

        def dim_of(t: torch.Tensor) -> int:
            return 1 if t.dim() >= n_spatial + 2 else 0

        def rows(t: torch.Tensor) -> torch.Tensor:
            return matrix(t.movedim(dim_of(t), -1))
        rows.dim_of = dim_of
        return rows
    return rows_for


@dataclass(frozen=True)
class LayerKind:
    rows: Optional[Callable[[nn.Module], RowsFn]]
    weight: Optional[tuple[str, int]] = ("weight", 0)
    bias: Optional[tuple[str, int]] = ("bias", 0)
    weight_rows: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    output: Optional[Callable] = None
    rebuild: Optional[Callable] = None
    around: Optional[Callable] = None
    check: Optional[Callable[[nn.Module], Optional[str]]] = None
    # for a module whose `weight` attribute is absent (None): its number of neurons, and the
    # neuron axis of the own parameters that then hold its weights (tracked alone)
    neurons: Optional[Callable[[nn.Module], int]] = None
    alone_axes: Optional[dict] = None

    def neuron_rows_of_weight(self, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """w (the weight's shape) as [N, fan_in]: neuron j's incoming weights in row j."""
        if self.weight_rows is not None:
            return self.weight_rows(module, w)
        w = w.movedim(self.weight[1], 0)
        return w.flatten(1) if w.dim() > 1 else w.unsqueeze(1)  # flatten: fan_in may be 0


KINDS: dict[type, LayerKind] = {}
NAMED_KINDS: dict[str, LayerKind] = {}  # "module.QualName" -> kind, for optional packages


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_of(module: nn.Module) -> LayerKind | None:
    """The entry serving `module` (by its MRO; then a foreign norm by its shape), or None."""
    for cls in type(module).__mro__:
        kind = KINDS.get(cls) or NAMED_KINDS.get(_qualified(cls))
        if kind is not None:
            return kind
    return norm.duck_norm(module)


def register_layer(cls: type | str, *, neuron_dim: int | None = -1, rows=None,
                   weight: tuple[str, int] | None = ("weight", 0),
                   bias: tuple[str, int] | None = ("bias", 0), output=None, rebuild=None,
                   check=None, replace: bool = False) -> LayerKind:
    """Monitor modules of type `cls` (and its subclasses) from now on.

    neuron_dim  the dim of the module's output that holds its neurons (-1: features last, as
                Linear; 1: channels, as a conv); every other dim is rows of observations.
                `rows=` (module -> function giving the [R, N] view) replaces it for other layouts.
    weight, bias  (attribute name, neuron axis) of the per-neuron parameters, or None.
    output, rebuild  for a forward returning more than one tensor: pick the observed tensor,
                and put the observed tensor back into the result.
    check       module -> the reason a module cannot be monitored, or None.
    Registering a type that is already in the table raises, unless replace=True.
    """
    key = cls if isinstance(cls, type) else str(cls)
    if isinstance(key, type) and not issubclass(key, nn.Module):
        raise TypeError(f"register_layer: {key.__name__} is not a torch.nn.Module subclass")
    table = KINDS if isinstance(key, type) else NAMED_KINDS
    if key in table and not replace:
        name = key.__name__ if isinstance(key, type) else key
        raise ValueError(f"register_layer: {name} is already registered (replace=True to change it)")
    for what, spec in (("weight", weight), ("bias", bias)):
        if spec is not None and not (isinstance(spec, tuple) and len(spec) == 2
                                     and isinstance(spec[0], str) and isinstance(spec[1], int)):
            raise TypeError(f"register_layer: {what} must be (attribute name, neuron axis) or None, "
                            f"got {spec!r}")
    if rows is None:
        if not isinstance(neuron_dim, int):
            raise TypeError(f"register_layer: neuron_dim must be an int, got {neuron_dim!r}")
        rows = features_last if neuron_dim == -1 else _dim_rows(neuron_dim)
    kind = LayerKind(rows=rows, weight=weight, bias=bias, output=output, rebuild=rebuild, check=check)
    table[key] = kind
    return kind


def _dim_rows(dim: int):
    def rows_for(module: nn.Module) -> RowsFn:
        def rows(t: torch.Tensor) -> torch.Tensor:
            if not -t.dim() <= dim < t.dim():
                raise ValueError(f"the output of {type(module).__name__} has {t.dim()} dims: it "
                                 f"has no neuron dim {dim}")
            return matrix(t.movedim(dim, -1))
        rows.dim_of = lambda t: dim if -t.dim() <= dim < t.dim() and t.dim() > 1 else None
        return rows
    return rows_for


def parameter_kind(name: str, axis: int = -1) -> LayerKind:
    """A parameter of a module no kind serves (a ViT's position embeddings, a user's own
    gain): its temporal statistics alone, neurons along its last dim (features, as in the
    layers it feeds) unless the module's kind names the axis. No output is observed."""
    return LayerKind(rows=None, weight=(name, axis), bias=None)


def parameter_value(module: nn.Module, attr: str):
    """module.<attr> (dotted: "out_proj.weight") as the forward sees it, or None. A
    parametrized tensor is computed with its parametrizations in eval mode: reading it must not
    run spectral_norm's power iteration."""
    owner_path, _, name = attr.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    plist = getattr(owner, "parametrizations", None)
    if plist is None or name not in plist:
        return getattr(owner, name, None)
    modes = [(m, m.training) for m in plist[name].modules()]
    try:
        plist[name].eval()
        return getattr(owner, name)
    finally:
        for m, training in modes:
            m.training = training


def unregister_layer(cls: type | str) -> None:
    """Remove an entry added by register_layer (KeyError when there is none)."""
    (KINDS if isinstance(cls, type) else NAMED_KINDS).pop(cls if isinstance(cls, type) else str(cls))


from . import attention, conv, embedding, linear, norm  # noqa: E402,F401  the built-in kinds register here

__all__ = ["KINDS", "NAMED_KINDS", "LayerKind", "channels", "features_last", "kind_of", "matrix",
           "parameter_kind", "parameter_value", "register_layer", "unregister_layer"]
