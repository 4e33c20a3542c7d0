"""Every layer kind of ``layer_cases.CASES`` through every path that holds adapter state (PEFT's
TEST_CASES x common tester): adapt, save/load, merge_/unmerge_, merge_files, the bank,
remove_adapters_ and deepcopy. Each path is checked against a float64 reference written here.

Reference: y_ref = the layer's own forward with W' = W * exp(scale * reshape(B @ A)) computed in
float64 and rounded once to float32 (the same contract as merge_). Tolerance: outputs within
1e-5 relative to the largest |y| (fp32 forwards of the same weights), weights bit for bit where the
contract says so.
"""

import copy

import pytest
import torch

from liedeploy import AdapterBank, LieConfig, apply_adapters_, load_adapter, merge_, merge_files, remove_adapters_
from liedeploy import save_adapter, unmerge_
from liedeploy.core.adapt import iter_adapters
from liedeploy.core.state import lie_state

from .layer_cases import CASES, make_case, randomize_factors
from tests.conftest import save_state_dict


def _reference_weight(W, lie):
    dW = (lie.lie_B.double() @ lie.lie_A.double()).reshape(W.shape) * lie.scale
    return (W.double() * torch.exp(dW)).to(W.dtype)


def _reference_output(model, x):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        weights = {P: _reference_weight(m.parametrizations[a].original, lie) for P, m, a, lie in iter_adapters(ref)}
    remove_adapters_(ref)
    with torch.no_grad():
        for P, w in weights.items():
            ref.get_parameter(P).copy_(w)
        return ref(x), weights


def _close(a, b, tol=1e-5):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


def _adapted(case):
    model, x = make_case(case)
    base = copy.deepcopy(model)
    apply_adapters_(model, LieConfig(r=2, alpha=2, targets=["0.weight"]))
    randomize_factors(model)
    return base, model, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_layer_kind_through_every_path(case, tmp_path):
    base, model, x = _adapted(case)
    with torch.no_grad():
        y_base = base(x)
        y_ref, w_ref = _reference_output(model, x)
        assert _close(model(x), y_ref)

        # save / load into a fresh base
        path = save_adapter(model, str(tmp_path / "t.safetensors"))
        loaded = load_adapter(copy.deepcopy(base), path)
        assert _close(loaded(x), y_ref)

        # merge_ / unmerge_: the merged weight equals the reference fold, unmerge gives the base back
        merged = merge_(copy.deepcopy(loaded))
        assert torch.equal(merged.get_parameter("0.weight"), w_ref["0.weight"]) or _close(
            merged.get_parameter("0.weight"), w_ref["0.weight"], 1e-6)
        assert _close(merged(x), y_ref)
        unmerge_(merged)
        assert torch.equal(merged[0].parametrizations.weight.original, base[0].weight)

        # merge_files: the merged file holds the same weight as merge_
        save_state_dict(base, str(tmp_path / "base.safetensors"))
        merge_files(str(tmp_path / "base.safetensors"), [path], str(tmp_path / "merged.safetensors"))
        from safetensors.torch import load_file

        w_file = load_file(str(tmp_path / "merged.safetensors"))["0.weight"]
        assert _close(w_file, w_ref["0.weight"], 1e-6)

        # the bank
        bank = AdapterBank(copy.deepcopy(base), adapters={"t": path})
        assert _close(bank(x, task="t"), y_ref)
        assert torch.equal(bank(x, task=None), y_base)

        # remove_adapters_ on a live and on a merged model: the base, no state left
        for m in (copy.deepcopy(loaded), merge_(copy.deepcopy(loaded))):
            remove_adapters_(m)
            assert lie_state(m) is None and not list(iter_adapters(m))
            assert set(m.state_dict()) == set(base.state_dict())
            assert torch.equal(m(x), y_base)

        # deepcopy: independent copies
        twin = copy.deepcopy(loaded)
        remove_adapters_(twin)
        assert _close(loaded(x), y_ref) and torch.equal(twin(x), y_base)
