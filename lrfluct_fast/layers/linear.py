"""Linear layers: nn.Linear (and subclasses) and transformers' Conv1D (GPT-2's projections,
a Linear with its weight stored [in, out]). Neurons: output features, the last dim."""
from torch import nn

from . import LayerKind, KINDS, NAMED_KINDS, features_last

KINDS[nn.Linear] = LayerKind(rows=features_last)
# matched by name: transformers need not be installed, and is never imported here
NAMED_KINDS["transformers.pytorch_utils.Conv1D"] = LayerKind(rows=features_last, weight=("weight", 1))
