"""distributed: statistics of every rank's batches, merged when a summary is read or logged.

Owns the cross-rank merge of activation and gradient statistics under an initialized
torch.distributed process group. It never runs in the training step: the ranks exchange their
packed statistics only when a summary is taken (Monitor.summary / metrics / flush / close) or
logged (every log_every or summary_every steps), in one all_gather of one int64 tensor per
exchange (and one all_reduce of the sharded layers' spreads under FSDP2). The exchanged
(counts, moments) are merged with Chan's formula (ops.merge_stats), so the result equals
the statistics of one process that saw the union of every rank's batches. It must not
touch the LayerStates' buffers (it reads copies) nor the model.

What users rely on:
- Call instrument after init_process_group, on every rank, with the same options.
  Only rank 0 writes the run directory (torchrun's RANK is honoured when instrument runs
  before the group exists).
- summary(), metrics(), flush(), close(), and step() at a logging step are collectives
  under a process group of more than one rank: every rank calls them, in the same order.
- Weight and bias statistics are not exchanged: data-parallel ranks (DDP) hold the same
  parameters after every optimizer step, so every rank's weight statistics are the same.
- Gradient statistics are of dL/dz of each rank's own loss. When each rank's loss is a mean
  over its local batch, dL/dz is world_size times that of one process taking the mean over
  the global batch (DDP averages the parameter gradients, not the losses). To compare with
  a single-process run, use loss = (sum over local rows) / global batch size and sum the
  gradients (a DDP comm hook), as tests/test_distributed.py does.
- FSDP2 (fully_shard): activations and gradients as above (each rank's unsharded forward and
  backward); weight and bias statistics are each rank's own shard's, their per-neuron spreads
  summed across ranks when a summary is taken or logged (fsdp.py, one all_reduce more).
  FSDP1 and other DTensor placements are refused (fsdp.check_model).
Packed moments travel as float64 (bit-cast into the int64 tensor), which needs a device
with float64 (CPU, CUDA).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from . import fsdp, ops

# Statistics that differ between ranks (each rank sees its own batches).
PER_RANK = ("activation", "gradient")


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Ranks whose statistics are merged: 1 without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def pack(states) -> tuple[torch.Tensor, list[tuple[str, str, int]]]:
    """One flat int64 tensor of every layer's per-rank (counts, moments), on their device.

    Layout per (layer, kind): counts [3N], then moments [3N] as float64 bit-cast to int64.
    Returns the tensor and the layout [(layer, kind, N)] that merge_ranks reads it with.
    """
    parts, layout = [], []
    for name, st in states:
        for kind in PER_RANK:
            if st.track[kind]:
                counts, moments = st.buffers[f"{kind}.counts"], st.buffers[f"{kind}.moments"]
                parts += [counts.reshape(-1),
                          moments.to(torch.float64).reshape(-1).view(torch.int64)]
                layout.append((name, kind, counts.shape[1]))
    if not parts:
        return torch.zeros(0, dtype=torch.int64), layout
    return torch.cat(parts), layout


def all_gather(flat: torch.Tensor) -> torch.Tensor:
    """[world_size, L]: every rank's packed tensor (a collective)."""
    out = torch.empty((world_size(), flat.numel()), dtype=flat.dtype, device=flat.device)
    dist.all_gather(list(out.unbind(0)), flat)
    return out


def merge_ranks(gathered: torch.Tensor, layout) -> dict[str, dict[str, np.ndarray]]:
    """Chan-merge the ranks' rows of all_gather(pack(...)) (a CPU tensor), in rank order.

    Returns {layer: {"activation.counts": int64 [3, N], "activation.moments": float64 [3, N],
    ...}}: the packed statistics of the union of every rank's observations.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    off = 0
    for name, kind, n in layout:
        counts = torch.zeros(3, n, dtype=torch.int64)
        moments = torch.zeros(3, n, dtype=torch.float64)
        for row in gathered:
            rank_counts = row[off:off + 3 * n].reshape(3, n)
            rank_moments = row[off + 3 * n:off + 6 * n].view(torch.float64).reshape(3, n)
            ops.merge_stats(counts, moments, rank_counts, rank_moments)
        off += 6 * n
        out.setdefault(name, {}).update({f"{kind}.counts": counts.numpy(),
                                         f"{kind}.moments": moments.numpy()})
    return out


def host_buffers(buffers: dict[str, dict[str, torch.Tensor]], states) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {buffer key: numpy array}} of a summary, from `buffers` ({layer: {buffer key:
    tensor}} of one moment, windows' whole-run totals merged in: windows.whole_run): the
    per-rank statistics merged over every rank (a collective under a process group), the
    weight and bias temporal state of an FSDP-sharded layer replaced by the whole layer's
    "weight.spread" / "bias.spread" (fsdp.gathered_spreads, a collective when any is sharded).
    Under a process group `buffers` must be the live statistics' (read in the training thread)."""
    host = {name: {k: t.cpu().numpy() for k, t in buffers[name].items()
                   if k.partition(".")[0] not in fsdp.sharded_roles(st)}
            for name, st in states}
    flat, layout = pack(states) if world_size() > 1 else (None, [])
    if layout:
        for name, merged in merge_ranks(all_gather(flat).cpu(), layout).items():
            host[name].update(merged)
    for name, spreads in fsdp.gathered_spreads(states, buffers).items():
        host[name].update({k: t.cpu().numpy() for k, t in spreads.items()})
    return host
