"""Conv2d weights folded straight into oneDNN's blocked layout (liedeploy.core.conv_pack, native.fold_blocked).

References are float64 math written here; tolerances are stated where used. Skipped where this torch
has no oneDNN packed convolution or no C compiler builds the kernels (pack_status says why).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liedeploy import AdapterBank, LieConfig, LieError, apply_adapters_, save_adapter
from liedeploy.core import conv_pack, native
from liedeploy.core.adapt import iter_adapters

pytestmark = pytest.mark.skipif(conv_pack.pack_status() != "ready", reason=f"no packing here: {conv_pack.pack_status()}")

F32_EPS = torch.finfo(torch.float32).eps


def _fold64(W, B, A, exact=True):
    p = B.double() @ A.double()
    return W.double() * (torch.exp(p) if exact else 1 + p)


def _blocked_fold(W, B, A, blk, exact=True, out=None):
    """W (O x I x KH x KW) in the blocked layout, folded by the kernel; returns (result, finite)."""
    base = native.blocked_layout(W, blk)
    out = torch.full_like(base, float("nan")) if out is None else out
    (ok,) = native.fold_blocked([(base.data_ptr(), out.data_ptr(), B, A, tuple(W.shape), blk)], exact)
    return out, ok


@pytest.mark.parametrize("blk", native.BLOCKS)
@pytest.mark.parametrize("exact", [True, False])
def test_blocked_fold_matches_float64(blk, exact):
    g = torch.Generator().manual_seed(blk)
    # padded output blocks, row counts that are not multiples of the kernel's groups or items
    for shape, R in (((blk, 3, 1, 3), 1), ((2 * blk + 5, 7, 3, 3), 16), ((3, 70, 1, 1), 7), ((blk + 1, 5, 7, 7), 70)):
        m, n = shape[0], shape[1] * shape[2] * shape[3]
        for spread in (0.01, 0.8):  # |dW| <= 1/8 (the short exp) and beyond (the range-reduced exp)
            W = torch.randn(shape, generator=g)
            B, A = torch.randn(m, R, generator=g) * spread / R ** 0.5, torch.randn(R, n, generator=g)
            out, ok = _blocked_fold(W, B, A, blk, exact)
            assert ok
            ref = native.blocked_layout(_fold64(W.reshape(m, n), B, A, exact).view(shape), blk)
            # float32 sums of R products (error <= R eps S, S = |B| @ |A|), carried through the map
            # (a factor of at most exp(S)), then the map's own error and one rounding: 4 eps relative
            S = B.abs().double() @ A.abs().double()
            sum_err = native.blocked_layout((W.reshape(m, n).abs().double() * torch.exp(S) * R * F32_EPS * S).view(shape), blk)
            assert ((out.double() - ref).abs() <= sum_err + 4 * F32_EPS * ref.abs() + 1e-37).all()
            assert (out[ref == 0] == 0).all()  # padded output channels, and zeros of W, stay zeros


def test_blocked_fold_equals_the_dense_fused_fold():
    from liedeploy.core.algebra import fold_sum

    g = torch.Generator().manual_seed(9)
    W = torch.randn(96, 32, 3, 3, generator=g)
    B, A = torch.randn(96, 16, generator=g) * 0.02, torch.randn(16, 288, generator=g) * 0.02
    dense = fold_sum(W, [(B, A, 1.0)], "exact")
    for blk in native.BLOCKS:  # the same products in the same order, the same map: the same bits
        out, ok = _blocked_fold(W, B, A, blk)
        assert ok and torch.equal(out, native.blocked_layout(dense, blk))


def test_a_large_blocked_fold_out_of_place_gives_the_in_place_bits():
    """Several layers of more than 1 MiB together, written out of place (stored around the cache)
    and in place (through it): the same bits."""
    g = torch.Generator().manual_seed(11)
    layers = []
    for shape in ((128, 64, 3, 3), (256, 128, 3, 3), (64, 128, 1, 1)):
        W = torch.randn(shape, generator=g)
        m, n = shape[0], shape[1] * shape[2] * shape[3]
        layers.append((W, torch.randn(m, 16, generator=g) * 0.05, torch.randn(16, n, generator=g) * 0.05))
    for blk in native.BLOCKS:
        bases = [native.blocked_layout(W, blk) for W, _, _ in layers]
        outs = [torch.full_like(b, float("nan")) for b in bases]
        inplace = [b.clone() for b in bases]
        assert sum(b.numel() * 4 for b in bases) > 1 << 20
        assert all(native.fold_blocked([(b.data_ptr(), o.data_ptr(), B, A, tuple(W.shape), blk)
                                        for b, o, (W, B, A) in zip(bases, outs, layers)], True))
        assert all(native.fold_blocked([(b.data_ptr(), b.data_ptr(), B, A, tuple(W.shape), blk)
                                        for b, (W, B, A) in zip(inplace, layers)], True))
        for o, i in zip(outs, inplace):
            assert torch.equal(o, i)


def test_blocked_fold_in_place_several_layers_and_non_finite_flags():
    g = torch.Generator().manual_seed(3)
    W1, W2 = torch.randn(20, 2, 3, 3, generator=g), torch.randn(40, 5, 1, 1, generator=g)
    B1, A1 = torch.randn(20, 2, generator=g) * 0.1, torch.randn(2, 18, generator=g)
    B2, A2 = torch.randn(40, 3, generator=g) * 0.1, torch.randn(3, 5, generator=g)
    b1, b2 = native.blocked_layout(W1, 16), native.blocked_layout(W2, 32)
    layers = [(b1.data_ptr(), b1.data_ptr(), B1, A1, tuple(W1.shape), 16),  # out is W itself
              (b2.data_ptr(), b2.data_ptr(), B2, A2, tuple(W2.shape), 32)]
    assert native.fold_blocked(layers, True) == [True, True]
    torch.testing.assert_close(b1.double(), native.blocked_layout(_fold64(W1.view(20, -1), B1, A1).view(W1.shape), 16),
                               rtol=4e-7, atol=0)
    torch.testing.assert_close(b2.double(), native.blocked_layout(_fold64(W2.view(40, -1), B2, A2).view(W2.shape), 32),
                               rtol=4e-7, atol=0)
    huge = B2.clone()
    huge[4, 0] = 1e4  # exp overflows on that channel of the second layer only
    c1, c2 = native.blocked_layout(W1, 16), native.blocked_layout(W2, 32)
    layers = [(c1.data_ptr(), c1.data_ptr(), B1, A1, tuple(W1.shape), 16),
              (c2.data_ptr(), c2.data_ptr(), huge, A2.abs(), tuple(W2.shape), 32)]
    assert native.fold_blocked(layers, True) == [True, False]


def test_fold_blocked_refuses_other_blocks():
    z = torch.zeros(8 * 24)
    with pytest.raises(RuntimeError, match="blocks of"):
        native.fold_blocked([(z.data_ptr(), z.data_ptr(), torch.zeros(8, 1), torch.zeros(1, 8), (8, 8, 1, 1), 24)], True)


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 40, 3, padding=1)  # 40 channels: a padded last block
        self.b = nn.Conv2d(40, 64, 1, stride=2)
        self.c = nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)  # depthwise: packed where its layout is one of ours
        self.same = nn.Conv2d(64, 16, 3, padding="same")  # padding given as a string: left dense
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.a(x).relu()
        x = self.b(x).relu()
        x = self.c(x).relu()
        x = self.dw(x).relu()
        return self.fc(self.same(x).mean((2, 3)))


def _plans(model, shape=(1, 3, 12, 12)):
    return conv_pack.plan_convs(model, lambda m: m(torch.zeros(shape)), (1, 8))


def test_plan_reads_the_layout_back_and_packs_what_it_can():
    torch.manual_seed(0)
    m = _Convs().eval()
    plans = _plans(m)
    assert {"a.weight", "b.weight", "c.weight"} <= set(plans)
    assert "same.weight" not in plans
    for name, plan in plans.items():
        W = m.get_submodule(name[:-7]).weight.detach()
        packed = plan.pack(W)
        want = native.blocked_layout(W, plan.blk)
        assert conv_pack.nbytes(packed) == want.numel() * 4
        assert torch.equal(conv_pack._raw(packed, want.numel()), want)
        assert torch.equal(packed.to_dense(), W)


def _packed_copy(model, plans):
    return conv_pack.pack_model(copy.deepcopy(model), plans)


def _conv64(x, conv, W):
    return F.conv2d(x.double(), W.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                    conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_packed_convolution_matches_float64(batch):
    torch.manual_seed(1)
    m = _Convs().eval()
    plans = _plans(m)
    p = _packed_copy(m, plans)
    x = torch.randn(batch, 3, 12, 12)
    with torch.inference_mode():
        for name in plans:
            conv = m.get_submodule(name[:-7])
            xin = torch.randn(batch, conv.in_channels, 6, 6)
            got = p.get_submodule(name[:-7])(xin)
            ref = _conv64(xin, conv, conv.weight.detach())
            # float32 dot products of K = in x kh x kw terms: within K eps of the sum of |terms|
            terms = F.conv2d(xin.double().abs(), conv.weight.detach().double().abs(), None, conv.stride, conv.padding,
                             conv.dilation, conv.groups)
            k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
            assert ((got.double() - ref).abs() <= k * F32_EPS * (terms + 1)).all(), name
        torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)  # the whole model, every layer kind


def test_packed_convolution_falls_back_off_its_fast_path():
    torch.manual_seed(2)
    m = _Convs().eval()
    plans = _plans(m)
    p = _packed_copy(m, plans)
    conv, packed = m.a, p.a
    assert isinstance(packed, conv_pack.PackedConv2d)
    x = torch.randn(2, 3, 7, 9, requires_grad=True)  # autograd: torch's convolution on the dense weight
    y = packed(x)
    y.sum().backward()
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
    assert x.grad is not None
    x64 = torch.randn(2, 3, 7, 9, dtype=torch.float64)  # another dtype
    with pytest.raises(RuntimeError):  # as a dense float32 Conv2d refuses it
        conv(x64)
    with pytest.raises(RuntimeError):
        packed(x64)
    with torch.inference_mode():  # another spatial size than planned: still right (oneDNN reorders if it must)
        x = torch.randn(2, 3, 17, 5)
        torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)


def _task(base, path, seed, spread=0.3, targets=("a", "b", "c", "fc")):
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=3, alpha=6, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * spread)
    save_adapter(m, path, name=path)


def _bank_pair(tmp_path, n=3, cache_bytes=None):
    torch.manual_seed(3)
    base = _Convs().eval()
    paths = {}
    for i in range(n):
        paths[f"t{i}"] = str(tmp_path / f"t{i}.safetensors")
        _task(base, paths[f"t{i}"], seed=20 + i)
    dense = AdapterBank(copy.deepcopy(base), adapters=paths)
    packed = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=cache_bytes)
    names = packed.pack_convs(lambda m: m(torch.zeros(1, 3, 12, 12)), batches=(1, 8))
    return dense, packed, names


def test_bank_folds_packed_tasks_like_dense_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("LIEDEPLOY_FUSE", "off")  # replicas as module trees (tests/test_conv_graph.py: fused graphs)
    dense, packed, names = _bank_pair(tmp_path)
    assert names == packed.packed and {"a.weight", "b.weight", "c.weight"} <= set(names)
    x = torch.randn(4, 3, 12, 12)
    with torch.inference_mode():
        for t in ("t0", "t1", "t2"):
            rep_d, rep_p = dense.model_for(t), packed.model_for(t)
            for n in ("a.weight", "b.weight", "c.weight"):  # the adapted packed layers: the same fold arithmetic
                mod = n[:-7]
                wd = rep_d.get_submodule(mod).weight
                wp = rep_p.get_submodule(mod).weight
                assert wp.layout == torch._mkldnn and type(rep_p.get_submodule(mod)) is conv_pack.PackedConv2d
                torch.testing.assert_close(wp.to_dense(), wd, rtol=2 * F32_EPS, atol=0)  # within one rounding
            # not adapted: the base's packed weight, shared by every task and not counted in the cache
            assert type(rep_p.dw) is conv_pack.PackedConv2d
            assert torch.ops.mkldnn.data_ptr(rep_p.dw.weight) == torch.ops.mkldnn.data_ptr(packed._packed.base["dw.weight"])
            torch.testing.assert_close(packed(x, task=t), dense(x, task=t), rtol=1e-5, atol=1e-5)
        assert type(packed.base.a) is nn.Conv2d and packed.base.a.weight.layout == torch.strided  # the base stays dense
        assert packed.cached_bytes == sum(conv_pack.nbytes(packed.model_for(t).get_submodule(m).weight)
                                          for t in ("t0", "t1", "t2") for m in ("a", "b", "c", "fc"))
        torch.testing.assert_close(packed(x), dense(x), rtol=0, atol=0)


def test_packed_storage_is_recycled_within_the_budget(tmp_path):
    dense, probe, _ = _bank_pair(tmp_path, n=4)
    one = sum(conv_pack.nbytes(t) for t in probe._fold(probe.registry.get("t0")).tensors.values())
    _, packed, _ = _bank_pair(tmp_path, n=4, cache_bytes=one + one // 2)  # room for one task
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        for _ in range(3):
            for t in ("t0", "t1", "t2", "t3"):
                torch.testing.assert_close(packed(x, task=t), dense(x, task=t), rtol=1e-5, atol=1e-5)
    assert packed.stats["recycled"] > 0 and packed.cached_bytes <= one + one // 2
    assert packed.stats["folds"] >= 8


def test_pack_convs_drops_dense_folds_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LIEDEPLOY_FUSE", "off")
    torch.manual_seed(4)
    base = _Convs().eval()
    p = str(tmp_path / "t.safetensors")
    _task(base, p, seed=5)
    bank = AdapterBank(copy.deepcopy(base), adapters={"t": p})
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode():
        before = bank(x, task="t")
        assert bank.is_resident("t")
        assert bank.pack_convs(lambda m: m(torch.zeros(1, 3, 12, 12)))
        assert not bank.is_resident("t")  # folded again, packed, at its next use
        after = bank(x, task="t")
    assert bank.model_for("t").a.weight.layout == torch._mkldnn
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LIEDEPLOY_PACK", "off")
    assert conv_pack.pack_status() == "LIEDEPLOY_PACK=off"
    other = AdapterBank(copy.deepcopy(base), adapters={"t": p})
    assert other.pack_convs(lambda m: m(torch.zeros(1, 3, 12, 12))) == [] and other.packed == []


def test_a_packed_fold_that_overflows_is_refused_by_name(tmp_path):
    torch.manual_seed(6)
    base = _Convs().eval()
    p = str(tmp_path / "big.safetensors")
    _task(base, p, seed=7, spread=400.0, targets=("a", "b", "c"))
    bank = AdapterBank(copy.deepcopy(base), adapters={"big": p})
    assert bank.pack_convs(lambda m: m(torch.zeros(1, 3, 12, 12)))
    with pytest.raises(LieError, match=r"merging (a|b|c)\.weight overflows"):
        bank(torch.zeros(1, 3, 12, 12), task="big")


def test_the_torch_backend_packs_on_cpu_with_fixed_shapes_and_says_why_not_otherwise(tmp_path):
    import numpy as np

    from liedeploy.serving.backends.torch import TorchBackend
    from liedeploy.serving.specs import TensorSpec, default_input

    torch.manual_seed(8)
    base = _Convs().eval()
    p = str(tmp_path / "t.safetensors")
    _task(base, p, seed=9)
    fixed = TorchBackend(copy.deepcopy(base), [default_input((1, 3, 12, 12))], max_batch=8)
    n = len(fixed.bank.packed)
    assert n >= 3 and fixed.pack_reason == (f"{n} of 5 Conv2d layers folded into oneDNN's blocked layout (batches 1-8); "
                                            f"inputs channels-last; fused graph: {n} packed convolutions, 0 with their "
                                            f"batch norm folded in, 0 with a residual add and {n} with a ReLU done by oneDNN")
    assert fixed.stats()["packed_convs"] == n
    dense = TorchBackend(copy.deepcopy(base), [default_input((1, 3, 12, 12))])
    assert dense.pack_reason == "dense (no batch bound was given to pack for)" and dense.bank.packed == []
    free = TorchBackend(copy.deepcopy(base), [TensorSpec("input", "FP32", (-1, 3, -1, -1))], max_batch=8)
    assert free.pack_reason == "dense (an input has a dynamic shape beyond the batch)"
    for b in (fixed, dense, free):
        b.add("t", p)
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(fixed.run("t", {"input": x})["output"], dense.run("t", {"input": x})["output"],
                               rtol=1e-5, atol=1e-5)


class _Views(nn.Module):
    """A model that .view()s a convolution's output: fed channels-last it fails."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_channels_last_inputs_only_for_models_that_take_them():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 8, 8)
    assert conv_pack.channels_last_safe(_Convs().eval(), torch.randn(2, 3, 12, 12))
    assert not conv_pack.channels_last_safe(_Views().eval(), x)
    m = _Views().eval()
    plans = _plans(m, shape=(1, 3, 8, 8))
    p = _packed_copy(m, plans)
    with torch.inference_mode():  # a contiguous input gives contiguous activations: the view still works
        torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)
        xl = x.contiguous(memory_format=torch.channels_last)
        y = p.conv(xl)
        assert y.is_contiguous(memory_format=torch.channels_last)  # no copy back for a channels-last input
        torch.testing.assert_close(y, m.conv(x), rtol=1e-5, atol=1e-5)


def test_a_task_that_replaces_a_packed_layer_whole_runs_it_dense(tmp_path, monkeypatch):
    monkeypatch.setenv("LIEDEPLOY_FUSE", "off")  # the graph's own case: tests/test_conv_graph.py
    torch.manual_seed(11)
    base = _Convs().eval()
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=3, alpha=6, targets=["a", "c"], modules_to_save=["b"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.3)
        m.b.weight.mul_(1.5)  # the task's own b
    full = str(tmp_path / "full.safetensors")
    save_adapter(m, full, name="full")
    adapted = str(tmp_path / "adapted.safetensors")
    _task(base, adapted, seed=12)  # adapts a, b, c, fc
    dense = AdapterBank(copy.deepcopy(base), adapters={"full": full, "adapted": adapted})
    packed = AdapterBank(copy.deepcopy(base), adapters={"full": full, "adapted": adapted}, cache_bytes=0)
    packed.pack_convs(lambda mm: mm(torch.zeros(1, 3, 12, 12)))
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        for _ in range(2):  # cache_bytes=0: every call folds again, on recycled replicas and storage
            for t in ("full", "adapted", "full"):
                torch.testing.assert_close(packed(x, task=t), dense(x, task=t), rtol=1e-5, atol=1e-5)
    rep = packed.model_for("full")
    assert rep.b.weight.layout == torch.strided and rep.a.weight.layout == torch._mkldnn


def test_pack_model_packs_in_place_and_keeps_the_outputs():
    torch.manual_seed(13)
    m = _Convs().eval()
    ref = copy.deepcopy(m)
    plans = _plans(m)
    assert conv_pack.pack_model(m, plans) is m
    assert all(type(m.get_submodule(n[:-7])) is conv_pack.PackedConv2d for n in plans)
    assert type(m.same) is nn.Conv2d
    x = torch.randn(3, 3, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref(x), rtol=1e-5, atol=1e-5)
