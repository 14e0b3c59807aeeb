"""baselines: hook-based capture of the DESIGN statistics, the way people do it today.

Two monitors with the Monitor's API (step, summary, metrics, reset, remove, layers):
  HookSnapshot   keeps float64 CPU copies of every counted z, every dL/dz and the weights
                 and biases after every step, and computes summary() from them with
                 two-pass formulas. Memory grows with every step. It is the float64
                 reference the whole project's tests compare against.
  HookStreaming  streams the same statistics with torch ops inside the hooks: per-batch
                 masked mean/M2 in float32 on the tensor's device, Chan-merged into running
                 float32 state (counts int64); weights and biases by a shifted Welford
                 update per element (ops.temporal_update_torch).
                 Memory is flat over steps.
Both compute statistics with the package's plain-torch ops (ops.batch_stats_reference in
float64 for the snapshot, ops.batch_stats_torch / merge_stats_torch for streaming): they
share the definitions, never the fused kernels or the wrappers being benchmarked.

They share everything but storage: hook registration, the [R, N] view of a layer's output,
the counting rules and the summary assembly live in _HookMonitor; a subclass only says how
an observation is captured, committed and turned into packed (counts, moments) statistics.

Counting rules (DESIGN section 1, nn/observe.py): a forward is counted when a backward
reaches it, and only if it ran in training mode with grad enabled; it is captured in the
forward hook (so in-place ops after the layer cannot alter it) and committed, with dL/dz, by
a pre-hook on the autograd node that made the output. Every backward through that node
commits both again (retain_graph); a forward whose output needs no gradient is committed at
once. So gradient accumulation counts every micro-batch, a forward whose backward never runs
is not counted, and an activation-checkpoint recompute is counted once.
This module owns its hooks and its statistics; it never modifies the model, its parameters
or gradients.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import metrics, ops
from .layers import kind_of, parameter_value

KINDS = ("activation", "gradient", "weight", "bias")


def neuron_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The [R, N] view the wrappers use (lrfluct_fast.layers)."""
    return kind_of(module).rows(module)(t)


def _parameter(module: nn.Module, role: str):
    """The module's "weight" or "bias" as its layer kind names it (None when absent)."""
    spec = getattr(kind_of(module), role)
    return None if spec is None else parameter_value(module, spec[0])


def _hookable(model: nn.Module, name: str, m: nn.Module) -> bool:
    """A module whose neurons a forward hook sees: a layer kind observing its output, not
    inside one whose neurons are inside its forward (an attention's projections)."""
    kind = kind_of(m)
    if kind is None or kind.rows is None or kind.around is not None:
        return False
    if kind.check is not None and kind.check(m) is not None:
        return False
    parts = name.split(".")
    for i in range(1, len(parts)):
        outer = kind_of(model.get_submodule(".".join(parts[:i])))
        if outer is not None and outer.around is not None:
            return False
    return True


class _HookMonitor:
    """Hooks, counting rules and summary assembly shared by both baselines."""

    def __init__(self, model: nn.Module, dead_threshold: float = 0.01):
        self.dead_threshold = dead_threshold
        self._modules = {name: m for name, m in model.named_modules() if _hookable(model, name, m)}
        self.layers = list(self._modules)
        self._removed = False
        self._handles = [m.register_forward_hook(self._forward_hook(name))
                         for name, m in self._modules.items()]
        self.reset()

    # -- what a subclass provides -------------------------------------------------------
    def _capture(self, x: torch.Tensor):
        """Turn an observation x [R, N] into what _commit stores (called in the hooks)."""
        raise NotImplementedError

    def _commit(self, name: str, kind: str, captured) -> None:
        raise NotImplementedError

    def _stats(self, name: str, kind: str):
        """Packed (counts, moments) of everything committed, or None if nothing was."""
        raise NotImplementedError

    def _observe_parameter(self, name: str, kind: str, value: torch.Tensor) -> None:
        """Record one step's value of a weight or bias."""
        raise NotImplementedError

    def _parameter_var(self, name: str, kind: str):
        """Per-element temporal variance (numpy, float64) of a weight or bias, or None."""
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(module, args, out):
            if self._removed or not (module.training and torch.is_grad_enabled()):
                return
            if not isinstance(out, torch.Tensor):
                return
            copied = out._is_view()
            if copied:  # an in-place op on a view (ReLU(inplace=True) after a Linear on
                # [B, T, d]) rewrites its base's history, and the view's node would never run:
                # observe a copy, whose node runs either way
                out = out.clone()
            captured = self._capture(neuron_rows(module, out.detach()))
            if out.grad_fn is None:  # no backward will come (frozen layer and input): count now
                self._commit(name, "activation", captured)
                return out if copied else None
            at = out.output_nr

            def grad_hook(grad_outputs):
                # a hook on the node that made z, not on z: an in-place op after the layer
                # (ReLU(inplace=True)) gives z a new node, and a tensor hook dL/d(new z)
                if not self._removed:
                    self._commit(name, "activation", captured)
                    self._commit(name, "gradient", self._capture(neuron_rows(module, grad_outputs[at].detach())))

            out.grad_fn.register_prehook(grad_hook)
            return out if copied else None
        return hook

    # -- Monitor API ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Record the current weights and biases as one observation (call after opt.step())."""
        if self._removed:
            return
        self._steps += 1
        for name, m in self._modules.items():
            for role in ("weight", "bias"):
                value = _parameter(m, role)
                if value is not None:
                    self._observe_parameter(name, role, value.detach())

    def reset(self) -> None:
        """Forget every statistic and the step count; hooks stay in place."""
        self._steps = 0
        self._clear()

    def remove(self) -> None:
        """Remove the hooks; backwards of forwards already run are ignored from now on."""
        self._removed = True
        for h in self._handles:
            h.remove()
        self._handles = []

    def _packed(self, name: str, kind: str, size: int):
        stats = self._stats(name, kind)
        if stats is None:
            return np.zeros((3, size), np.int64), np.zeros((3, size), np.float64)
        return stats[0].cpu().numpy(), stats[1].cpu().numpy()

    def _temporal_var(self, name: str, kind: str, shape) -> np.ndarray:
        var = self._parameter_var(name, kind)
        return np.full(shape, np.nan) if var is None else var.reshape(shape)

    def summary(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name, m in self._modules.items():
            weight, bias = _parameter(m, "weight"), _parameter(m, "bias")
            rows = kind_of(m).neuron_rows_of_weight(m, weight.detach().cpu().double())
            n = rows.shape[0]
            s = {}
            for kind in ("activation", "gradient"):
                s.update(metrics.summarize_stats(kind, *self._packed(name, kind, n)))
            wvar = self._temporal_var(name, "weight", weight.shape)
            s["weight.temporal_var"] = wvar
            s["weight.spread"] = metrics.weight_spread(
                kind_of(m).neuron_rows_of_weight(m, torch.from_numpy(wvar)).numpy())
            s["bias.spread"] = (np.sqrt(self._temporal_var(name, "bias", bias.shape)).reshape(-1)
                                if bias is not None else np.full(n, np.nan))
            s["steps"] = np.array(self._steps, dtype=np.int64)
            out[name] = s
        return out

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: metrics.layer_metrics(s, dead_threshold=self.dead_threshold)
                for name, s in self.summary().items()}


class HookSnapshot(_HookMonitor):
    """Full float64 CPU copies of every observation; two-pass statistics at summary()."""

    def _capture(self, x):
        return x.detach().to("cpu", torch.float64).clone()

    def _commit(self, name, kind, captured):
        self._store.setdefault((name, kind), []).append(captured)

    def _stats(self, name, kind):
        chunks = self._store.get((name, kind))
        return ops.batch_stats_reference(torch.cat(chunks)) if chunks else None

    def _observe_parameter(self, name, kind, value):
        self._commit(name, kind, self._capture(value))

    def _parameter_var(self, name, kind):
        snaps = self._store.get((name, kind))
        if not snaps:
            return None
        _, _, var = ops.temporal_stats_reference(torch.stack(snaps))
        return var.numpy()

    def _clear(self):
        self._store: dict[tuple[str, str], list[torch.Tensor]] = {}

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._store.values() for t in ts)


class HookStreaming(_HookMonitor):
    """Running float32 (count int64) statistics on the observed tensors' device."""

    def _capture(self, x):
        return ops.batch_stats_torch(x)

    def _commit(self, name, kind, captured):
        state = self._state.get((name, kind))
        if state is None:
            self._state[(name, kind)] = list(captured)
        else:
            ops.merge_stats_torch(*state, *captured)

    def _stats(self, name, kind):
        return self._state.get((name, kind))

    def _observe_parameter(self, name, kind, value):
        state = self._state.get((name, kind))
        if state is None:
            state = self._state[(name, kind)] = ops.new_state(value)
        ops.temporal_update_torch(*([t] for t in (value, *state)))

    def _parameter_var(self, name, kind):
        state = self._state.get((name, kind))
        if state is None:
            return None
        _, _, var = ops.temporal_stats(*state)
        return var.double().cpu().numpy()

    def _clear(self):
        self._state: dict[tuple[str, str], list[torch.Tensor]] = {}

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._state.values() for t in ts)
