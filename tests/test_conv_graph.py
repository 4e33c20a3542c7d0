"""Packed models run as one captured graph (liedeploy.core.conv_graph): batch norms folded into the
packed convolutions, ReLU and residual adds fused, per-task norms, and the fallback to modules.

References are float64 runs of the eager model written here; packed convolutions are float32 only
(fp16/bf16 models are never packed), so the tolerances are float32's: 1e-5 relative to the output's
scale (oneDNN sums in its own order, and the norm's scale is rounded into the weight).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liedeploy import AdapterBank, LieConfig, apply_adapters_, save_adapter
from liedeploy.core import conv_graph, conv_pack
from liedeploy.core.adapt import iter_adapters

pytestmark = pytest.mark.skipif(conv_pack.pack_status() != "ready" or conv_graph.fuse_status() != "ready",
                                reason=f"no fused graphs here: {conv_pack.pack_status()}, {conv_graph.fuse_status()}")

SHAPE = (1, 3, 12, 12)


def _bn(c, **kw):
    bn = nn.BatchNorm2d(c, **kw)
    with torch.no_grad():  # statistics far from the identity, so a norm left out or folded twice shows
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return bn


class _Net(nn.Module):
    """Every pattern: conv-bn-relu, conv(+bias)-bn(no affine)-add-relu, conv-bn-add_ (in place, no
    ReLU), a conv whose output is read twice (nothing fused after it), and a dense tail."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 32, 3, padding=1, bias=False), _bn(32)
        self.c1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), _bn(32)
        self.c2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), _bn(32, affine=False)
        self.down, self.bnd = nn.Conv2d(32, 48, 1, stride=2), _bn(48)
        self.c3, self.bn3 = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), _bn(48)
        self.tap = nn.Conv2d(48, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = h
        h = F.relu(self.bn1(self.c1(h)))
        h = F.relu(self.bn2(self.c2(h)) + r)
        d = self.bnd(self.down(h))
        h = self.bn3(self.c3(h))
        h += d
        t = self.tap(h)
        return self.fc((t + t.relu()).mean((2, 3)))


def _run(m):
    return m(torch.zeros(SHAPE))


def _capture(m):
    plans = conv_pack.plan_convs(m, _run, (1, 8))
    tensors = dict(m.state_dict(keep_vars=True))
    graph, why = conv_graph.capture(m, _run, plans, tensors, lambda n, d: plans[n].pack(d))
    return graph, why, plans, tensors


def _base_replica(graph, plans, tensors):
    return graph.replica(graph.lookup(graph.base, tensors))  # the base's packed, scaled weights from capture


def _close(got, ref):
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_every_pattern_is_fused_and_matches_float64():
    torch.manual_seed(0)
    m = _Net().eval()
    graph, why, plans, tensors = _capture(m)
    assert why == "ready" and set(graph.fused) == {f"{n}.weight" for n in ("stem", "c1", "c2", "down", "c3", "tap")}
    f = graph.fused
    assert [f[f"{n}.weight"].norm is not None for n in ("stem", "c1", "c2", "down", "c3", "tap")] == [True] * 5 + [False]
    assert (f["stem.weight"].relu, f["stem.weight"].add) == (True, False)
    assert (f["c2.weight"].relu, f["c2.weight"].add) == (True, True)  # bias, non-affine norm, + r, ReLU
    assert (f["c3.weight"].relu, f["c3.weight"].add) == (False, True)  # h += d: in place, no ReLU after
    assert (f["tap.weight"].relu, f["tap.weight"].add) == (False, False)  # read twice: nothing fused after it
    assert f["c2.weight"].bias == "c2.bias" and f["c2.weight"].norm[0] is None
    left = {n.target for n in graph.module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.batch_norm.default not in left and torch.ops.aten.conv2d.default not in left
    rep = _base_replica(graph, plans, tensors)
    ref_model = copy.deepcopy(m).double()
    with torch.inference_mode():
        for batch in (1, 3, 8):  # the batch dimension stays dynamic
            x = torch.randn(batch, *SHAPE[1:])
            _close(rep(x), ref_model(x.double()))
            _close(rep(x.contiguous(memory_format=torch.channels_last)), ref_model(x.double()))


def test_the_fused_bias_and_scale_match_float64():
    torch.manual_seed(1)
    m = _Net().eval()
    graph, _, _, tensors = _capture(m)
    get = tensors.__getitem__
    fc = graph.fused["c2.weight"]  # conv bias, norm without affine parameters
    s = 1 / torch.sqrt(m.bn2.running_var.double() + m.bn2.eps)
    torch.testing.assert_close(fc.scale(get).double().flatten(), s, rtol=2 ** -23, atol=0)
    torch.testing.assert_close(fc.fused_bias(get).double(), (m.c2.bias.double() - m.bn2.running_mean.double()) * s,
                               rtol=2 ** -23, atol=1e-7)
    fc = graph.fused["stem.weight"]
    s = m.bn0.weight.double() / torch.sqrt(m.bn0.running_var.double() + m.bn0.eps)
    torch.testing.assert_close(fc.fused_bias(get).double(), m.bn0.bias.double() - m.bn0.running_mean.double() * s,
                               rtol=2 ** -23, atol=1e-7)
    assert graph.fused["tap.weight"].scale(get) is None
    torch.testing.assert_close(graph.fused["tap.weight"].fused_bias(get), m.tap.bias.detach())


def _task(base, path, seed, **cfg):
    cfg.setdefault("targets", ["stem", "c1", "c2", "down", "c3", "tap", "fc"])
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=3, alpha=6, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.3)
    return m


def test_a_bank_serves_tasks_on_the_fused_graph_like_dense_ones(tmp_path):
    torch.manual_seed(2)
    base = _Net().eval()
    paths = {}
    m = _task(base, None, seed=10)
    save_adapter(m, str(tmp_path / "plain.safetensors"), name="plain")
    paths["plain"] = str(tmp_path / "plain.safetensors")
    m = _task(base, None, seed=11, targets=["c1", "c3"], modules_to_save=["bn1", "bn3", "c2"])
    with torch.no_grad():  # the task's own norms and its own whole c2 (conv bias included)
        m.bn1.running_mean.add_(0.2)
        m.bn1.weight.mul_(1.3)
        m.bn3.running_var.mul_(0.7)
        m.c2.weight.mul_(1.2)
        m.c2.bias.add_(0.1)
    save_adapter(m, str(tmp_path / "own.safetensors"), name="own")
    paths["own"] = str(tmp_path / "own.safetensors")
    dense = AdapterBank(copy.deepcopy(base), adapters=paths)
    packed = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=0)  # every call folds again
    assert packed.pack_convs(_run, batches=(1, 8))
    assert packed.fusion.startswith("fused graph: 6 packed convolutions, 5 with their batch norm folded in")
    x = torch.randn(4, *SHAPE[1:])
    with torch.inference_mode():
        refs = {t: dense(x, task=t) for t in paths}
        for _ in range(2):  # recycled replicas and storage
            for t in ("plain", "own", "plain", "own"):
                got = packed(x, task=t)
                torch.testing.assert_close(got, refs[t], rtol=1e-5, atol=1e-5 * float(refs[t].abs().max()))
        torch.testing.assert_close(packed(x), dense(x), rtol=0, atol=0)  # the base keeps its modules
        tasks = ["own", "plain", None, "own"]  # one task per sample
        ref = dense.forward_mixed(x, tasks=tasks)
        torch.testing.assert_close(packed.forward_mixed(x, tasks=tasks), ref, rtol=1e-5,
                                   atol=1e-5 * float(ref.abs().max()))
    rep = packed.model_for("own")
    assert isinstance(rep, conv_graph.GraphReplica)
    value = dict(zip(rep.graph.keys, rep.tensors))
    assert value["c2.weight"].layout == torch._mkldnn  # the task's whole c2, scaled and packed for the graph
    assert value["stem.weight"] is packed._packed.base["stem.weight"]  # not adapted: the shared base


def test_a_folded_weight_is_the_scaled_base_times_exp(tmp_path):
    torch.manual_seed(3)
    base = _Net().eval()
    m = _task(base, None, seed=12)
    save_adapter(m, str(tmp_path / "t.safetensors"), name="t")
    bank = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    assert bank.pack_convs(_run, batches=(1, 8))
    rep = bank.model_for("t")
    got = dict(zip(rep.graph.keys, rep.tensors))["c1.weight"].to_dense().double()
    lie = dict((n, l) for n, _, _, l in iter_adapters(m))
    (name,) = [n for n in lie if n.startswith("c1")]
    dW = (lie[name].lie_B.double() @ lie[name].lie_A.double()) * lie[name].scale
    s = base.bn1.weight.double() / torch.sqrt(base.bn1.running_var.double() + base.bn1.eps)
    ref = base.c1.weight.double() * s.view(-1, 1, 1, 1) * torch.exp(dW.view(base.c1.weight.shape))
    torch.testing.assert_close(got, ref, rtol=4 * 2 ** -24, atol=0)  # the scale's and the fold's roundings


class _Branchy(_Net):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent: torch.export cannot capture it
            x = x * 2
        return super().forward(x)


class _Reads(_Net):
    def forward(self, x):
        return super().forward(x) + self.c1.weight.sum()  # a packed weight read outside its convolution


def test_a_graph_is_refused_where_a_packed_weight_is_read_elsewhere(tmp_path):
    torch.manual_seed(7)
    base = _Reads().eval()
    graph, why, _, _ = _capture(base)
    assert graph is None and why == "c1.weight is packed but read by something other than its convolution"
    # nor can its modules run with packed weights (a packed tensor has no .sum()): the bank packs nothing
    m = _task(base, None, seed=14)
    save_adapter(m, str(tmp_path / "t.safetensors"), name="t")
    dense = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    bank = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    assert bank.pack_convs(_run, batches=(1, 8)) == [] and bank.packed == []
    assert bank.fusion.startswith("the model fails with its Conv2d weights packed (") and bank.fusion.endswith("none packed")
    x = torch.randn(2, *SHAPE[1:])
    with torch.inference_mode():
        torch.testing.assert_close(bank(x, task="t"), dense(x, task="t"), rtol=0, atol=0)


def test_a_model_torch_export_cannot_capture_runs_as_modules(tmp_path):
    torch.manual_seed(4)
    base = _Branchy().eval()
    graph, reason, _, _ = _capture(base)
    assert graph is None and reason.startswith("torch.export could not capture the forward")
    m = _task(base, None, seed=13)
    save_adapter(m, str(tmp_path / "t.safetensors"), name="t")
    dense = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    packed = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    assert packed.pack_convs(_run, batches=(1, 8))
    assert packed.fusion.startswith("modules (torch.export could not capture")
    x = torch.randn(2, *SHAPE[1:]).abs()
    with torch.inference_mode():
        ref = dense(x, task="t")
        torch.testing.assert_close(packed(x, task="t"), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert type(packed.model_for("t").c1) is conv_pack.PackedConv2d


def test_fusion_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LIEDEPLOY_FUSE", "off")
    graph, why, _, _ = _capture(_Net().eval())
    assert graph is None and why == "LIEDEPLOY_FUSE=off"


def test_the_graph_binds_keyword_calls_and_refuses_other_inputs():
    torch.manual_seed(5)
    m = _Net().eval()
    graph, _, plans, tensors = _capture(m)
    rep = _base_replica(graph, plans, tensors)
    x = torch.randn(2, *SHAPE[1:])
    with torch.inference_mode():
        torch.testing.assert_close(rep(x=x), rep(x), rtol=0, atol=0)
    from liedeploy import LieError

    with pytest.raises(LieError, match="fused graph cannot take these inputs"):
        rep(x, x)


def test_a_transformers_model_returning_a_model_output_runs_on_its_graph(tmp_path):
    pytest.importorskip("transformers")
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(6)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=5)
    base = ResNetForImageClassification(cfg).eval()
    with torch.no_grad():
        for mod in base.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, alpha=4, targets=["convolution"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.2)
    save_adapter(m, str(tmp_path / "t.safetensors"), name="t")
    dense = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    packed = AdapterBank(copy.deepcopy(base), adapters={"t": str(tmp_path / "t.safetensors")})
    assert packed.pack_convs(lambda mm: mm(torch.zeros(1, 3, 32, 32)), batches=(1, 8))
    assert packed.fusion.startswith("fused graph:") and "with their batch norm folded in" in packed.fusion
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref, got = dense(x, task="t"), packed(x, task="t")
    assert type(got) is type(ref)  # the model's own output class, rebuilt from the graph's outputs
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5 * float(ref.logits.abs().max()))


class _Counts(_Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # a buffer the forward mutates: a graph would have to hand it back
        return super().forward(x)


def test_a_buffer_the_forward_mutates_is_mutated_by_the_graph_too():
    torch.manual_seed(8)
    m = _Counts().eval()
    graph, why, plans, tensors = _capture(m)
    assert why == "ready"  # the in-place add stays in the graph, on the tensor it is given
    rep = _base_replica(graph, plans, tensors)
    before = float(m.calls)
    with torch.inference_mode():
        rep(torch.randn(2, *SHAPE[1:]))
        rep(torch.randn(1, *SHAPE[1:]))
    assert float(m.calls) == before + 2  # as the modules would: replicas share the base's buffers


class _Shared(nn.Module):
    """One conv used twice, each use followed by a norm of its own: its weight takes neither scale."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 32, 3, padding=1, bias=False), _bn(32)
        self.twice, self.bn1, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), _bn(32), _bn(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.twice(h)))
        h = F.relu(self.bn2(self.twice(h)))
        return self.fc(h.mean((2, 3)))


def test_a_conv_used_twice_keeps_its_norms_apart():
    torch.manual_seed(9)
    m = _Shared().eval()
    graph, why, plans, tensors = _capture(m)
    assert why == "ready" and graph.fused["twice.weight"].norm is None and graph.fused["stem.weight"].norm is not None
    rep = _base_replica(graph, plans, tensors)
    x = torch.randn(3, *SHAPE[1:])
    with torch.inference_mode():
        _close(rep(x), copy.deepcopy(m).double()(x.double()))
