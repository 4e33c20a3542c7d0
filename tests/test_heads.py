"""New tasks with their own heads (adapter format "2") and the PEFT behaviours users rely on."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from liedeploy import (AdapterBank, AdapterFileError, LieConfig, LieError, apply_adapters_, disable_adapters,
                       load_adapter, merge_, merge_files, read_adapter, remove_adapters_, save_adapter, set_adapter,
                       unmerge_)
from liedeploy.core.adapt import adapted_names, iter_adapters
from liedeploy.cli import main
from tests.conftest import save_state_dict


class Backbone(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        h = self.norm(self.conv(x)).relu().mean((2, 3))
        return self.classifier(self.proj(h).relu())


def _base(seed=0):
    torch.manual_seed(seed)
    return Backbone().eval()


def _task(base, path, classes=10, seed=1, name=None):
    """A new task: its own head (classes outputs) trained whole, Lie adapters on conv and proj."""
    m = copy.deepcopy(base)
    m.classifier = nn.Linear(16, classes)
    apply_adapters_(m, LieConfig(r=2, targets=["conv", "proj"], modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.3)
        m.classifier.weight.copy_(torch.randn(m.classifier.weight.shape, generator=g))
        m.classifier.bias.copy_(torch.randn(m.classifier.bias.shape, generator=g))
    save_adapter(m, str(path), name=name)
    return m.eval()


def test_modules_to_save_train_and_save_whole(tmp_path):
    base = _base()
    m = copy.deepcopy(base)
    m.classifier = nn.Linear(16, 10)
    apply_adapters_(m, LieConfig(r=2, targets=["conv", "proj"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert all("lie_" in n or n.startswith("classifier.") for n in trainable)
    p = str(tmp_path / "t.safetensors")
    ref = _task(base, p)
    with safe_open(p, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format_version"] == "2"
    full = json.loads(meta["full"])
    assert full == {"classifier.weight": {"shape": [10, 16], "dtype": "F32"}, "classifier.bias": {"shape": [10], "dtype": "F32"}}
    assert {"classifier.weight", "classifier.bias"} <= keys
    # a file without full tensors stays version "1"
    p1 = str(tmp_path / "plain.safetensors")
    save_adapter(apply_adapters_(copy.deepcopy(base), LieConfig(r=2, targets=["conv"])), p1)
    with safe_open(p1, framework="pt") as f:
        assert f.metadata()["format_version"] == "1" and "full" not in f.metadata()
    # loading into a base that still has the 1,000-class head installs the task's head
    x = torch.randn(3, 3, 6, 6)
    loaded = load_adapter(_base(), p).eval()
    assert loaded.classifier.weight.shape == (10, 16) and loaded.classifier.out_features == 10
    torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)
    # removing the adapter gives the base's own head back
    remove_adapters_(loaded)
    assert loaded.classifier.weight.shape == (1000, 16)
    torch.testing.assert_close(loaded(x), base(x), rtol=0, atol=0)


def test_merge_files_bank_and_inspect_with_heads(tmp_path, capsys):
    base = _base()
    bpath = str(tmp_path / "base.safetensors")
    save_state_dict(base, bpath)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ra, rb = _task(base, a, classes=10, seed=1), _task(base, b, classes=2, seed=2)
    x = torch.randn(4, 3, 6, 6)
    out = str(tmp_path / "m.safetensors")
    merge_files(bpath, [str(a)], out)
    sd = load_file(out)
    assert sd["classifier.weight"].shape == (10, 16)
    fresh = Backbone(classes=10).eval()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), ra(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(LieError, match="both replace classifier"):
        merge_files(bpath, [str(a), str(b)], str(tmp_path / "two.safetensors"))
    # the bank serves tasks whose outputs differ from the base and from each other
    bank = AdapterBank(copy.deepcopy(base), adapters={"a": str(a), "b": str(b)})
    assert bank(x, task="a").shape == (4, 10) and bank(x, task="b").shape == (4, 2) and bank(x).shape == (4, 1000)
    torch.testing.assert_close(bank(x, task="a"), ra(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bank(x, task="b"), rb(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(LieError, match="tasks with other heads cannot share a mixed batch"):
        bank.forward_mixed(x, ["a", "b", "a", "b"])
    assert main(["inspect", str(a)]) == 0
    text = capsys.readouterr().out
    assert "full tensors (replaced whole, format_version 2)" in text and "classifier.weight" in text


REFUSALS = {
    "full listed but absent": (lambda t, m: (t.pop("classifier.bias"), m)[1], "tensor classifier.bias is missing"),
    "full tensor not listed": (lambda t, m: (t.update({"extra.weight": torch.zeros(2, 2)}), m)[1],
                               "tensor extra.weight does not belong to 'targets' or 'full'"),
    "shape disagrees": (lambda t, m: (t.update({"classifier.bias": torch.zeros(3)}), m)[1],
                        "full tensor classifier.bias is stored as F32 [3], but 'full' says F32 [10]"),
    "dtype disagrees": (lambda t, m: (t.update({"classifier.bias": torch.zeros(10, dtype=torch.float16)}), m)[1],
                        "full tensor classifier.bias is stored as F16 [10], but 'full' says F32 [10]"),
    "dtype not allowed": (lambda t, m: {**m, "full": m["full"].replace('"F32"', '"I64"', 1)},
                          "has dtype 'I64' in 'full' (expected F32, F16 or BF16)"),
    "non-finite": (lambda t, m: (t["classifier.weight"].__setitem__((0, 0), float("inf")), m)[1],
                   "full tensor classifier.weight holds non-finite values"),
    "full in version 1": (lambda t, m: {**m, "format_version": "1"}, "metadata 'full' needs format_version '2'"),
    "version 2 without full": (lambda t, m: ({k: t.pop(k) for k in ("classifier.weight", "classifier.bias")},
                                             {**{k: v for k, v in m.items() if k != "full"}, "full": "{}"})[1],
                               "format_version '2' lists no full tensors"),
    "target also full": (lambda t, m: {**m, "full": json.dumps({**json.loads(m["full"]),
                                                                 "proj.weight": {"shape": [16, 8], "dtype": "F32"}})},
                         "proj.weight is both a Lie target and a full tensor"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_format_2_refusals(tmp_path, case):
    base = _base()
    p = tmp_path / "t.safetensors"
    _task(base, p)
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    fn, msg = REFUSALS[case]
    meta = fn(t, meta)
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad, metadata=meta)
    with pytest.raises(AdapterFileError) as e:
        read_adapter(bad)
    assert str(e.value).startswith(bad + ": ") and msg in str(e.value), str(e.value)


def test_bank_graph_refuses_a_task_with_its_own_head(tmp_path):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.bank_graph import export_bank_graph

    base = _base()
    p = tmp_path / "t.safetensors"
    _task(base, p)
    with pytest.raises(LieError, match="a bank graph shares one set of weights between tasks: export it with --task-models"):
        export_bank_graph(base, torch.randn(1, 3, 6, 6), str(tmp_path / "bank.onnx"), [str(p)])


def test_task_models_export_with_heads(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from liedeploy.exporters.task_models import export_task_models

    base = _base()
    a = tmp_path / "a.safetensors"
    ra = _task(base, a, classes=3, name="three")
    out = tmp_path / "out"
    out.mkdir()
    export_task_models(copy.deepcopy(base), torch.randn(2, 3, 6, 6), str(out), [str(a)])
    sess = ort.InferenceSession(str(out / "three.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 6, 6)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (2, 3)
    torch.testing.assert_close(torch.from_numpy(got), ra(x), rtol=1e-4, atol=1e-5)


# -- PEFT parity ------------------------------------------------------------------------------------
def test_deepcopy_is_independent():
    model = apply_adapters_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LieConfig(targets=["0", "1"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.normal_()
    copy_ = copy.deepcopy(model)
    x = torch.randn(3, 4)
    want = copy_(x).detach()
    merge_(model)
    torch.testing.assert_close(copy_(x), want, rtol=0, atol=0)  # the original's merge does not touch the copy
    merge_(copy_)
    unmerge_(copy_)
    remove_adapters_(copy_)
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    assert adapted_names(copy_) == [] and isinstance(copy_[0].weight, nn.Parameter)


def test_every_target_item_must_match():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LieError, match=r"target 'mha' matches no parameter of the model"):
        apply_adapters_(model, LieConfig(targets=["mha", "0"]))
    assert adapted_names(model) == []


def test_naming_a_module_adapts_its_rank_2_parameters():
    from torch.nn.utils.parametrizations import weight_norm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = weight_norm(nn.Conv1d(8, 8, 3, padding=1))
            self.lin0 = nn.Linear(8, 8)

    m = apply_adapters_(M(), LieConfig(targets=["mha", "conv", "lin0"]))
    assert adapted_names(m) == ["mha.in_proj_weight", "conv.parametrizations.weight.original1", "lin0.weight"]
    with pytest.raises(LieError, match="target 'lin0' matches no parameter"):
        apply_adapters_(M(), LieConfig(targets=["mha", "lin0"], exclude_modules=["lin0"]))
    m3 = apply_adapters_(M(), LieConfig(targets=r".*weight.*", exclude_modules=["mha", "conv"]))
    assert adapted_names(m3) == ["lin0.weight"]


def test_all_linear_leaves_out_the_output_layer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=32, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    apply_adapters_(model, LieConfig(targets="all-linear"))
    names = adapted_names(model)
    assert "lm_head.weight" not in names and any("c_attn" in n for n in names) and any("c_fc" in n for n in names)


def test_tied_weights_are_refused_up_front():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=32)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(LieError, match=r"parameter transformer\.wte\.weight is tied to lm_head\.weight .*untie them first"):
        apply_adapters_(model, LieConfig(targets=["wte"]))
    assert adapted_names(model) == []


def test_disable_adapters_runs_the_base_bit_for_bit(tmp_path):
    base = _base()
    p = tmp_path / "t.safetensors"
    _task(base, p)
    m = load_adapter(_base(), str(p)).eval()
    x = torch.randn(2, 3, 6, 6)
    task_out = m(x)
    with disable_adapters(m):
        assert torch.equal(m(x), base(x))
    assert torch.equal(m(x), task_out)
    merge_(m)
    with disable_adapters(m):
        assert torch.equal(m(x), base(x))
    torch.testing.assert_close(m(x), task_out, rtol=1e-6, atol=1e-6)


def test_named_adapters_and_set_adapter(tmp_path):
    base = _base()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ra, rb = _task(base, a, classes=10, seed=1), _task(base, b, classes=2, seed=2)
    m = _base()
    load_adapter(m, str(a), adapter_name="a")
    load_adapter(m, str(b), adapter_name="b")
    x = torch.randn(2, 3, 6, 6)
    m.eval()
    torch.testing.assert_close(m(x), ra(x), rtol=0, atol=0)  # the first is active
    set_adapter(m, "b")
    torch.testing.assert_close(m(x), rb(x), rtol=0, atol=0)
    set_adapter(m, "a")
    torch.testing.assert_close(m(x), ra(x), rtol=0, atol=0)
    with pytest.raises(LieError, match="no adapter named 'c' on this model; loaded: a, b"):
        set_adapter(m, "c")
