import copy
import math

import pytest
import torch
from torch import nn

from liedeploy import LieConfig, LieError, apply_adapters_, remove_adapters_, trainable_parameter_count
from liedeploy.core.adapt import adapted_names, iter_adapters

from .layer_cases import CASES, make_case, randomize_factors


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_at_init(case):
    model, x = make_case(case)
    ref = model(x)
    apply_adapters_(model, LieConfig(r=2, targets=["0"]))
    assert adapted_names(model) == ["0.weight"]
    assert torch.equal(model(x), ref)  # exp(0) == 1 exactly


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_adapted_forward_matches_float64_reference(case, expmap):
    """The module's own forward runs with W' = W * map(dW); reference in float64 written here."""
    model, x = make_case(case)
    base = copy.deepcopy(model)
    W0 = model[0].weight.detach().clone()
    apply_adapters_(model, LieConfig(r=3, alpha=1.5, expmap=expmap, targets=["0.weight"]))
    randomize_factors(model)
    lie = model[0].parametrizations.weight[0]
    d = (lie.lie_B.double() @ lie.lie_A.double()).reshape(W0.shape) * (1.5 / 3)
    W_ref = W0.double() * (torch.exp(d) if expmap == "exact" else 1 + d)
    got = model[0].weight
    torch.testing.assert_close(got.double(), W_ref, rtol=1e-6, atol=1e-7)
    # the forward is the layer's own computation with the adapted weight
    with torch.no_grad():
        base[0].weight.copy_(W_ref.float())
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_count_and_frozen_base(case):
    model, x = make_case(case)
    W = model[0].weight
    W_before = W.detach().clone()
    apply_adapters_(model, LieConfig(r=3, targets=["0"]))
    shape = W.shape
    assert trainable_parameter_count(model) == 3 * (shape[0] + math.prod(shape[1:]))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lie_" not in n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        out = model(x)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    original = model[0].parametrizations.weight.original
    assert original is W  # the very same tensor object
    assert torch.equal(original, W_before)  # untouched
    lie = model[0].parametrizations.weight[0]
    assert lie.lie_B.abs().sum() > 0  # it did train


def test_targets_suffix_module_regex_and_filter():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1)))
    m = apply_adapters_(copy.deepcopy(model), LieConfig(targets=["0"]))
    assert adapted_names(m) == ["0.weight", "2.0.weight"]  # module-name suffix, weights only
    m = apply_adapters_(copy.deepcopy(model), LieConfig(targets=["2.0.weight"]))
    assert adapted_names(m) == ["2.0.weight"]
    m = apply_adapters_(copy.deepcopy(model), LieConfig(targets=r"2\.\d\.weight"))
    assert adapted_names(m) == ["2.0.weight", "2.1.weight"]
    m = apply_adapters_(
        copy.deepcopy(model), LieConfig(filter_fn=lambda mod, name: isinstance(mod, nn.Conv1d) and name.endswith("weight"))
    )
    assert adapted_names(m) == ["2.1.weight"]
    m = apply_adapters_(
        copy.deepcopy(model),
        LieConfig(r=2, alpha=4, targets=["0", "1"], rank_pattern={r"2\.1": 1}, alpha_pattern={r"^0": 8}),
    )
    lies = {n: lie for n, _, _, lie in iter_adapters(m)}
    assert lies["2.1.weight"].r == 1 and lies["2.0.weight"].r == 2
    assert lies["0.weight"].scale == 4.0 and lies["2.0.weight"].scale == 2.0 and lies["2.1.weight"].scale == 4.0


def test_errors_name_the_problem():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LieError, match=r"target .nope. matches no parameter of the model"):
        apply_adapters_(model, LieConfig(targets=["nope"]))
    with pytest.raises(LieError, match=r"parameter 0\.bias has shape \(4,\): Lie adapters need a tensor of rank >= 2"):
        apply_adapters_(model, LieConfig(targets=["0.bias"]))
    assert adapted_names(model) == []  # a refused call changes nothing
    assert all(p.requires_grad for p in model.parameters())
    apply_adapters_(model, LieConfig(targets=["0"]))
    with pytest.raises(LieError, match=r"the model already has Lie adapters \(on 0\.weight\)"):
        apply_adapters_(model, LieConfig(targets=["0"]))
    remove_adapters_(model)
    assert adapted_names(model) == [] and isinstance(model[0].weight, nn.Parameter)


def test_factor_dtype_for_half_bases():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    apply_adapters_(model, LieConfig(targets=["0"]))
    lie = model[0].parametrizations.weight[0]
    assert lie.lie_A.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16


def test_list_items_may_be_regexes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1)))
    m = apply_adapters_(copy.deepcopy(model), LieConfig(targets=[r"1\.\d", "0"]))
    assert adapted_names(m) == ["0.weight", "1.0.weight", "1.1.weight"]
    m = apply_adapters_(copy.deepcopy(model), LieConfig(targets=[r".*1\.weight"]))
    assert adapted_names(m) == ["1.1.weight"]
