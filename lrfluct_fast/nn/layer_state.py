"""LayerState: one monitored layer's running statistics, as device buffers.

Owns the buffers (activation and gradient (counts, moments), weight and bias temporal state),
the decision whether a forward is observed, and the merge of a forward's and a backward's
batch statistics into the buffers. It never touches the module's parameters, its output or
its gradients, and never synchronises with the host. Under FSDP2 the weight and bias temporal
state is of this rank's shard (fsdp.LocalShard), the activation and gradient state of all neurons.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _backend, drift as drift_, fsdp, ops
from ..layers import LayerKind, parameter_value

TEMPORAL_PARTS = ("tally", "skipped", "moments", "master")  # buffer names of a temporal state (ops.new_state)


def _functorch_active() -> bool:
    # dynamo answers this call with an interpreter of its own while it traces
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


def _forward_ad_active() -> bool:
    return torch.autograd.forward_ad._current_level >= 0


class GradScale:
    """A torch.amp.GradScaler's scale as the backward saw it, shared by a Monitor's layers.

    dL/dz in a backward is (true dL/dz) x scale; the scale changes only in scaler.update(),
    which lowers it exactly when the step was skipped (an inf or nan gradient), so comparing
    the scale after update() with the one the backward used tells a skipped step on the
    device, without a host synchronisation.
    """

    def __init__(self, scaler):
        self.scaler = scaler
        self.used: torch.Tensor | None = None  # the scale of this step's backward

    def unscale_factors(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[1/s, 1/s^2, 1/s] as a [3, 1] column for (MEAN, M2, SHIFT); None when not scaling."""
        scale = getattr(self.scaler, "_scale", None)
        if not self.scaler.is_enabled() or scale is None:
            return None
        if self.used is None:
            self.used = scale.detach().clone()
        inv = scale.detach().to(dtype).reciprocal().reshape(())  # a power of two: exact
        return torch.stack([inv, inv * inv, inv]).view(3, 1)

    def kept(self, device) -> torch.Tensor:
        """0-d int64, 1 unless the step just ended was skipped; call after scaler.update()."""
        scale = getattr(self.scaler, "_scale", None)
        if self.used is None or scale is None:
            return torch.ones((), dtype=torch.int64, device=device)
        keep = (scale.reshape(()) >= self.used.reshape(())).to(device=device, dtype=torch.int64)
        self.used.copy_(scale)
        return keep


class LayerState:
    """Running statistics of one layer.

    `kind` (lrfluct_fast.layers) says where the module's neurons are. `grad_scale`, when
    given, is the GradScale of a torch.amp.GradScaler whose scale multiplies dL/dz; gradient
    statistics are then unscaled and wait in a per-step buffer that Monitor.step commits, or
    drops when the scaler skipped the step.
    """

    def __init__(self, name: str, module: nn.Module, kind: LayerKind, *, activations: bool,
                 gradients: bool, weights: bool, biases: bool, weight_mode: str,
                 drift: bool = False, grad_scale: GradScale | None = None):
        self.name = name
        self.kind = kind
        self.rows = kind.rows(module) if kind.rows is not None else None
        self.params = {role: spec[0] for role, spec in (("weight", kind.weight), ("bias", kind.bias))
                       if spec is not None and parameter_value(module, spec[0]) is not None}
        weight = parameter_value(module, self.params["weight"]) if "weight" in self.params else None
        bias = parameter_value(module, self.params["bias"]) if "bias" in self.params else None
        self._module_type = type(module)
        self._weight_rows = lambda t, m=module: kind.neuron_rows_of_weight(m, t)
        if weight is not None:
            self.neurons = self.weight_rows(torch.empty(weight.shape, device="meta")).shape[0]
        elif kind.neurons is not None:  # per-neuron weights in several parameters, tracked alone
            self.neurons, weights = kind.neurons(module), False
        else:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight "
                             f"{kind.weight[0] if kind.weight else ''!r} to say how many neurons it has")
        reference = weight if weight is not None else next(module.parameters())
        self.weight_shape = tuple(weight.shape) if weight is not None else None
        self.weight_mode = weight_mode
        self.dtype = ops.moments_dtype(reference.dtype)
        self.device = reference.device
        self.grad_scale = grad_scale
        n, dev = self.neurons, reference.device
        if self.rows is None:  # a parameter alone: nothing flows through it to observe
            activations = gradients = False
        self.track = {"activation": activations, "gradient": gradients,
                      "weight": weights, "bias": biases and bias is not None}
        if bias is not None and bias.numel() != self.neurons:
            raise ValueError(f"layer {name!r}: its bias has {bias.numel()} elements for "
                             f"{self.neurons} neurons")
        self.buffers: dict[str, torch.Tensor] = {}
        for stat in ("activation", "gradient"):
            if self.track[stat]:
                self.buffers[f"{stat}.counts"] = torch.zeros(3, n, dtype=torch.int64, device=dev)
                self.buffers[f"{stat}.moments"] = torch.zeros(3, n, dtype=ops.STATS_DTYPE, device=dev)
        # dL/dz of this step, unscaled, until Monitor.step knows whether the scaler kept the step
        self.staged = None
        if grad_scale is not None and gradients:
            self.staged = (torch.zeros(3, n, dtype=torch.int64, device=dev),
                           torch.zeros(3, n, dtype=ops.STATS_DTYPE, device=dev))
        self.weight_id = id(weight)
        self.weight_shared_with: str | None = None  # the layer that records a tied weight
        # FSDP2: the weight and bias temporal state covers this rank's shard only (fsdp.py)
        self.shards = fsdp.shards_of(name, {"weight": weight, "bias": bias})
        # neuron mode with each rank holding a part of every neuron: the RMS needs every rank
        self.neurons_split = ("weight" in self.shards and weight_mode == "neuron"
                              and self.track["weight"] and fsdp.neurons_split(name, kind, weight))
        if self.track["weight"]:  # (the split RMS is a collective: not computed here)
            self._add_temporal("weight", torch.empty(self.neurons, device=dev) if self.neurons_split
                               else self.weight_observation(self.local_value("weight", weight)))
        if self.track["bias"]:
            self._add_temporal("bias", self.local_value("bias", bias))
        if drift and self.track["weight"]:  # each neuron's distance from its first weights (drift.py)
            drift_.add_state(self, self.local_value("weight", weight))
        self.bias_shape = None if bias is None else tuple(bias.shape)
        # the neurons are one dim of the output (`dim_of`): z is read in place as [B, N, S]
        self._dim_of = getattr(self.rows, "dim_of", None)
        # the C++ eager path (csrc/observe.cpp): the extension is built, the neurons are one dim
        # of the output, and no GradScaler asks for staged statistics
        self.observer = None
        if (self._dim_of is not None and grad_scale is None and _backend.cpp_error() is None
                and (self.track["activation"] or self.track["gradient"])):
            from .. import _C
            self.observer = _C.Observer(
                n, dev, self.dtype == torch.float64,
                *(self.buffers.get(f"{stat}.{part}") for stat in ("activation", "gradient")
                  for part in ("counts", "moments")))
        self._paused = False   # inside Monitor.paused()
        self._sampling = True  # observe this step's forwards and backwards (set by the Monitor)
        self.unobserved = None  # why the last forward was not observed (for the no-data warning)

    # -- forward / backward -----------------------------------------------------------------
    def observe(self, module: nn.Module, result):
        """The module's forward result, its observed tensor passed through Observe when this
        forward is a training observation; as it is otherwise."""
        if self.why_unobserved(module) is not None:
            return result
        kind = self.kind
        observed = self.observe_tensor(kind.output(result) if kind.output else result)
        return kind.rebuild(result, observed) if kind.rebuild else observed

    def observe_tensor(self, z: torch.Tensor, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """z through Observe: all of the layer's neurons, or the block `columns` = (start,
        stop) of them (an attention's query projection apart from its key/value one)."""
        from .observe import Observe  # observe.py needs nothing of this module at import
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"layer {self.name!r}: its output must be a floating-point tensor, "
                            f"got {getattr(z, 'dtype', type(z).__name__)}")
        self.check_placement("its output", z)
        if self.observer is not None and columns is None and not torch.compiler.is_compiling():
            dim = self._dim_of(z)
            if dim is not None and z.shape[dim] == self.neurons:
                self.observer.set_layout(z.dim(), dim % z.dim())
                observed = self.observer.observe(z)
                if observed is not None:
                    return observed
        pending = self._stats(z, columns) if self.track["activation"] else (None, None)
        if not z.requires_grad:
            # no backward will reach this forward (a frozen layer fed by frozen layers): count
            # its activations now
            self.merge("activation", pending)
            self.unobserved = "its output needs no gradient (frozen parameters and input)"
            return z
        return Observe.apply(z, *pending, self, columns)

    def why_unobserved(self, module: nn.Module) -> str | None:
        """None when this forward of `module` is a training observation, else why not ("" when
        by the user's choice); remembered for the no-data warning."""
        reason = self._unobserved_reason(module)
        if reason:
            self.unobserved = reason
        return reason

    def _stats(self, t: torch.Tensor, columns):
        counts, moments = ops.batch_stats(self._rows(t, columns))
        if columns is None:
            return counts, moments
        start, stop = columns  # the other neurons get count 0: a merge leaves them as they are
        full = counts.new_zeros(3, self.neurons), moments.new_zeros(3, self.neurons)
        full[0][:, start:stop] = counts
        full[1][:, start:stop] = moments
        return full

    def _rows(self, t: torch.Tensor, columns=None) -> torch.Tensor:
        """t (z or dL/dz) as [R, N] or [B, N, S] (N: the neurons in `columns`); refuses an
        output whose neurons do not match the weight's."""
        t = t.detach()
        dim = self._dim_of(t) if self._dim_of is not None and columns is None else None
        rows = ops.neuron_view(t, dim) if dim is not None else self.rows(t)
        width = self.neurons if columns is None else columns[1] - columns[0]
        if rows.dim() not in (2, 3) or rows.shape[1] != width:
            raise ValueError(
                f"layer {self.name!r} ({self._module_type.__name__}): its output {list(t.shape)} "
                f"viewed by its layer kind gives {list(rows.shape)}, not [rows, {width}] "
                f"for its {self.neurons} neurons; the kind registered for it does not fit this "
                f"module (lf.register_layer)")
        return rows

    def weight_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as [N, fan_in], neuron j's incoming weights in row j."""
        return self._weight_rows(t)

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = bool(value)
        self._sync_observer()

    @property
    def sampling(self) -> bool:
        return self._sampling

    @sampling.setter
    def sampling(self, value: bool) -> None:
        self._sampling = bool(value)
        self._sync_observer()

    def _sync_observer(self) -> None:
        if self.observer is not None:
            self.observer.observing = self._sampling and not self._paused
            self.observer.live = not self._paused

    def _unobserved_reason(self, module) -> str | None:
        """None for a training observation, else why not ("" when by the user's choice)."""
        if self.paused or not self.sampling:
            return ""
        if not module.training:
            return "the module is in eval mode (call model.train())"
        if not torch.is_grad_enabled():
            return "gradients are disabled (torch.no_grad / inference_mode)"
        if not (self.track["activation"] or self.track["gradient"]):
            return "activations and gradients are not tracked"
        if _functorch_active() or _forward_ad_active():
            return "it ran inside a torch.func transform or forward-mode AD"
        return None

    def observe_backward(self, pending, grad_z: torch.Tensor, columns=None) -> None:
        """One backward through an observed forward: merge its activation stats and dL/dz's."""
        if self.paused:
            return
        buffers = self.buffers
        if self.track["gradient"] and self.staged is None and columns is None:
            # one op: dL/dz's statistics and the pending activation ones merged (two launches
            # on a GPU)
            into = () if pending[0] is None else (
                *pending, buffers["activation.counts"], buffers["activation.moments"])
            ops.accumulate_stats(self._rows(grad_z), buffers["gradient.counts"],
                                 buffers["gradient.moments"], *into)
            return
        if pending[0] is not None:
            self.merge("activation", pending)
        if self.track["gradient"]:
            stats = self._stats(grad_z, columns)
            if self.staged is None:
                self.merge("gradient", stats)
            else:
                self._stage_unscaled(*stats)

    # -- mixed precision --------------------------------------------------------------------
    def _stage_unscaled(self, counts, moments) -> None:
        factors = self.grad_scale.unscale_factors(moments.dtype)
        if factors is not None:
            moments = moments * factors
        ops.merge_stats(*self.staged, counts, moments)

    def commit_staged(self, keep: torch.Tensor) -> None:
        """Merge this step's staged gradient statistics when `keep` (a 0-d 0/1 int64 tensor)."""
        counts, moments = self.staged
        ops.merge_stats(self.buffers["gradient.counts"], self.buffers["gradient.moments"],
                        counts * keep, moments)
        counts.zero_()
        moments.zero_()

    # -- weights ----------------------------------------------------------------------------
    def weight_observation(self, weight: torch.Tensor) -> torch.Tensor:
        """What one step records of the weight: every element, or each neuron's RMS weight."""
        w = weight.detach()
        if self.weight_mode == "element":
            return w
        # One read of the weight, accumulated in float32 (a square-mean-sqrt chain made a
        # weight-sized temporary: 2.1x slower on 4 x 2048x2048).
        # A neuron with no incoming weight has no RMS: 0 / 0 = nan, counted as non-finite.
        if self.kind.weight_rows is None:  # neurons along one axis: reduce the others in place
            axis = self.neuron_axis(w.dim())
            others = [d for d in range(w.dim()) if d != axis]
            fan_in = math.prod(w.shape[d] for d in others)
            if not others:
                return w.float().abs()
            if self.neurons_split:  # w is this rank's shard: part of every neuron's weights
                return fsdp.rms_over_ranks(w, others, self.shards["weight"].global_shape)
            return torch.linalg.vector_norm(w, dim=others, dtype=torch.float32).div_(math.sqrt(fan_in))
        rows = self.weight_rows(w)
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).div_(math.sqrt(rows.shape[1]))

    def neuron_axis(self, ndim: int) -> int:
        """The axis of a weight of rank `ndim` that holds the neurons, for a kind without
        weight_rows (the RMS reduces every other axis)."""
        return self.kind.weight[1] % ndim

    def rms_source(self, weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """(t, axis): weight_observation's per-neuron RMS is that of t over every axis but
        `axis`, and t is the weight or a contiguous view of it, so the C++ step can read it
        in place (monitor._StepPlan). None in element mode, for neurons split between ranks
        and for rows the kind computes as a copy."""
        if self.weight_mode != "neuron" or self.neurons_split:
            return None
        w = weight.detach()
        if self.kind.weight_rows is None:
            return w, self.neuron_axis(w.dim())
        rows = self.weight_rows(w)  # a norm's [N, 1]: a view
        if rows.is_contiguous() and rows.data_ptr() == w.data_ptr() and rows.numel() == w.numel():
            return rows, 0
        return None

    def local_value(self, role: str, value: torch.Tensor) -> torch.Tensor:
        """What this rank records of its weight or bias `value` as read from the module: the
        value, or this rank's shard of it when FSDP2 shards it."""
        shard = self.shards.get(role)
        if shard is not None:
            return shard.local(value)
        if fsdp.is_dtensor(value):
            raise ValueError(f"layer {self.name!r}: its {role} is a DTensor now but was not when "
                             f"instrumented: the model was sharded (fully_shard) after "
                             f"instrument(); {fsdp.INSTRUMENT_AFTER}")
        return value

    def recorded_shape(self, role: str) -> tuple:
        """The shape of what step() records of the weight or bias (its local shard under FSDP)."""
        shard = self.shards.get(role)
        if shard is not None:
            return shard.local_shape
        return self.weight_shape if role == "weight" else self.bias_shape

    def check_placement(self, what: str, t: torch.Tensor, shape: tuple | None = None) -> None:
        """Refuse a tensor of the layer (its output, weight or bias) moved, cast or (a
        parameter, `shape` given) replaced by one of another shape since instrument, before
        any statistic is touched."""
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"layer {self.name!r}: {what} has shape {list(t.shape)}, but it had "
                             f"{list(shape)} when instrumented: a parameter was replaced; "
                             f"instrument the model again (mon.remove(); lf.instrument(model))")
        if t.device != self.device or ops.moments_dtype(t.dtype) != self.dtype:
            raise RuntimeError(
                f"layer {self.name!r}: {what} is now {t.dtype} on {t.device}, but it was "
                f"instrumented for {self.dtype} statistics on {self.device}: move or cast the "
                f"model before instrumenting it (mon.remove(); model.to(...); "
                f"mon = lf.instrument(model))")

    def _add_temporal(self, kind: str, observed: torch.Tensor) -> None:
        for part, t in zip(TEMPORAL_PARTS, ops.new_state(observed, self.dtype)):
            self.buffers[f"{kind}.{part}"] = t

    def share_weight_state(self, owner: "LayerState") -> None:
        """Record a tied weight once: this layer reads `owner`'s per-element temporal state of
        the same parameter (Monitor.step updates it through the owner only)."""
        for part in TEMPORAL_PARTS:
            self.buffers[f"weight.{part}"] = owner.buffers[f"weight.{part}"]
        self.weight_shared_with = owner.name

    def temporal_state(self, kind: str, buffers=None) -> list[torch.Tensor]:
        """The (tally, skipped, moments, master) buffers of "weight" or "bias": the live ones,
        or those in `buffers` ({buffer key: tensor}, a copy of this layer's)."""
        return [(self.buffers if buffers is None else buffers)[f"{kind}.{part}"]
                for part in TEMPORAL_PARTS]

    # -- state ------------------------------------------------------------------------------
    @staticmethod
    def upgrade_single_level(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Buffers saved before the temporal state had a master (state_dict version 2), in
        this layout: each single-level temporal state becomes an open block (a whole-run total
        of windows.py: its master)."""
        from .. import windows
        out = dict(saved)
        for kind in ("weight", "bias", "run.weight", "run.bias"):
            if f"{kind}.tally" in saved and f"{kind}.master" not in saved:
                parts = ops.upgrade_single_level(*(saved[f"{kind}.{p}"] for p in TEMPORAL_PARTS[:3]))
                if kind.startswith(windows.RUN):
                    parts = windows.as_total(parts)
                out.update(zip((f"{kind}.{p}" for p in TEMPORAL_PARTS), parts))
        return out

    def merge(self, kind: str, stats) -> None:
        if stats[0] is not None and self.track[kind]:
            ops.merge_stats(self.buffers[f"{kind}.counts"], self.buffers[f"{kind}.moments"], *stats)

    def reset(self) -> None:
        for t in self.buffers.values():
            t.zero_()
        if self.staged is not None:
            for t in self.staged:
                t.zero_()
