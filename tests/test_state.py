"""The model's adapter state has one owner (``liedeploy.core.state``): regressions of the bugs the
scattered attributes caused, and the state's contract (state_dict keys, .to(), deepcopy)."""

import copy

import pytest
import torch
from torch import nn

from liedeploy import (
    AdapterBank,
    LieConfig,
    LieError,
    apply_adapters_,
    load_adapter,
    merge_,
    remove_adapters_,
    save_adapter,
    set_adapter,
    unmerge_,
)
from liedeploy.core.named import active_adapter, disable_adapters, list_adapters
from liedeploy.core.state import lie_state

from .layer_cases import randomize_factors


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _adapted(seed=1):
    model = apply_adapters_(_net(), LieConfig(r=2, targets=["0", "2"]))
    randomize_factors(model, seed=seed)
    return model


def test_remove_adapters_after_merge_gives_the_base_and_the_bank_accepts_it():  # bug 1
    base, model = _net(), _adapted()
    x = torch.randn(4, 6)
    merge_(model)
    remove_adapters_(model)
    assert lie_state(model) is None
    assert torch.equal(model(x), base(x))
    assert set(model.state_dict()) == set(base.state_dict())
    AdapterBank(model)  # no longer refused


def test_remove_adapters_after_an_in_place_merge_is_refused_with_the_way_out():
    model = _adapted()
    merge_(model, keep_base=False)
    with pytest.raises(LieError, match=r"keep_base=False.*unmerge_\(model, base="):
        remove_adapters_(model)


def test_remove_adapters_forgets_named_adapters(tmp_path):  # bug 2
    path = save_adapter(_adapted(), str(tmp_path / "a.safetensors"))
    model = _net()
    load_adapter(model, path, adapter_name="a")
    assert list_adapters(model) == ["a"] and active_adapter(model) == "a"
    remove_adapters_(model)
    assert list_adapters(model) == [] and active_adapter(model) is None
    with pytest.raises(LieError, match="no adapter named 'a' on this model; loaded: none"):
        set_adapter(model, "a")


def test_kept_pristine_copy_follows_double_and_unmerge_restores_it(tmp_path):  # bug 3
    base, model = _net(), _adapted()
    merge_(model)
    model.double()
    for rec in lie_state(model).merged.values():
        assert rec.kept.dtype == torch.float64
    unmerge_(model)
    for name in ("0", "2"):
        original = model.get_submodule(name).parametrizations.weight.original
        assert original.dtype == torch.float64
        assert torch.equal(original, base.get_submodule(name).weight.double())


def test_kept_copy_on_another_device_keeps_its_device_and_follows_dtype():
    model = _adapted()
    merge_(model, keep_base="cpu")
    model.half()
    assert all(r.kept.dtype == torch.float16 and r.kept.device.type == "cpu" for r in lie_state(model).merged.values())


def test_state_adds_no_state_dict_key_live_or_merged():
    base, model = _net(), _adapted()
    live_keys = set(model.state_dict())
    assert all(".parametrizations." in k or k in base.state_dict() for k in live_keys)
    merge_(model)
    assert set(model.state_dict()) == set(base.state_dict())
    unmerge_(model)
    assert set(model.state_dict()) == live_keys


def test_state_is_not_a_child_module_so_sequential_runs():
    model = _adapted()
    assert "lie_state" not in dict(model.named_modules())
    model(torch.randn(2, 6))


def test_deepcopy_copies_the_state_independently():
    model = _adapted()
    merge_(model)
    twin = copy.deepcopy(model)
    assert lie_state(twin) is not lie_state(model)
    unmerge_(twin)
    assert lie_state(model).is_merged and not lie_state(twin).is_merged
    rec_modules = {id(r.module) for r in lie_state(model).merged.values()}
    assert not rec_modules & {id(m) for m in twin.modules()}


def test_disable_adapters_flips_one_switch():
    base, model = _net(), _adapted()
    x = torch.randn(3, 6)
    with disable_adapters(model):
        assert not lie_state(model).enabled
        assert torch.equal(model(x), base(x))
    assert lie_state(model).enabled and not torch.equal(model(x), base(x))


def test_the_model_gets_no_other_attribute():
    model = _adapted()
    merge_(model)
    unmerge_(model)
    extra = set(vars(model)) - set(vars(_net()))
    assert extra == {"lie_state"}
