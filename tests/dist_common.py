"""The model and data shared by the distributed test and its single-process reference."""

import torch
from torch import nn

STEPS = 5


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def batches(steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
