"""Shared fixtures: adapter files with random factors, safetensors bases; GPU tests skip without CUDA."""

import copy

import pytest
import torch
from safetensors.torch import save_file


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _write_adapter(model, path, targets, *, r=2, alpha=None, std=0.1, seed=1, expmap="exact", name=None,
                   randomize_A=False, modules_to_save=None):
    """Adapt a copy of ``model``, give B (and optionally A) random values, save it; returns the path."""
    from liedeploy import LieConfig, apply_adapters_, save_adapter
    from liedeploy.core.adapt import iter_adapters

    kwargs = {"modules_to_save": modules_to_save} if modules_to_save else {}
    cfg = LieConfig(r=r, alpha=alpha if alpha is not None else r, expmap=expmap, targets=targets, **kwargs)
    m = apply_adapters_(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * std)
            if randomize_A:
                lie.lie_A.copy_(torch.randn(lie.lie_A.shape, generator=g) * std)
    save_adapter(m, str(path), name=name)
    return str(path)


@pytest.fixture
def write_adapter():
    """``write_adapter(model, path, targets, r=2, std=0.1, seed=1, expmap="exact", name=None)`` -> path."""
    return _write_adapter


@pytest.fixture
def save_base():
    """``save_base(model, path)``: the model's state dict as a safetensors file; returns the path."""

    def save(model, path, metadata=None):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
        return str(path)

    return save


def save_state_dict(model, path, metadata=None):
    """The model's state dict as a safetensors file (contiguous tensors); returns the path as a string."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return str(path)
