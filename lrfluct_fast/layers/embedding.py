"""Embeddings: nn.Embedding and nn.EmbeddingBag. Neurons: embedding features (the output's
last dim), so neuron j's weights are column j of the table.

The weight statistics are over every step, also for rows a step does not touch: a row that
no batch looks up keeps its value, so its temporal variance counts those steps as no
movement. A rare token's row therefore shows a small fluctuation spread thinly over the run;
weight.temporal_var keeps the per-row detail.
"""
from torch import nn

from . import LayerKind, KINDS, features_last

for cls in (nn.Embedding, nn.EmbeddingBag):
    KINDS[cls] = LayerKind(rows=features_last, weight=("weight", 1), bias=None)
