import math

import pytest
import torch
import torch.nn.functional as F

from liedeploy.core.algebra import fold, fold_sum, lie_fold

# Tolerances against the float64 reference, per base dtype: the result is computed in float32 and
# rounded once, so it lies within one unit in the last place of the dtype (fp16: 2^-10 relative,
# bf16: 2^-7 relative), and within a few float32 ulps for fp32.
RTOL = {torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _reference(W, B, A, scale, expmap):
    d = (B.double() @ A.double()).reshape(W.shape) * scale
    return W.double() * (torch.exp(d) if expmap == "exact" else 1.0 + d)


def _factors(shape, r, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g)
    B = torch.randn(shape[0], r, generator=g) * std
    A = torch.randn(r, math.prod(shape[1:]), generator=g) * std
    return W, B, A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
@pytest.mark.parametrize("shape", [(7, 5), (8, 2, 3, 3), (4, 3, 2, 5, 1)])
def test_fold_and_lie_fold_match_float64(dtype, expmap, shape):
    W, B, A = _factors(shape, 3)
    W = W.to(dtype)
    ref = _reference(W, B, A, 0.7, expmap)
    for got in (fold(W, B, A, 0.7, expmap), lie_fold(W, B, A, 0.7, expmap)):
        assert got.dtype == dtype and got.shape == W.shape
        err = ((got.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        assert err <= RTOL[dtype], f"{dtype} {expmap}: max rel err {err:.3g} > {RTOL[dtype]:.3g}"


def test_fold_sum_is_exact_group_composition():
    W, B1, A1 = _factors((16, 12), 2, seed=1)
    _, B2, A2 = _factors((16, 12), 3, seed=2)
    got = fold_sum(W, [(B1, A1, 0.5), (B2, A2, -1.25)], "exact")
    d = 0.5 * (B1.double() @ A1.double()) - 1.25 * (B2.double() @ A2.double())
    ref = W.double() * torch.exp(d)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=0)
    # exp(d1) * exp(d2) == exp(d1 + d2): folding one after the other gives the same in float64 terms
    two_step = fold(fold(W.double(), B1, A1, 0.5), B2, A2, -1.25)
    torch.testing.assert_close(two_step, ref, rtol=1e-12, atol=0)


def test_fold_blocks_cover_every_row(monkeypatch):
    import liedeploy.core.algebra as alg

    monkeypatch.setattr(alg, "_CHUNK_BYTES", 64)  # force many small blocks
    W, B, A = _factors((37, 11), 2, seed=3)
    torch.testing.assert_close(alg.fold(W, B, A, 1.0).double(), _reference(W, B, A, 1.0, "exact"), rtol=2e-6, atol=0)
    torch.testing.assert_close(
        alg.fold(W.bfloat16(), B, A, 1.0).double(), _reference(W.bfloat16(), B, A, 1.0, "exact"), rtol=2.0**-7, atol=0
    )


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_gradcheck_linear_and_conv(expmap):
    torch.manual_seed(0)
    # linear
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    B = (torch.randn(5, 2, dtype=torch.float64) * 0.3).requires_grad_()
    A = (torch.randn(2, 4, dtype=torch.float64) * 0.3).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda W, B, A: F.linear(x, lie_fold(W, B, A, 0.8, expmap)), (W, B, A))
    # grouped conv: weight (out, in/groups, kh, kw)
    Wc = torch.randn(4, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    Bc = (torch.randn(4, 2, dtype=torch.float64) * 0.3).requires_grad_()
    Ac = (torch.randn(2, 6, dtype=torch.float64) * 0.3).requires_grad_()
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64)

    def conv(W, B, A):
        return F.conv2d(xc, lie_fold(W, B, A, 1.3, expmap), groups=2, dilation=(1, 2))

    assert torch.autograd.gradcheck(conv, (Wc, Bc, Ac))


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_gradcheck_many_blocks(expmap, monkeypatch):
    import liedeploy.core.algebra as alg

    monkeypatch.setattr(alg, "_CHUNK_BYTES", 40)  # 1-2 rows per block
    torch.manual_seed(1)
    W = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    B = (torch.randn(7, 2, dtype=torch.float64) * 0.3).requires_grad_()
    A = (torch.randn(2, 6, dtype=torch.float64) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda W, B, A: lie_fold(W, B, A, 0.6, expmap).sin(), (W, B, A))


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_forward_keeps_no_full_size_tensor(expmap):
    """The exact map must not keep exp(dW) or any other W-sized intermediate for backward."""
    W = torch.randn(64, 48)
    B = (torch.randn(64, 4) * 0.1).requires_grad_()
    A = (torch.randn(4, 48) * 0.1).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lie_fold(W, B, A, 0.5, expmap)
    full_size_new = [t for t in saved if t.numel() >= W.numel() and t.data_ptr() != W.data_ptr()]
    assert full_size_new == []
    assert out.shape == W.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_in_place_into_w(dtype, monkeypatch):
    import liedeploy.core.algebra as alg

    monkeypatch.setattr(alg, "_CHUNK_BYTES", 100)  # several blocks
    W, B, A = _factors((13, 4, 3), 2, seed=4)
    W = W.to(dtype)
    ref = _reference(W, B, A, 0.9, "exact")
    out = alg.fold_sum(W, [(B, A, 0.9)], "exact", out=W)
    assert out.data_ptr() == W.data_ptr()
    assert ((W.double() - ref).abs() / ref.abs()).max() <= RTOL[dtype]


def test_a_fold_of_nothing_reports_its_check():
    W = torch.full((2, 2), 1e6)
    ok: list = []
    out = fold_sum(W, [], "exact", out_dtype=torch.float16, check=ok)
    assert ok == [False] and torch.isinf(out).all()  # 1e6 does not fit fp16
