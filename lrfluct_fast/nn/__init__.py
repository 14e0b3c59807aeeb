"""Drop-in module wrappers that observe a layer's output and its gradient (Observe)."""
from .layer_state import LayerState, matrix
from .modules import (KINDS, FluctConv1d, FluctConv2d, FluctConv3d, FluctLinear, kind_of, parameter_value, plain_class,
                      rows_of, unwrap, wrap, wrapper_class)
from .observe import Observe

__all__ = ["FluctLinear", "FluctConv1d", "FluctConv2d", "FluctConv3d", "KINDS", "LayerState",
           "Observe", "kind_of", "matrix", "parameter_value", "plain_class", "rows_of", "unwrap", "wrap",
           "wrapper_class"]
