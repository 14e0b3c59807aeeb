"""fsdp: models sharded by FSDP2 (torch.distributed.fsdp.fully_shard).

Owns what is specific to sharded parameters: the check of a model's sharding at instrument,
where a rank's local shard lies in the whole parameter (LocalShard), and the per-neuron weight
and bias spreads of sharded layers, summed across ranks when a summary is taken or logged.

How a sharded model is monitored (instrument after fully_shard, on every rank):
- FSDP2 shards each parameter along dim 0 (torch.chunk: rank r holds rows
  [r * ceil(n / world), ...), possibly none), so the weight and bias temporal state of a layer
  is kept for the local shard only: per-rank monitor memory of the weights is about 1/world of
  the unsharded monitor's. Monitor.step reads the local shard of the sharded parameter (the one
  the optimizer updates; with a MixedPrecisionPolicy, the float32 one, not the bf16 copy used
  in the forward).
- Activations and gradients are observed in the unsharded forward and backward, as without
  FSDP: every rank holds all N neurons' statistics of its own batches, merged across ranks
  by distributed.py.
- A summary holds "weight.spread" and "bias.spread" for the whole layer in neuron order on
  every rank: each rank sums, per neuron, the temporal variances of the elements of its shard,
  and one all_reduce adds the ranks' sums. The per-element "weight.temporal_var" (the size of
  the model) is not gathered: it is absent from the summaries of sharded layers.
  weight_mode="neuron" records each neuron's RMS weight: computed in the shard when the
  shard holds whole neurons (neurons on dim 0); when the neurons lie on another axis
  (Embedding, transformers' Conv1D) every rank holds a part of each, and Monitor.step adds
  the ranks' sums of squares with one all_reduce per such layer (the same [N] state on every
  rank). A ConvTranspose in neuron mode is refused (weight_mode="element" serves it).
- A module fully_shard made an FSDP class of (FSDPLinear) is wrapped as any module: its
  wrapper class (FluctFSDPLinear) derives from FSDP's, so FSDP's methods and hooks stay, and
  Monitor.remove() gives FSDP's class back.
- Monitor.state_dict() holds this rank's shards and says so ("sharding": world size, rank):
  save it per rank with the model's checkpoint (torch.distributed.checkpoint), load it on the
  same rank of the same number of ranks; any other is refused (no resharding).
Refused with an error: FSDP1 (FullyShardedDataParallel), DTensor parameters that fully_shard
did not make (tensor parallel), placements other than Shard(0) on a 1-D mesh over every rank
(HSDP, 2-D parallelism, shard_placement_fn), instrument while FSDP holds unsharded parameters,
and a model sharded after instrument (at the next Monitor.step).
This module never changes the model, its parameters or the statistics' buffers.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from . import ops

INSTRUMENT_AFTER = "instrument after fully_shard (mon.remove(); mon = lf.instrument(model))"


def _dtensor_module():
    # nothing can be a DTensor unless its module was imported: importing it costs time
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(t) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def _fsdp2_module_class():
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def _fsdp_params(module: nn.Module):
    """The FSDPParams an FSDP2 module manages (torch's internal state; 2.13's layout)."""
    group = module._get_fsdp_state()._fsdp_param_group
    return group.fsdp_params if group is not None else []


def check_model(model: nn.Module) -> None:
    """Raise ValueError for a sharding lrfluct_fast cannot monitor (module docstring)."""
    fsdp2 = _fsdp2_module_class()
    managed = {}  # id(sharded parameter) -> name of the FSDP2 module managing it
    for name, m in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if fsdp2 is not None and isinstance(m, fsdp2):
            for fp in _fsdp_params(m):
                info = fp._module_info
                if info.module._parameters.get(info.param_name) is not fp.sharded_param:
                    raise ValueError(
                        f"{where} (fully_shard) holds its unsharded parameters now (after a "
                        f"forward with reshard_after_forward=False?): call instrument() while "
                        f"FSDP holds the sharded ones (before the first forward, or after "
                        f"model.reshard())")
                managed[id(fp.sharded_param)] = name
        elif any(c.__module__.startswith("torch.distributed.fsdp") for c in type(m).__mro__):
            raise ValueError(f"{where} is sharded by FSDP1 ({type(m).__name__}), which lrfluct_fast "
                             f"does not support: shard the model with FSDP2 "
                             f"(torch.distributed.fsdp.fully_shard), then instrument it")
    for name, p in model.named_parameters():
        if is_dtensor(p):
            if id(p) not in managed:
                raise ValueError(
                    f"parameter {name!r} is a DTensor that fully_shard did not make (tensor "
                    f"parallel or distribute_tensor, placements {tuple(p.placements)}): "
                    f"lrfluct_fast supports DTensors only as FSDP2 shards them (Shard(0))")
            check_placement(name, p)


def check_placement(name: str, p) -> None:
    """Refuse a sharded parameter that is not Shard(0) over a 1-D mesh of every rank."""
    placements = tuple(p.placements)
    mesh = p.device_mesh
    shard0 = _dtensor_module().Shard(0)
    if mesh.ndim != 1 or placements != (shard0,):
        raise ValueError(f"parameter {name!r} is sharded with placements {placements} on a "
                         f"{mesh.ndim}-D mesh: lrfluct_fast supports FSDP2's Shard(0) on a 1-D "
                         f"mesh only (not HSDP, tensor parallel or a shard_placement_fn)")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh.size() != world:
        raise ValueError(f"parameter {name!r} is sharded over {mesh.size()} of the {world} ranks: "
                         f"lrfluct_fast needs the FSDP mesh to span every rank of the process group")


class LocalShard:
    """Where this rank's shard of a parameter FSDP2 shards on dim 0 lies: rows
    [start, start + rows) of the whole parameter (torch.chunk's split, the last ranks' shards
    may be smaller or empty)."""

    def __init__(self, what: str, param):
        mesh = param.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        n = param.shape[0]
        chunk = -(-n // world)
        self.start = min(rank * chunk, n)
        self.rows = min(chunk, n - self.start)
        local = param.to_local()
        if local.shape[0] != self.rows:
            raise ValueError(f"{what}: its local shard has {local.shape[0]} rows, not the "
                             f"{self.rows} of torch.chunk's split of {n} rows over {world} ranks")
        self.global_shape = tuple(param.shape)
        self.local_shape = tuple(local.shape)
        self.param = param

    def local(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the parameter read from its module: `value` is the sharded
        DTensor, or (between FSDP's all-gather and its reshard) the unsharded tensor, when the
        sharded parameter seen last stands for it."""
        if is_dtensor(value):
            self.param = value
        return self.param.to_local()


def shards_of(layer: str, values: dict) -> dict[str, LocalShard]:
    """{role: LocalShard} of the DTensor values among {role: tensor or None}."""
    out = {}
    for role, value in values.items():
        if is_dtensor(value):
            if not isinstance(value, nn.Parameter):
                raise ValueError(f"layer {layer!r}: its {role} is computed from a sharded "
                                 f"parameter (a parametrization): not supported under FSDP")
            check_placement(f"{layer}.{role}", value)
            out[role] = LocalShard(f"layer {layer!r}: its {role}", value)
    return out


def neurons_split(layer: str, kind, weight) -> bool:
    """weight_mode="neuron" on a sharded weight: False when each shard holds whole neurons
    (neurons on dim 0), True when every rank holds a part of each (neurons on another axis:
    Embedding, transformers' Conv1D); refused for a layout only the kind's weight_rows knows."""
    axis = kind.weight[1] % weight.dim()
    if axis != 0 and kind.weight_rows is not None:
        raise ValueError(f"layer {layer!r} ({type(weight).__name__} weight of "
                         f"{list(weight.shape)}): weight_mode='neuron' cannot split its neurons' "
                         f"weights between FSDP shards: use weight_mode='element'")
    return axis != 0


def rms_over_ranks(local: torch.Tensor, dims: list[int], whole_shape: tuple) -> torch.Tensor:
    """float32 [N]: each neuron's RMS weight when every rank holds some of its weights (dims:
    the axes other than the neurons'); the ranks' sums of squares added by one all_reduce, a
    collective in Monitor.step."""
    squares = torch.linalg.vector_norm(local, dim=dims, dtype=torch.float32).square_()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squares)
    fan_in = 1
    for d in dims:
        fan_in *= whole_shape[d]
    return squares.div_(fan_in).sqrt_()


def sharded_roles(state) -> set[str]:
    """The roles ("weight", "bias") whose temporal state holds a local shard only (not the
    per-neuron RMS of split neurons, the same on every rank)."""
    return {role for role in state.shards
            if state.track[role] and not (role == "weight" and state.neurons_split)}


def gathered_spreads(states, buffers=None) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"weight.spread" / "bias.spread": float64 [N]}} of every layer with a sharded
    weight or bias, the whole layer in neuron order, on every rank: a collective (one
    all_reduce) when any layer is sharded, else {} with no communication. Read from
    `buffers` ({layer: {buffer key: tensor}}, a copy of one moment) or the live state."""
    parts, layout = [], []
    for name, st in states:
        for role in sorted(sharded_roles(st)):
            temporal = st.temporal_state(role, None if buffers is None else buffers[name])
            sums, fan_in = _local_sums(st, role, temporal)
            parts.append(sums)
            layout.append((name, role, fan_in))
    if not parts:
        return {}
    flat = torch.cat(parts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (name, role, fan_in), total in zip(layout, flat.split([p.numel() for p in parts])):
        out.setdefault(name, {})[f"{role}.spread"] = (total / fan_in).sqrt()
    return out


def _local_sums(state, role: str, temporal) -> tuple[torch.Tensor, int]:
    """float64 [N]: per neuron, the sum of the temporal variances of this rank's elements of it
    (0 for neurons it holds none of), and the number of elements per neuron in the whole layer;
    `temporal`: the role's (tally, skipped, moments, master)."""
    shard = state.shards[role]
    _, _, var = ops.temporal_stats(*temporal)
    var = var.to(torch.float64)
    out = var.new_zeros(state.neurons)
    if role == "bias" or state.weight_mode == "neuron":  # one value per neuron, dim 0 first
        per_row = var.numel() // max(shard.rows, 1)
        out[shard.start * per_row:shard.start * per_row + var.numel()] = var.reshape(-1)
        return out, 1
    fan_in = state.weight_rows(torch.empty(shard.global_shape, device="meta")).shape[1]
    if state.kind.weight_rows is None:  # neurons along one axis: the local rows are a slice
        sums = state.weight_rows(var).sum(1)
        if state.kind.weight[1] % var.dim() == 0:
            out[shard.start:shard.start + shard.rows] = sums   # whole neurons of this rank
        else:
            out += sums                                        # a share of every neuron
        return out, fan_in
    # a layout only the kind's weight_rows knows (grouped transposed convs, norms): the local
    # rows in a zero weight-shaped tensor, one layer at a time
    whole = var.new_zeros(shard.global_shape)
    whole[shard.start:shard.start + shard.rows] = var
    return state.weight_rows(whole).sum(1), fan_in


def sharding_info(states) -> dict | None:
    """What a saved monitor state depends on when it holds local shards: None, or
    {"world_size", "rank"}."""
    if not any(sharded_roles(st) for _, st in states):
        return None
    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "rank": dist.get_rank() if dist.is_initialized() else 0}


def check_resume(saved: dict | None, now: dict | None) -> None:
    """Refuse a monitor state of other shards: another world size, rank or sharding."""
    if saved == now:
        return
    if saved is None or now is None:
        raise ValueError(f"monitor state saved {'without' if saved is None else 'with'} FSDP "
                         f"sharding, loaded into a monitor {'with' if saved is None else 'without'} "
                         f"it: the weight statistics cover other tensors")
    if saved["world_size"] != now["world_size"]:
        raise ValueError(f"monitor state saved on {saved['world_size']} FSDP ranks, loaded on "
                         f"{now['world_size']}: each rank's weight statistics cover its own "
                         f"shard, which changes with the world size; resume on "
                         f"{saved['world_size']} ranks (resharding is not supported)")
    raise ValueError(f"monitor state of rank {saved['rank']} loaded on rank {now['rank']}: "
                     f"load each rank's own state")
