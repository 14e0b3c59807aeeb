"""Drop-in module wrappers whose forward/backward compute per-neuron statistics."""
from .layer_state import LayerState, neuron_rows
from .modules import WRAPPERS, FluctConv1d, FluctConv2d, FluctLinear, unsupported_reason

__all__ = ["FluctLinear", "FluctConv1d", "FluctConv2d", "LayerState", "WRAPPERS",
           "neuron_rows", "unsupported_reason"]
