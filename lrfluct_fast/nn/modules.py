"""Drop-in wrappers: FluctLinear, FluctConv1d, FluctConv2d.

Each subclasses the torch module it replaces, with the same parameters and state_dict keys,
so a torch checkpoint loads into a wrapped model and back. `instrument` turns a module into
its wrapper in place (its class is swapped; the object, its parameters and any hooks on it
stay) and `Monitor.remove` swaps it back. A wrapper owns only the `_lrfluct` attribute
(its LayerState); forwards that are not training observations (eval, no_grad, a step the
Monitor does not sample) run the plain torch forward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .fused import ConvWithStats, LinearWithStats
from .layer_state import LayerState


def _autocast(x, weight, bias):
    """Cast to the autocast dtype here, so the fused function sees one dtype (and grads
    flow back to the parameters' dtype through the casts). As autocast does, float64
    tensors are left alone. Returns the inputs and the context the fused function runs in:
    autocast off, when it was on."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias, contextlib.nullcontext()  # the common case: no context to enter
    off = torch.autocast(device, enabled=False)
    if torch.float64 in (x.dtype, weight.dtype):
        return x, weight, bias, off
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None), off


def _observed(module, x) -> bool:
    state: LayerState | None = getattr(module, "_lrfluct", None)
    return (state is not None and module.training and torch.is_grad_enabled()
            and state.observing())


class FluctLinear(nn.Linear):
    def forward(self, x):
        if not _observed(self, x):
            return super().forward(x)
        x, w, b, plain_dtypes = _autocast(x, self.weight, self.bias)
        with plain_dtypes:
            return LinearWithStats.apply(x, w, b, self._lrfluct)


class _FluctConvNd:
    def forward(self, x):
        if not _observed(self, x):
            return super().forward(x)
        unbatched = x.dim() == len(self.kernel_size) + 1
        if unbatched:
            x = x.unsqueeze(0)
        x, w, b, plain_dtypes = _autocast(x, self.weight, self.bias)
        with plain_dtypes:
            z = ConvWithStats.apply(x, w, b, self._lrfluct, self.stride, self.padding,
                                    self.dilation, self.groups)
        return z.squeeze(0) if unbatched else z


class FluctConv1d(_FluctConvNd, nn.Conv1d):
    pass


class FluctConv2d(_FluctConvNd, nn.Conv2d):
    pass


# torch module type -> (wrapper, kind of neuron view)
WRAPPERS = {nn.Linear: (FluctLinear, "linear"), nn.Conv1d: (FluctConv1d, "conv"),
            nn.Conv2d: (FluctConv2d, "conv")}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a supported-type module cannot be wrapped, or None."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (use explicit integer padding)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None
