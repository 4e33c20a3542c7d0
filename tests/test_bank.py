import copy
import random
import threading

import pytest
import torch
from torch import nn

from liedeploy import AdapterBank, AdapterFileError, LieConfig, LieError, apply_adapters_, load_adapter, merge_, save_adapter
from liedeploy.core.adapt import iter_adapters
from tests.models import ConvNormHead


def _base(seed=0):
    torch.manual_seed(seed)
    return ConvNormHead().eval()


def _task(base, path, seed):
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, alpha=4, targets=["conv", "fc"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.3)
    save_adapter(m, path, name=path)
    return merge_(m).eval()


@pytest.fixture
def bank_setup(tmp_path):
    base = _base()
    refs, paths = {}, {}
    for i in range(4):
        p = str(tmp_path / f"t{i}.safetensors")
        refs[f"t{i}"] = _task(base, p, seed=10 + i)
        paths[f"t{i}"] = p
    return base, refs, paths


def test_each_task_equals_its_merged_model(bank_setup):
    base, refs, paths = bank_setup
    bank = AdapterBank(copy.deepcopy(base), adapters=paths)
    x = torch.randn(3, 3, 6, 6)
    for name, ref in refs.items():
        torch.testing.assert_close(bank(x, task=name), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(bank(x), base(x), rtol=0, atol=0)  # task=None: the base
    # unadapted tensors are shared with the base, only adapted ones differ
    rep = bank.model_for("t0")
    assert rep.norm.weight is bank.base.norm.weight and rep.conv.bias is bank.base.conv.bias
    assert rep.conv.weight is not bank.base.conv.weight


def test_mixed_batch_equals_per_sample(bank_setup):
    base, refs, paths = bank_setup
    bank = AdapterBank(copy.deepcopy(base), adapters=paths)
    x = torch.randn(10, 3, 6, 6)
    tasks = ["t1", "t0", None, "t3", "t1", "t2", "t0", "t3", None, "t2"]
    out = bank.forward_mixed(x, tasks)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out[i : i + 1], bank(x[i : i + 1], task=t), rtol=1e-6, atol=1e-6)
    with pytest.raises(LieError, match="forward_mixed got 2 task names for a batch of 10"):
        bank.forward_mixed(x, ["t0", "t1"])


def test_threads_never_see_another_tasks_weights(bank_setup):
    base, refs, paths = bank_setup
    # a cache that holds two tasks: constant eviction and refolding while other threads run
    one_task = sum(p.numel() * 4 for n, p in base.named_parameters() if n in ("conv.weight", "fc.weight"))
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=2 * one_task)
    x = torch.randn(2, 3, 6, 6)
    expected = {n: r(x) for n, r in refs.items()}
    errors, bad = [], []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(200):
                t = rng.choice(list(refs))
                if not torch.equal(bank(x, task=t), expected[t]):
                    bad.append(t)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bad == []
    assert bank.stats["evictions"] > 0 and bank.cached_bytes <= 2 * one_task


def test_lru_bytes_add_remove_reload(bank_setup, tmp_path):
    base, refs, paths = bank_setup
    bank = AdapterBank(copy.deepcopy(base), cache_bytes=10**9)
    bank.add("a", paths["t0"])
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(bank(x, task="a"), refs["t0"](x), rtol=0, atol=0)
    assert bank.cached_bytes == (8 * 3 * 9 + 5 * 8) * 4
    bank.add("a", paths["t1"], replace=True)  # reload while serving
    torch.testing.assert_close(bank(x, task="a"), refs["t1"](x), rtol=0, atol=0)
    with pytest.raises(LieError, match="task 'a' is already in the bank; pass replace=True"):
        bank.add("a", paths["t2"])
    bank.remove("a")
    with pytest.raises(LieError, match=r"unknown task 'a'; known tasks: none"):
        bank(x, task="a")
    bank.add("b", paths["t2"])
    with pytest.raises(LieError, match=r"unknown task 'zz'; known tasks: b"):
        bank(x, task="zz")


def test_adapter_for_another_base_is_refused(bank_setup, tmp_path):
    _, _, paths = bank_setup
    other = _base(seed=99)
    bank = AdapterBank(other)
    with pytest.raises(AdapterFileError, match=r"base tensor (conv|fc)\.weight differs from the one this adapter was trained on"):
        bank.add("t0", paths["t0"])
    assert bank.tasks == []


def test_bank_needs_plain_base(bank_setup):
    base, _, paths = bank_setup
    m = load_adapter(copy.deepcopy(base), paths["t0"])
    with pytest.raises(LieError, match="AdapterBank needs the plain base model"):
        AdapterBank(m)


def test_mixed_batch_with_structured_outputs(bank_setup):
    base, refs, paths = bank_setup

    class Two(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            return {"logits": y, "extra": (y * 2, y.sum(1))}

    from liedeploy import read_adapter  # the adapter names parameters of ConvNormHead: rename them for the wrapper
    from safetensors.torch import load_file, save_file

    af = read_adapter(paths["t0"])
    meta = dict(af.metadata)
    meta["targets"] = meta["targets"].replace('"conv.', '"net.conv.').replace('"fc.', '"net.fc.')
    meta["base_sha256"] = meta["base_sha256"].replace('"conv.', '"net.conv.').replace('"fc.', '"net.fc.')
    wrapped = paths["t0"] + ".wrapped.safetensors"
    save_file({"net." + k: v for k, v in load_file(paths["t0"]).items()}, wrapped, metadata=meta)
    bank = AdapterBank(Two(copy.deepcopy(base)), adapters={"a": wrapped})
    x = torch.randn(5, 3, 6, 6)
    out = bank.forward_mixed(x, ["a", None, "a", None, "a"])
    assert set(out) == {"logits", "extra"} and out["extra"][1].shape == (5,)
    for i, t in enumerate(["a", None, "a", None, "a"]):
        one = bank(x[i : i + 1], task=t)
        torch.testing.assert_close(out["logits"][i : i + 1], one["logits"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["extra"][1][i : i + 1], one["extra"][1], rtol=1e-6, atol=1e-6)


def test_evicted_storage_is_recycled_but_never_under_a_holder(bank_setup):
    base, refs, paths = bank_setup
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=one_task)
    x = torch.randn(2, 3, 6, 6)
    held = bank.model_for("t0")  # a replica handed out: its tensors must never be reused
    for _ in range(3):
        for t in ("t1", "t2", "t3"):
            torch.testing.assert_close(bank(x, task=t), refs[t](x), rtol=0, atol=0)
    assert bank.stats["recycled"] > 0  # evicted tasks' storage was reused for later folds
    with torch.no_grad():
        torch.testing.assert_close(held(x), refs["t0"](x), rtol=0, atol=0)


def test_bank_takes_parametrized_bases(tmp_path, write_adapter):
    """weight_norm (as in Wav2Vec2, HuBERT, EnCodec, vocoders) refuses copy.copy; replicas still work."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    base = nn.Sequential(weight_norm(nn.Conv1d(3, 6, 3, padding=1)), nn.ReLU(), nn.Conv1d(6, 4, 1)).eval()
    # the adapted tensor may itself be a parametrization's original (v of weight_norm) or a plain one
    p = write_adapter(base, tmp_path / "a.safetensors", ["0.parametrizations.weight.original1", "2.weight"], std=0.3)
    bank = AdapterBank(copy.deepcopy(base), adapters={"a": p})
    ref = merge_(load_adapter(copy.deepcopy(base), p)).eval()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(bank(x, task="a"), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bank(x), base(x), rtol=0, atol=0)


def test_bank_on_a_wav2vec2_base(tmp_path, write_adapter):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    base = transformers.Wav2Vec2Model(cfg).eval()
    p = write_adapter(base, tmp_path / "a.safetensors", r".*(q_proj|v_proj)\.weight", std=0.3)
    bank = AdapterBank(copy.deepcopy(base), adapters={"a": p})
    ref = merge_(load_adapter(copy.deepcopy(base), p)).eval()
    x = torch.randn(2, 400)
    with torch.no_grad():
        want = ref(x).last_hidden_state
    torch.testing.assert_close(bank(x, task="a").last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_lazy_registration_reads_factors_only_when_folded(bank_setup, monkeypatch):
    import liedeploy.bank.task_registry as reg

    base, refs, paths = bank_setup
    reads = []
    real = reg.read_adapter
    monkeypatch.setattr(reg, "read_adapter", lambda p, **kw: reads.append(p) or real(p, **kw))
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, lazy=True)
    assert reads == [] and bank.tasks == list(paths)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(bank(x, task="t2"), refs["t2"](x), rtol=0, atol=0)
    assert reads == [paths["t2"]]
    bank(x, task="t2")
    assert reads == [paths["t2"]] and bank.stats["folds"] == 1 and bank.is_resident("t2")
    # a header made for another base is refused at registration, without reading the factors
    with pytest.raises(AdapterFileError, match="differs from the one this adapter was trained on"):
        AdapterBank(_base(seed=5), adapters={"t0": paths["t0"]}, lazy=True)
    assert reads == [paths["t2"]]


def test_a_lease_holds_storage_until_released_then_it_is_recycled(bank_setup):
    base, refs, paths = bank_setup
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=one_task)
    x = torch.randn(2, 3, 6, 6)
    shared = {p.data_ptr() for p in bank.base.parameters()}

    def own(model):
        return {p.data_ptr() for p in model.parameters()} - shared

    with bank.lease(None) as held:
        assert held.model is bank.base
    held = bank.lease("t0")
    t0 = own(held.model)
    bank.prefetch("t1")  # evicts t0, whose storage the lease still holds
    with bank.lease("t1") as t1:
        assert not own(t1.model) & t0
    with torch.no_grad():
        torch.testing.assert_close(held.model(x), refs["t0"](x), rtol=0, atol=0)
    held.release()
    held.release()  # idempotent
    with bank.lease("t2") as t2:  # folded into t0's storage, free now
        assert own(t2.model) and own(t2.model) <= t0
        with torch.no_grad():
            torch.testing.assert_close(t2.model(x), refs["t2"](x), rtol=0, atol=0)


def test_a_recycled_replica_serves_the_next_fold_and_never_a_holder(bank_setup, tmp_path):
    base, refs, paths = bank_setup
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=one_task)
    x = torch.randn(2, 3, 6, 6)
    with bank.lease("t0") as first:
        tree = first.model
    bank.prefetch("t1")  # evicts t0, free: its module tree is kept for the next fold of the same names
    with bank.lease("t2") as t2:
        assert t2.model is tree  # reused, not cloned again
        with torch.no_grad():
            torch.testing.assert_close(t2.model(x), refs["t2"](x), rtol=0, atol=0)
    held = bank.model_for("t3")  # handed out: never recycled, never refilled with another task
    for _ in range(2):
        for t in ("t0", "t1", "t2"):
            torch.testing.assert_close(bank(x, task=t), refs[t](x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(held(x), refs["t3"](x), rtol=0, atol=0)
    # a task that replaces other tensors (a head of its own) gets a tree built for its names
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, alpha=4, targets=["conv"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.3)
    p = str(tmp_path / "conv_only.safetensors")
    save_adapter(m, p, name="conv-only")
    bank.add("conv-only", p)
    with torch.no_grad():
        torch.testing.assert_close(bank(x, task="conv-only"), merge_(m).eval()(x), rtol=0, atol=0)
        assert bank.model_for("conv-only").fc.weight is bank.base.fc.weight
