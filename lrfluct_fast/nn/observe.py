"""Observe: the identity autograd function through which a wrapped layer's output passes.

The layer itself runs exactly as torch runs it (its own forward, its own autograd), so every
gradient, second-order derivative and autograd feature is the plain model's. Only the output
z passes through Observe:

    forward:   z -> z (a detached alias, so in-place ops after the layer, such as
               ReLU(inplace=True), stay allowed), carrying this forward's activation
               statistics, computed from z by the caller, on its autograd node (ctx)
    backward:  dL/dz -> dL/dz unchanged; the layer's state merges the pending activation
               statistics and the statistics of dL/dz (one extra read of dL/dz)

In eager mode, with the C++ extension built, the wrapper calls the layer's C++ Observer instead
(csrc/observe.cpp): the same statistics and counting, kept on a pre-hook of the node that made
z rather than on a node of their own, so the layer's output is z itself and a layer's fixed
cost is not the interpreter's. This Python function is the path under torch.compile, for a
column block of neurons (attention), for a leaf z and with a GradScaler. Its backward is one accumulate_stats op:
dL/dz's statistics and the pending activation ones merged in one pass (two launches on a GPU).

Counting rule: every backward that reaches a forward's node counts that forward once more,
its activations and its dL/dz together (activation.count == gradient.count). A backward run
inside `Monitor.paused()` counts nothing. The rule needs no Python state on the node, so a
compiled graph (torch.compile), where such state would be frozen at trace time, counts
exactly as eager does.
"""
from __future__ import annotations

import torch


class Observe(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: with setup_context, torch binds
    # apply's arguments through inspect.signature on every call (72 us of a 120 us layer cost
    # on CPU). torch.func needs setup_context, but nothing is observed inside its transforms.
    @staticmethod
    def forward(ctx, z, counts, moments, state, columns):
        ctx.pending = (counts, moments)  # None, None when activations are not tracked
        ctx.state = state
        ctx.columns = columns            # the block of the layer's neurons z holds, or None
        return z.detach()

    @staticmethod
    def backward(ctx, grad_z):
        ctx.state.observe_backward(ctx.pending, grad_z, ctx.columns)
        return grad_z, None, None, None, None
