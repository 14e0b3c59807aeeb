"""Normalisation layers with affine parameters. Neurons: the normalised features (LayerNorm,
RMSNorm: the trailing normalized_shape dims, flattened) or channels (GroupNorm, BatchNormNd:
dim 1); each neuron's weight and bias are its affine scale and shift.

Norms of other packages (transformers' LlamaRMSNorm, T5LayerNorm, ...) are matched by duck
typing in `duck_norm`: a class named *RMSNorm or *LayerNorm whose only own parameters are a
1-D weight (and a bias of its shape) normalises features last.
"""
from torch import nn

from . import LayerKind, KINDS, features_last, matrix


def _trailing(module):
    k = len(module.normalized_shape)
    if k == 1:
        return features_last(module)

    def rows(t):
        return matrix(t.flatten(-k))
    return rows


def _channel_dim_1(module):
    def rows(t):
        return matrix(t.movedim(1, -1)) if t.dim() > 1 else t.unsqueeze(0)
    rows.dim_of = lambda t: 1 if t.dim() > 1 else -1
    return rows


def _one_per_neuron(module, w):
    return w.reshape(-1, 1)


def _affine_only(module):
    return None if module.weight is not None else "no affine parameters (elementwise_affine=False)"


_TRAILING = LayerKind(rows=_trailing, weight_rows=_one_per_neuron, check=_affine_only)
KINDS[nn.LayerNorm] = _TRAILING
if hasattr(nn, "RMSNorm"):
    KINDS[nn.RMSNorm] = _TRAILING
_CHANNELS = LayerKind(rows=_channel_dim_1, weight_rows=_one_per_neuron, check=_affine_only)
for cls in (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    KINDS[cls] = _CHANNELS

_DUCK = LayerKind(rows=features_last, weight_rows=_one_per_neuron)


def duck_norm(module: nn.Module):
    """The features-last kind for a foreign norm (see the module docstring), or None."""
    name = type(module).__name__
    if not name.endswith(("RMSNorm", "LayerNorm")):
        return None
    own = dict(module.named_parameters(recurse=False))
    w = own.get("weight")
    if w is None or w.dim() != 1 or set(own) - {"weight", "bias"}:
        return None
    b = own.get("bias")
    return _DUCK if b is None or b.shape == w.shape else None
