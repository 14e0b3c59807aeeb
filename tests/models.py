"""Small seeded models (and their inputs) for the instrumentation tests.

Every factory takes a seed, so building the same model twice gives identical parameters:
one copy is instrumented by lf.instrument, the other observed by the float64 HookSnapshot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """13 -> 37 -> 29 -> 5, ReLU then GELU."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(13, 37)
        self.fc2 = nn.Linear(37, 29)
        self.out = nn.Linear(29, 5)

    def forward(self, x):
        return self.out(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv2d (stride/padding) -> ReLU -> grouped, dilated, bias-free Conv2d -> ReLU ->
    Conv1d over the flattened spatial positions -> Linear. Input [B, 3, 7, 9]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 9, 3, stride=2, padding=1)            # -> [B, 9, 4, 5]
        self.conv2 = nn.Conv2d(9, 15, 3, padding=2, dilation=2, groups=3, bias=False)
        self.conv3 = nn.Conv1d(15, 5, 3, stride=2, padding=1)            # 20 -> 10
        self.head = nn.Linear(5 * 10, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = self.conv3(h.flatten(2))
        return self.head(F.gelu(h).flatten(1))


class Block(nn.Module):
    """Pre-norm transformer block from nn.Linear layers; input [batch, seq, d]."""

    def __init__(self, d=12, heads=3, hidden=23):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        # no key bias: softmax is invariant to it, so its gradient would be rounding noise
        # that Adam blows up into updates differing between two otherwise equal runs
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Shared(nn.Module):
    """The same nn.Linear object used twice in one forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 11)
        self.mid = nn.Linear(11, 11)
        self.out = nn.Linear(11, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {"mlp": MLP, "cnn": CNN, "block": Block, "shared": Shared}[name]()


def make_input(name: str, batch: int = 6, generator: torch.Generator | None = None) -> torch.Tensor:
    shape = {"mlp": (batch, 13), "cnn": (batch, 3, 7, 9), "block": (batch, 5, 12),
             "shared": (batch, 6)}[name]
    return torch.randn(*shape, generator=generator)


def batches(name: str, n: int, batch: int = 6, seed: int = 123) -> list[torch.Tensor]:
    """A fixed list of inputs, so two training runs see the same data."""
    g = torch.Generator().manual_seed(seed)
    return [make_input(name, batch, g) for _ in range(n)]
