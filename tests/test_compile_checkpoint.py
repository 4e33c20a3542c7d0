"""torch.compile, gradient checkpointing and bf16 autocast with both exp maps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from liedeploy import LieConfig, apply_adapters_, load_adapter, save_adapter

from .layer_cases import randomize_factors


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).mean((2, 3)))


def _adapted(expmap, seed=0):
    torch.manual_seed(seed)
    m = Block()
    apply_adapters_(m, LieConfig(r=2, alpha=2, expmap=expmap, targets=["conv", "fc"]))
    randomize_factors(m, std=0.1, seed=seed + 1)
    return m


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_compile_matches_eager_and_does_not_recompile_on_adapter_load(expmap, tmp_path):
    torch._dynamo.reset()
    eager = _adapted(expmap)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(3, 4, 6, 6)
    eager(x).square().sum().backward()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(compiled_model, backend=counter)
    compiled(x).square().sum().backward()
    ge, gc = _grads(eager), _grads(compiled_model)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    assert frames >= 1
    before = compiled(x).detach()
    torch.testing.assert_close(before, eager(x), rtol=1e-5, atol=1e-6)
    # another task's factors copied in place: same graph, new numbers, no recompilation
    other = _adapted(expmap)  # same base, other factors
    randomize_factors(other, std=0.1, seed=7)
    path = str(tmp_path / "other.safetensors")
    save_adapter(other, path)
    load_adapter(compiled_model, path)
    after = compiled(x)
    torch.testing.assert_close(after, other(x), rtol=1e-5, atol=1e-6)  # same grad mode: same guards
    assert (after.detach() - before).abs().max() > 1e-3  # the new factors are really in use
    assert counter.frame_count == frames


def test_compile_inductor_outputs_and_grads():
    torch._dynamo.reset()
    eager = _adapted("exact")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    x = torch.randn(2, 4, 6, 6)
    y_e, y_c = eager(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    ge, gc = _grads(eager), _grads(model)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_gradient_checkpointing(expmap):
    plain = _adapted(expmap)
    ckpt = copy.deepcopy(plain)
    x = torch.randn(2, 4, 6, 6)
    plain(x).square().sum().backward()
    checkpoint(ckpt, x, use_reentrant=False).square().sum().backward()
    gp, gc = _grads(plain), _grads(ckpt)
    for k in gp:
        torch.testing.assert_close(gc[k], gp[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_bf16_autocast_trains_fp32_factors(expmap):
    model = _adapted(expmap)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref(x).square().sum().backward()
    g, gr = _grads(model), _grads(ref)
    for k in g:
        assert g[k].dtype == torch.float32  # factors and their gradients stay fp32
        # bf16 activations: a few percent of the gradient's scale
        assert (g[k] - gr[k]).abs().max() <= 0.05 * gr[k].abs().max() + 1e-6, k
