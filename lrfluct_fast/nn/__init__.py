"""Drop-in module wrappers that observe a layer's output and its gradient (Observe)."""
from .layer_state import GradScale, LayerState
from .modules import FluctConv1d, FluctConv2d, FluctLinear, plain_class, unwrap, wrap, wrapper_class
from .observe import Observe

__all__ = ["FluctLinear", "FluctConv1d", "FluctConv2d", "GradScale", "LayerState", "Observe",
           "plain_class", "unwrap", "wrap", "wrapper_class"]
