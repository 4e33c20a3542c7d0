"""A fold given max|W| settles its finiteness check from the factors when it can (no second read
of the result) and scans otherwise: the answer is the same as the scan's, in fp32/fp16/bf16."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from liedeploy.core.algebra import fold_sum


class _CountSums(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sums = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("sum", "isfinite"):
            self.sums += 1
        return func(*args, **(kwargs or {}))


def _case(dtype, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(96, 40, generator=g).to(dtype)
    W.view(-1)[::5] = 0
    B, A = torch.randn(96, 4, generator=g) * scale, torch.randn(4, 40, generator=g) * scale
    return W, B, A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_a_bounded_fold_skips_the_scan_and_equals_the_scanned_one(dtype, expmap):
    W, B, A = _case(dtype)
    scanned: list = []
    ref = fold_sum(W, [(B, A, 2.0)], expmap, check=scanned)
    bounded: list = []
    with _CountSums() as mode:
        got = fold_sum(W, [(B, A, 2.0)], expmap, check=bounded, w_absmax=float(W.abs().amax()))
    assert scanned == bounded == [True]
    assert mode.sums == 0  # proven finite from the factors: the result was not read again
    assert torch.equal(got, ref)
    # and the float64 reference: one rounding of the output dtype (2 ulp) plus 1e-6 relative
    dW = (B.double() @ A.double()) * 2.0
    exact = W.double() * (torch.exp(dW) if expmap == "exact" else 1 + dW)
    assert float(((got.double() - exact).abs() - (2 * torch.finfo(dtype).eps + 1e-6) * exact.abs()).max()) <= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_overflowing_fold_is_still_refused_with_a_bound_given(dtype):
    W = torch.full((4, 4), float(torch.finfo(dtype).max) / 4, dtype=torch.float32).to(dtype)
    B, A = torch.full((4, 1), 3.0), torch.ones(1, 4)  # exp(3) * max/4 overflows
    ok: list = []
    fold_sum(W, [(B, A, 1.0)], "exact", check=ok, w_absmax=float(W.float().abs().amax()))
    assert ok == [False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_factors_fall_back_to_the_scan(bad):
    W, B, A = _case(torch.float32)
    B[3, 1] = bad
    ok: list = []
    with _CountSums() as mode:
        out = fold_sum(W, [(B, A, 1.0)], "exact", check=ok, w_absmax=float(W.abs().amax()), path="blocked")
    assert mode.sums > 0  # the bound proved nothing: the result was scanned
    assert ok == [bool(torch.isfinite(out).all())]
    if bad != float("-inf"):  # -inf in a factor maps to exp(-inf) = 0: finite, and scanned so
        assert ok == [False]
    fused: list = []  # the fused kernel flags non-finite results as it writes them: the same answer
    out2 = fold_sum(W, [(B, A, 1.0)], "exact", check=fused, w_absmax=float(W.abs().amax()), path="fused")
    assert fused == ok
    assert torch.equal(torch.isfinite(out2), torch.isfinite(out))


def test_a_large_but_finite_fold_near_the_limit_is_scanned_and_accepted():
    W, B, A = _case(torch.float16, scale=1.0)  # exp of up to ~|4|: the bound is loose, the values fit
    ok: list = []
    with _CountSums() as mode:  # a bound that proves nothing
        out = fold_sum(W, [(B, A, 1.0)], "exact", check=ok, w_absmax=1e4, path="blocked")
    assert mode.sums > 0 and ok == [True] and bool(torch.isfinite(out).all())
    fused: list = []
    assert torch.equal(fold_sum(W, [(B, A, 1.0)], "exact", check=fused, w_absmax=1e4, path="fused"), out)
    assert fused == [True]
