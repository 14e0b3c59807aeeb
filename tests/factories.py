"""User-style workload factories for the `lrfluct bench --model module:factory` tests."""
import torch
from torch import nn


def tiny(device):
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 2)).to(device)
    batch = (torch.randn(16, 6, device=device), torch.randn(16, 2, device=device))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), batch


def wrong(device):
    return nn.Linear(2, 2)


not_callable = 3
