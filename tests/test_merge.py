
import pytest
import torch
from torch import nn

from liedeploy import LieConfig, LieError, apply_adapters_, merge_, save_adapter, unmerge_
from liedeploy.core.adapt import adapted_names, iter_adapters
from liedeploy.core.merge import is_merged

from .layer_cases import make_case, randomize_factors
from tests.conftest import save_state_dict


@pytest.mark.parametrize(
    "case", ["linear", "conv2d_zeros", "conv2d_reflect", "conv2d_depthwise", "convtranspose2d", "hf_conv1d", "embedding"]
)
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_merged_equals_unmerged(case, expmap):
    model, x = make_case(case)
    apply_adapters_(model, LieConfig(r=3, alpha=6, expmap=expmap, targets=["0"]))
    randomize_factors(model)
    with torch.no_grad():
        ref = model(x)
        merge_(model)
        assert adapted_names(model) == [] and is_merged(model)
        assert type(model[0].weight) is nn.Parameter and not hasattr(model[0], "parametrizations")
        got = model(x)
    if got.is_floating_point():
        assert ((got - ref).abs() / ref.abs().clamp_min(1e-3)).max() <= 1e-5


def test_merge_is_plain_base_architecture_state_dict():
    model, _ = make_case("conv2d_zeros")
    keys = set(model.state_dict())
    apply_adapters_(model, LieConfig(targets=["0"]))
    merge_(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_1000_merge_unmerge_cycles_are_bit_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv1d(8, 8, 3, groups=2)).to(dtype)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters_(model, LieConfig(r=2, targets=["0", "1"]))
    randomize_factors(model)
    merge_(model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(1000):
        unmerge_(model)
        merge_(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k
    unmerge_(model)
    base = {n: lie for n, _, _, lie in iter_adapters(model)}
    assert set(base) == {"0.weight", "1.weight"}
    for n, module, attr, _ in iter_adapters(model):
        assert torch.equal(module.parametrizations[attr].original, pristine[n])


def test_unmerge_from_kept_copy_on_cpu_and_from_file(tmp_path):

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    base_file = str(tmp_path / "base.safetensors")
    save_state_dict(model, base_file)
    pristine = model[0].weight.detach().clone()
    apply_adapters_(model, LieConfig(targets=["0"]))
    randomize_factors(model)
    merge_(model, keep_base="cpu")
    unmerge_(model)
    assert torch.equal(model[0].parametrizations.weight.original, pristine)
    storage = model[0].parametrizations.weight.original.data_ptr()
    merge_(model, keep_base=False)
    assert model[0].weight.data_ptr() == storage  # folded in place: no new memory
    with pytest.raises(LieError, match="merge_ was called with keep_base=False"):
        unmerge_(model)
    unmerge_(model, base=base_file)
    assert torch.equal(model[0].parametrizations.weight.original, pristine)


def test_merge_refuses_overflow_and_stays_unmerged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).half()
    apply_adapters_(model, LieConfig(r=1, alpha=1, targets=["0", "1"]))
    with torch.no_grad():
        lie = model[1].parametrizations.weight[0]
        lie.lie_B.fill_(6.0)
        lie.lie_A.fill_(6.0)  # dW = 36: exp(36) ~ 4e15 overflows fp16
    with pytest.raises(LieError, match=r"merging 1\.weight overflows torch\.float16: the largest \|dW\| is 36"):
        merge_(model)
    assert adapted_names(model) == ["0.weight", "1.weight"]  # nothing half-merged


def test_save_adapter_from_merged_model(tmp_path):
    model, x = make_case("linear")
    apply_adapters_(model, LieConfig(targets=["0"]))
    randomize_factors(model)
    a = str(tmp_path / "a.safetensors")
    save_adapter(model, a)
    merge_(model)
    b = str(tmp_path / "b.safetensors")
    save_adapter(model, b)
    from liedeploy import read_adapter

    ra, rb = read_adapter(a), read_adapter(b)
    assert ra.base_sha256 == rb.base_sha256
    assert all(torch.equal(ra.factors[k][0], rb.factors[k][0]) for k in ra.factors)


def test_tied_tensors_are_refused_before_anything_changes():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as GPT-2's wte / lm_head
    model = nn.Sequential(emb, head)
    with pytest.raises(LieError, match=r"parameter 0\.weight is tied to 1\.weight \(one tensor, two names\)"):
        apply_adapters_(model, LieConfig(targets=["0"]))
    assert model[1].weight is model[0].weight and all(p.requires_grad for p in model.parameters())


def test_remerge_reuses_the_merged_storage_unless_released():
    model, x = make_case("linear")
    apply_adapters_(model, LieConfig(targets=["0"]))
    randomize_factors(model)
    merge_(model)
    first = model[0].weight
    ptr, values = first.data_ptr(), first.detach().clone()
    unmerge_(model)
    randomize_factors(model, seed=9)  # another task's factors
    merge_(model)
    assert model[0].weight is first and first.data_ptr() == ptr  # same parameter, same storage
    assert not torch.equal(first, values)  # holding the new task's values
    unmerge_(model, release=True)
    merge_(model)
    assert model[0].weight.data_ptr() != ptr
