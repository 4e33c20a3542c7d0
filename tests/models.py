"""Small models the tests share, each covering a mix of layer kinds (the layer-kind table itself is
``layer_cases.CASES``)."""

import torch
from torch import nn

__all__ = ["ConvHead", "MixedLayers", "ConvMLP", "MLP3", "ConvNormHead"]


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, groups=3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class MixedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(4, 8, 3, groups=2, dilation=2)
        self.fc = nn.Linear(16, 12)
        self.norm = nn.BatchNorm1d(12)


class ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(self.fc(self.conv(x).relu().mean((2, 3))).relu())


class MLP3(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ConvNormHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).relu().mean((2, 3)))
