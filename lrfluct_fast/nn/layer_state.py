"""LayerState: one monitored layer's running statistics, as device buffers.

Owns the buffers (activation and gradient (counts, moments), weight and bias temporal state)
and the merge of a backward's batch statistics into them. It never touches the module's
parameters or gradients, and never synchronises with the host.
"""
from __future__ import annotations

import math

import torch

from .. import ops


def matrix(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim], rows = the product of the other dims (1 for a 1-D t). flatten,
    not reshape(-1, n): that is ambiguous for n = 0 (zero-width layers exist), and slower."""
    return t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)


def neuron_rows(module_kind: str, t: torch.Tensor) -> torch.Tensor:
    """View a layer output (or its gradient) as [R, N]: neurons last, every other dim rows.

    Linear: a view. ConvNd: channels (dim 1) moved last, which copies.
    """
    if module_kind == "linear":
        return matrix(t)
    return matrix(t.movedim(1, -1))


TEMPORAL_PARTS = ("tally", "skipped", "moments")  # buffer names of a temporal state (ops.new_state)


class LayerState:
    """Running statistics of one layer. `kind` is "linear" or "conv"."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, *,
                 activations: bool, gradients: bool, weights: bool, biases: bool,
                 weight_mode: str):
        self.kind = kind
        self.neurons = weight.shape[0]
        self.weight_mode = weight_mode
        self.dtype = ops.moments_dtype(weight.dtype)
        n, dev = self.neurons, weight.device
        self.track = {"activation": activations, "gradient": gradients,
                      "weight": weights, "bias": biases and bias is not None}
        self.buffers: dict[str, torch.Tensor] = {}
        for kind_ in ("activation", "gradient"):
            if self.track[kind_]:
                self.buffers[f"{kind_}.counts"] = torch.zeros(3, n, dtype=torch.int64, device=dev)
                self.buffers[f"{kind_}.moments"] = torch.zeros(3, n, dtype=self.dtype, device=dev)
        if self.track["weight"]:
            self._add_temporal("weight", self.weight_observation(weight))
        if self.track["bias"]:
            self._add_temporal("bias", bias)
        self.sampling = True  # observe this step's forwards and backwards (set by the Monitor)

    def weight_observation(self, weight: torch.Tensor) -> torch.Tensor:
        """What one step records of the weight: every element, or each neuron's RMS weight."""
        w = weight.detach()
        if self.weight_mode == "element":
            return w
        # One read of the weight, accumulated in float32 (a square-mean-sqrt chain made a
        # weight-sized temporary: 2.1x slower on 4 x 2048x2048).
        # A neuron with no incoming weight has no RMS: 0 / 0 = nan, counted as non-finite.
        fan_in = math.prod(w.shape[1:])
        return torch.linalg.vector_norm(w.reshape(self.neurons, fan_in), dim=1,
                                        dtype=torch.float32).div_(math.sqrt(fan_in))

    def observing(self) -> bool:
        return self.sampling and (self.track["activation"] or self.track["gradient"])

    def _add_temporal(self, kind: str, observed: torch.Tensor) -> None:
        for part, t in zip(TEMPORAL_PARTS, ops.new_state(observed, self.dtype)):
            self.buffers[f"{kind}.{part}"] = t

    def temporal_state(self, kind: str) -> list[torch.Tensor]:
        """The (tally, skipped, moments) buffers of "weight" or "bias"."""
        return [self.buffers[f"{kind}.{part}"] for part in TEMPORAL_PARTS]

    def merge(self, kind: str, stats) -> None:
        if stats is not None and self.track[kind]:
            ops.merge_stats(self.buffers[f"{kind}.counts"], self.buffers[f"{kind}.moments"], *stats)

    def reset(self) -> None:
        for t in self.buffers.values():
            t.zero_()
