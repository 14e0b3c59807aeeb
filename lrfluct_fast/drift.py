"""drift: each neuron's distance from its first observed weights and its mean update size.

instrument(model, drift=True) adds two per-neuron summary keys to every layer whose weights
are tracked, neuron j's weights being row j of LayerState.weight_rows (a Linear's weight row,
a conv's output-channel kernel, an Embedding's column, ... as its layer kind says):
  weight.drift        ||w_j(t_last) - w_j(t_first)||_2
  weight.update_size  mean over observed steps after the first of ||w_j(t) - w_j(t_prev)||_2
where t_first is the first observed Monitor.step since instrument or reset(), t_last the last
one, and t_prev the observed step before t. With every=k only every k-th step is observed, so
an update is the change over k optimizer steps. nan until two steps (update_size) or one step
(drift) are observed, and for a neuron whose weights were ever non-finite (summary() warns
once, naming the layer).

State per layer (LayerState buffers, so reset(), state_dict() and memory_bytes() cover it):
"drift.first" and "drift.prev", two copies of the weight in its statistics dtype (float32 for
float32 and bf16 weights), "drift.update_sum" (float64 [N]) and "drift.tally" (int64 [1],
the observed steps). The per-step pass (`DriftStep`) reads each weight once with multi-tensor
ops: prev -= w, one row-norm per layer, update_sum += norms, prev = w. "first" is read only when
a summary is taken (`per_neuron`), which turns the state into the two [N] keys on its device:
summaries and run-directory snapshots stay O(neurons). A tied weight (GPT-2's wte and
lm_head) has its copies in each of its layers, whose neurons differ (columns and rows).

Whole run only: window rows (windows.py) do not carry these keys (a window's drift would need
another weight-sized copy per window). Not supported, refused at instrument: weights sharded
by FSDP2 (a neuron's row norm would need the ranks' sums of squares all-reduced inside every
step), weights=False. In weight_mode="neuron" it works as in "element" but costs the two
weight-sized copies, so the monitor is no longer O(neurons).
This module owns the drift state and its arithmetic; it never touches the model.
"""
from __future__ import annotations

import numpy as np
import torch

KEYS = ("weight.drift", "weight.update_size")
PREFIX = "drift."
PARTS = ("first", "prev", "update_sum", "tally")


def check(states) -> None:
    """Refuse drift=True where it cannot be computed (see the module docstring)."""
    sharded = sorted(name for name, st in states.items() if "weight" in st.shards and st.track["weight"])
    if sharded:
        raise ValueError(f"drift=True is not supported for weights sharded by FSDP2 "
                         f"({', '.join(sharded[:5])}{', ...' if len(sharded) > 5 else ''}): a "
                         f"neuron's update norm would need an all_reduce inside every step; "
                         f"use drift=False")


def add_state(state, weight: torch.Tensor) -> None:
    """The drift buffers of LayerState `state`, whose recorded weight is `weight`."""
    dev = weight.device
    for part in ("first", "prev"):
        state.buffers[PREFIX + part] = torch.zeros(weight.shape, dtype=state.dtype, device=dev)
    state.buffers[PREFIX + "update_sum"] = torch.zeros(state.neurons, dtype=torch.float64, device=dev)
    state.buffers[PREFIX + "tally"] = torch.zeros(1, dtype=torch.int64, device=dev)


def has_state(buffers) -> bool:
    return PREFIX + "tally" in buffers


class DriftStep:
    """The per-step update of every drift-tracked layer's state, all layers in one pass. Its
    lists are built once per Monitor step plan."""

    def __init__(self, states):
        self.states = list(states)
        buf = [st.buffers for st in self.states]
        self.first = [b[PREFIX + "first"] for b in buf]
        self.prev = [b[PREFIX + "prev"] for b in buf]
        self.sums = [b[PREFIX + "update_sum"] for b in buf]
        self.tallies = [b[PREFIX + "tally"] for b in buf]
        self.rows = [st.weight_rows for st in self.states]

    def update(self, values: list[torch.Tensor], started: bool) -> None:
        """Record this observed step's weights `values` (one per state, in order); `started`:
        whether the first weights were taken (host side: the Monitor's count of observed steps)."""
        if not started:
            torch._foreach_copy_(self.first, values)
        else:
            torch._foreach_sub_(self.prev, values)  # prev - w: this step's change, negated
            norms = [torch.linalg.vector_norm(rows(d), dim=1) for rows, d in zip(self.rows, self.prev)]
            torch._foreach_add_(self.sums, norms)
        torch._foreach_copy_(self.prev, values)
        torch._foreach_add_(self.tallies, 1)


def per_neuron(state, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 [N] "weight.drift" and "weight.update_size" of LayerState `state` from its
    drift buffers in `buffers` (live or copies), on their device; nan where undefined."""
    tally = buffers[PREFIX + "tally"]
    change = buffers[PREFIX + "prev"] - buffers[PREFIX + "first"]
    drift = torch.linalg.vector_norm(state.weight_rows(change), dim=1, dtype=torch.float64)
    nan = torch.full_like(drift, float("nan"))
    updates = (tally - 1).to(torch.float64)
    return {"weight.drift": torch.where(tally > 0, drift, nan),
            "weight.update_size": torch.where(tally > 1, buffers[PREFIX + "update_sum"] / updates, nan)}


def reduced(state, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`buffers` with the drift state replaced by its two per-neuron keys (when it has one)."""
    if not has_state(buffers):
        return buffers
    out = {k: t for k, t in buffers.items() if not k.startswith(PREFIX)}
    out.update(per_neuron(state, buffers))
    return out


def nonfinite_layers(summaries, observed: int) -> list[str]:
    """Layers of {layer: summary} with a non-finite drift (defined after `observed` >= 1
    observed steps) or update size (after 2)."""
    defined = [key for key, need in zip(KEYS, (1, 2)) if observed >= need]
    return [name for name, s in summaries.items()
            if any(key in s and not np.isfinite(s[key]).all() for key in defined)]
