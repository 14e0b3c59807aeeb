"""nn.MultiheadAttention: the q, k and v projections' neurons, and out_proj's.

Its forward computes the projections inside F.multi_head_attention_forward, from the module's
weights, without calling a submodule (a TorchFunctionMode cannot see them: that function
dispatches as a whole). So the module's own forward runs unchanged while `_ProjectionTap`
stands in for torch.nn.functional's `linear`: the output of every call whose weight is
in_proj_weight (or a row block of it: q apart from k and v in cross-attention) passes through
the layer's Observe, and of the one whose weight is out_proj.weight through out_proj's:
  layer "<attn>"           3E neurons, q then k then v; weight in_proj_weight, bias in_proj_bias;
                           with separate q/k/v weights (kdim or vdim != embed_dim) no weight
                           of its own: "<attn>.q_proj_weight" etc. are tracked alone, by row
  layer "<attn>.out_proj"  E neurons, the attention output; weight and bias of out_proj
The values are torch's own: nothing is recomputed. Served: packed or separate projection
weights, with or without bias_k/bias_v (tracked as parameters alone) and add_zero_attn,
batch_first or not, every mask, need_weights True or False.
What it does not see: the inference fast path (eval mode or no_grad, where nothing is
recorded anyway). Under torch.compile the tap is a graph break: the attention runs eagerly.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import KINDS, LayerKind, features_last


class _ProjectionTap:
    """While the attention's forward runs, torch.nn.functional's `linear` (the name its
    multi_head_attention_forward calls) passes the projections it computes through Observe.
    A call with any other weight (another thread's) is served unchanged."""

    def __init__(self, module: nn.Module, state):
        e = module.embed_dim
        if module.in_proj_weight is not None:
            self.targets = {id(module.in_proj_weight): (module.in_proj_weight, state, None)}
        else:  # separate q, k, v weights (kdim, vdim): each one block of the 3E neurons
            self.targets = {id(w): (w, state, (i * e, (i + 1) * e)) for i, w in enumerate(
                (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))}
        out_state = getattr(module.out_proj, "_lrfluct", None)
        if out_state is not None:
            self.targets[id(module.out_proj.weight)] = (module.out_proj.weight, out_state, None)

    def __enter__(self):
        self.previous = F.linear
        previous = self.previous

        def linear(input, weight, bias=None):
            out = previous(input, weight, bias)
            target = self._target(weight)
            return out if target is None else target[0].observe_tensor(out, target[1])
        F.linear = linear
        return self

    def __exit__(self, *exc):
        F.linear = self.previous

    def _target(self, weight):
        """(LayerState, neuron columns or None) of a projection weight, or None."""
        hit = self.targets.get(id(weight))
        if hit is not None:
            return hit[1], hit[2]
        base = weight._base
        hit = self.targets.get(id(base)) if base is not None else None
        if hit is None:
            return None
        start = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
        return hit[1], (start, start + weight.shape[0])   # a row block: split([E, 2E])


KINDS[nn.MultiheadAttention] = LayerKind(
    rows=features_last, weight=("in_proj_weight", 0), bias=("in_proj_bias", 0),
    around=_ProjectionTap, neurons=lambda m: 3 * m.embed_dim,
    alone_axes={"q_proj_weight": 0, "k_proj_weight": 0, "v_proj_weight": 0})
