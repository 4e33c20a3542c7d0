"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.py on a GPU machine)."""

import copy
import math

import pytest
import torch
from torch import nn

from liedeploy import AdapterBank, LieConfig, apply_adapters_, merge_, save_adapter, unmerge_
from liedeploy.core.algebra import lie_fold
from liedeploy.train import train_adapters

from .layer_cases import randomize_factors

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_fold_on_cuda_matches_float64(dtype, rtol, expmap):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 3, 3, 3, generator=g)
    B = torch.randn(64, 4, generator=g) * 0.2
    A = torch.randn(4, 27, generator=g) * 0.2
    d = (B.double() @ A.double()).reshape(W.shape) * 0.5
    ref = W.to(dtype).double() * (torch.exp(d) if expmap == "exact" else 1 + d)
    got = lie_fold(W.to(CUDA, dtype), B.to(CUDA), A.to(CUDA), 0.5, expmap).double().cpu()
    assert ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max() <= rtol


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_cuda_gradients_match_cpu(expmap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    apply_adapters_(model, LieConfig(r=2, expmap=expmap, targets=["0", "2"]))
    randomize_factors(model, std=0.1)
    gpu = copy.deepcopy(model).to(CUDA)
    x = torch.randn(5, 4, 6, 6)
    model(x).square().sum().backward()
    gpu(x.to(CUDA)).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), gpu.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5)


def test_exact_map_peak_memory_close_to_first_order():
    def peak(expmap):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)]).to(CUDA)
        apply_adapters_(model, LieConfig(r=16, expmap=expmap, targets=r".*weight"))
        x = torch.randn(64, 2048, device=CUDA, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak("exact") <= 1.05 * peak("first_order")


def test_merge_keep_base_on_cpu_and_unmerge_bit_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(CUDA, torch.bfloat16)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters_(model, LieConfig(r=4, targets=["0", "1"]))
    randomize_factors(model)
    x = torch.randn(3, 64, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        merge_(model, keep_base="cpu")
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        unmerge_(model)
    for n, m in (("0.weight", model[0]), ("1.weight", model[1])):
        assert torch.equal(m.parametrizations.weight.original, pristine[n])


def test_train_helper_bf16_autocast_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    apply_adapters_(model, LieConfig(r=4, targets=["0", "3"]))
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    losses = train_adapters(model, data, epochs=3, lr=1e-2, device="cuda", bf16="auto",
                            checkpoint=str(tmp_path / "ck.safetensors"), progress=False)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lie_" in n)


def test_bank_on_cuda(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    paths, refs = {}, {}
    for i in range(3):
        m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, targets=["0", "2"]))
        randomize_factors(m, seed=i)
        p = str(tmp_path / f"t{i}.safetensors")
        save_adapter(m, p)
        paths[f"t{i}"], refs[f"t{i}"] = p, merge_(m).to(CUDA)
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, device="cuda")
    x = torch.randn(6, 16, device=CUDA)
    tasks = ["t0", "t1", "t2", "t1", "t0", "t2"]
    out = bank.forward_mixed(x, tasks)
    with torch.no_grad():
        for i, t in enumerate(tasks):
            torch.testing.assert_close(out[i : i + 1], refs[t](x[i : i + 1]), rtol=1e-5, atol=1e-6)
