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
from .layer_state import LayerState, neuron_rows


def _grad_bias(stats, dtype):
    counts, moments = stats
    total = counts[COUNT].to(moments.dtype) * ops.mean_of(moments)
    return torch.where(counts[NONFINITE] > 0, float("nan"), total).to(dtype)


def _gradient_stats(state: LayerState, grad_z: torch.Tensor, need_bias: bool):
    if not (state.track["gradient"] or need_bias):
        return None
    return ops.batch_stats(neuron_rows(state.kind, grad_z))


class LinearWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state: LayerState):
        z = F.linear(x, weight, bias)
        ctx.state = state
        ctx.pending = ops.batch_stats(z.reshape(-1, z.shape[-1])) if state.track["activation"] else None
        ctx.save_for_backward(x, weight)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        state: LayerState = ctx.state
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = grad_z.contiguous()
        stats = _gradient_stats(state, grad_z, need_b)
        g2 = grad_z.reshape(-1, grad_z.shape[-1])
        grad_x = (grad_z @ weight) if need_x else None
        grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = _grad_bias(stats, grad_z.dtype) if need_b else None
        state.merge("activation", ctx.pending)
        state.merge("gradient", stats)
        ctx.pending = None
        return grad_x, grad_w, grad_b, None


class ConvWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state: LayerState, stride, padding, dilation, groups):
        conv = {3: F.conv1d, 4: F.conv2d}[x.dim()]
        z = conv(x, weight, bias, stride, padding, dilation, groups)
        ctx.state = state
        ctx.conv = (stride, padding, dilation, groups)
        ctx.pending = ops.batch_stats(neuron_rows("conv", z)) if state.track["activation"] else None
        ctx.save_for_backward(x, weight)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        state: LayerState = ctx.state
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = grad_z.contiguous()
        stats = _gradient_stats(state, grad_z, need_b)
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_z, x, weight, None, stride, padding, dilation, False,
                [0] * len(stride), groups, [need_x, need_w, False])
        grad_b = _grad_bias(stats, grad_z.dtype) if need_b else None
        state.merge("activation", ctx.pending)
        state.merge("gradient", stats)
        ctx.pending = None
        return grad_x, grad_w, grad_b, None, None, None, None, None
