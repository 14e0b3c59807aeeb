"""Autograd functions of the wrappers: the layer op with its statistics fused in.

Forward: z = op(x, W, b) and this batch's activation statistics, kept on the autograd node
(ctx) of this call, so the forward is counted by its own backward and only then: gradient
accumulation, a module called twice and activation-checkpoint recompute all count right.
Backward, with dz = dL/dz viewed as [R, N]:
    gradient stats = batch_stats(dz)                 one read of dz
    grad_b         = count * mean  from those stats  (the reduction grad_b needs anyway;
                                                      nan where dz had a non-finite value)
    grad_x, grad_W = dz @ W,  dz^T @ x               (convolution_backward for ConvNd)
then the pending activation stats and the gradient stats are merged into the layer's state.
No Python hooks, no host synchronisation. Autocast is resolved by the wrapper before the
call (inputs cast to the autocast dtype), so these functions see one dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import COUNT, NONFINITE
from .layer_state import LayerState, matrix, neuron_rows


def _grad_bias(stats, dtype):
    counts, moments = stats
    total = ops.mean_of(moments).mul_(counts[COUNT])  # fewer small ops: this runs per layer
    return total.masked_fill_(counts[NONFINITE] > 0, float("nan")).to(dtype)


def _save(ctx, state: LayerState, z, x, weight) -> None:
    """Forward bookkeeping: this call's activation stats wait on its own autograd node."""
    ctx.state = state
    ctx.pending = ops.batch_stats(neuron_rows(state.kind, z)) if state.track["activation"] else None
    ctx.save_for_backward(x, weight)


def _gradient_stats(ctx, grad_z: torch.Tensor):
    """One read of dL/dz: its statistics, which also give grad_bias."""
    state: LayerState = ctx.state
    if not (state.track["gradient"] or ctx.needs_input_grad[2]):
        return None
    return ops.batch_stats(neuron_rows(state.kind, grad_z))


def _finish(ctx, stats, grad_z):
    """Merge this call's pending activation stats and its gradient stats; return grad_bias."""
    ctx.state.merge("activation", ctx.pending)
    ctx.state.merge("gradient", stats)
    ctx.pending = None
    return _grad_bias(stats, grad_z.dtype) if ctx.needs_input_grad[2] else None


class LinearWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state: LayerState):
        z = F.linear(x, weight, bias)
        _save(ctx, state, z, x, weight)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_z = grad_z.contiguous()
        stats = _gradient_stats(ctx, grad_z)
        grad_x = (grad_z @ weight) if need_x else None
        grad_w = (matrix(grad_z).t() @ matrix(x)) if need_w else None
        return grad_x, grad_w, _finish(ctx, stats, grad_z), None


class ConvWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state: LayerState, stride, padding, dilation, groups):
        conv = {3: F.conv1d, 4: F.conv2d}[x.dim()]
        z = conv(x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        _save(ctx, state, z, x, weight)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_z = grad_z.contiguous()
        stats = _gradient_stats(ctx, grad_z)
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_z, x, weight, None, stride, padding, dilation, False,
                [0] * len(stride), groups, [need_x, need_w, False])
        return grad_x, grad_w, _finish(ctx, stats, grad_z), None, None, None, None, None
