"""A table of (name, layer factory, input factory) covering every kind of adaptable tensor."""

import torch
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv1d(pm):
    return lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode=pm), lambda: torch.randn(2, 4, 11)


def _conv2d(pm):
    return lambda: nn.Conv2d(4, 8, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2, padding_mode=pm), lambda: torch.randn(2, 4, 9, 10)


def _conv3d(pm):
    return lambda: nn.Conv3d(2, 4, (1, 3, 2), stride=1, padding=1, dilation=(1, 2, 1), groups=2, padding_mode=pm), lambda: torch.randn(1, 2, 4, 7, 6)


def _conv1d_transformers():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(6, 4)


CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6)),
    "linear_3d_input": (lambda: nn.Linear(6, 5, bias=False), lambda: torch.randn(2, 3, 6)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), lambda: torch.randn(2, 4, 6, 6)),
    "conv2d_1x1": (lambda: nn.Conv2d(4, 6, 1), lambda: torch.randn(2, 4, 5, 5)),
    "convtranspose1d": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1),
        lambda: torch.randn(2, 4, 7),
    ),
    "convtranspose2d": (
        lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=(1, 0), groups=2, dilation=(1, 2)),
        lambda: torch.randn(2, 4, 5, 6),
    ),
    "convtranspose3d": (
        lambda: nn.ConvTranspose3d(2, 4, (2, 3, 1), stride=(1, 2, 1), groups=2),
        lambda: torch.randn(1, 2, 3, 4, 5),
    ),
    "hf_conv1d": (_conv1d_transformers, lambda: torch.randn(2, 3, 4)),
    "embedding": (lambda: nn.Embedding(10, 4), lambda: torch.randint(0, 10, (3, 5))),
}
for _pm in PADDING_MODES:
    CASES[f"conv1d_{_pm}"] = _conv1d(_pm)
    CASES[f"conv2d_{_pm}"] = _conv2d(_pm)
    CASES[f"conv3d_{_pm}"] = _conv3d(_pm)


def make_case(name, seed=0):
    torch.manual_seed(seed)
    make_layer, make_input = CASES[name]
    layer = nn.Sequential(make_layer())
    return layer, make_input()


def randomize_factors(model, std=0.2, seed=1):
    """Give every Lie factor of ``model`` reproducible non-zero values."""
    from liedeploy.core.adapt import iter_adapters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * std)
            lie.lie_A.copy_(torch.randn(lie.lie_A.shape, generator=g) * std)
