"""The fused fold (one generated kernel per block, torch.compile) against the blocked eager fold and
a float64 reference, on every layer kind, in fp32, fp16 and bf16. The fused path is forced on CPU
here (on CPU ``auto`` picks the blocked path).

Contract: both round once from the float64-exact value up to the float32 compute (tolerance: one
rounding of the output dtype, i.e. 2 ulp of the output plus 1e-6 relative for the float32 exp);
zeros stay zeros; non-finite results are refused; the blocked path is what ``auto`` runs on CPU.
"""

import pytest
import torch

from liedeploy.core.algebra import fold_sum
from liedeploy.core.fused import fold_path

from .layer_cases import CASES, make_case, randomize_factors

pytestmark = pytest.mark.slow  # one compile per dtype and map


def _factors(model):
    from liedeploy import LieConfig, apply_adapters_
    from liedeploy.core.adapt import iter_adapters

    apply_adapters_(model, LieConfig(r=2, alpha=2, targets=["0.weight"]))
    randomize_factors(model)
    (_, m, attr, lie), = list(iter_adapters(model))
    return m.parametrizations[attr].original.detach(), lie


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_fused_and_blocked_folds_agree_on_every_layer_kind(dtype, expmap):
    eps = torch.finfo(dtype).eps
    for case in sorted(CASES):
        model, _ = make_case(case)
        W, lie = _factors(model)
        W = W.to(dtype)
        W.view(-1)[::3] = 0  # zeros of the base
        f = [(lie.lie_B, lie.lie_A, lie.scale)]
        blocked = fold_sum(W, f, expmap, path="blocked")
        fused = fold_sum(W, f, expmap, path="fused")
        dW = (lie.lie_B.double() @ lie.lie_A.double()).reshape(W.shape) * lie.scale
        ref = W.double() * (torch.exp(dW) if expmap == "exact" else 1 + dW)
        for got in (blocked, fused):
            assert got.dtype == dtype
            err = (got.double() - ref).abs() - (2 * eps * ref.abs() + 1e-6 * ref.abs())
            assert float(err.max()) <= 0, (case, dtype, expmap)
            assert bool((got.view(-1)[::3] == 0).all()), case  # zeros stay zeros
        assert float((fused.double() - blocked.double()).abs().max()) <= float(2 * eps * ref.abs().max()), case


def test_fused_fold_refuses_non_finite_results_like_the_blocked_one():
    W = torch.full((4, 4), 60000.0, dtype=torch.float16)
    B, A = torch.ones(4, 1), torch.ones(1, 4)
    for path in ("blocked", "fused"):
        ok: list = []
        fold_sum(W, [(B, A, 1.0)], "exact", check=ok, path=path)
        assert ok == [False], path


def test_auto_picks_the_blocked_path_on_cpu_and_the_env_forces_either(monkeypatch):
    monkeypatch.delenv("LIEDEPLOY_FOLD", raising=False)
    assert fold_path(torch.device("cpu")) == "blocked"
    monkeypatch.setenv("LIEDEPLOY_FOLD", "fused")
    assert fold_path(torch.device("cpu")) == "fused"
    monkeypatch.setenv("LIEDEPLOY_FOLD", "blocked")
    assert fold_path(torch.device("cpu")) == "blocked"
