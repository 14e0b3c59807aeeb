"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, any padding, padding_mode, stride,
dilation and groups. Neurons: output channels (dim 1, dim 0 for an unbatched input).

A conv weight is [out, in / groups, *k]: neuron j's incoming weights are row j. A transposed
conv weight is [in, out / groups, *k]: output channel g * (out / groups) + l takes the slice
[g * in / groups : (g + 1) * in / groups, l] of it.
"""
from torch import nn

from . import LayerKind, KINDS, channels


def _spatial(module):
    return len(module.kernel_size)


def _transposed_weight_rows(module, w):
    g = module.groups
    w = w.unflatten(0, (g, w.shape[0] // g)).transpose(1, 2)   # [g, out/g, in/g, *k]
    return w.reshape(w.shape[0] * w.shape[1], -1)


for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    KINDS[cls] = LayerKind(rows=channels(_spatial))
for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    KINDS[cls] = LayerKind(rows=channels(_spatial), weight=("weight", 1),
                           weight_rows=_transposed_weight_rows)
