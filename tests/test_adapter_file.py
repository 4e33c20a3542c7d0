import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from liedeploy import AdapterFileError, LieConfig, apply_adapters_, load_adapter, read_adapter, save_adapter
from liedeploy.core.adapt import iter_adapters
from liedeploy.io.safetensors_io import tensor_sha256
from tests.models import ConvHead


def _trained(seed=0, expmap="exact"):
    torch.manual_seed(seed)
    model = ConvHead()
    apply_adapters_(model, LieConfig(r=2, alpha=3, expmap=expmap, targets=["conv", "fc"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.normal_(0, 0.1)
    return model


@pytest.fixture
def adapter(tmp_path):
    model = _trained()
    path = str(tmp_path / "task.safetensors")
    save_adapter(model, path, name="task-a")
    return model, path


def test_format_v1_exactly(adapter):
    model, path = adapter
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == {"conv.weight.lie_A", "conv.weight.lie_B", "fc.weight.lie_A", "fc.weight.lie_B"}
    assert meta["format"] == "liedeploy.adapter" and meta["format_version"] == "1"
    assert meta["expmap"] == "exact" and meta["name"] == "task-a"
    assert meta["created_by"].startswith("liedeploy ")
    targets = json.loads(meta["targets"])
    assert targets == {"conv.weight": {"shape": [6, 1, 3, 3], "scale": 1.5}, "fc.weight": {"shape": [4, 6], "scale": 1.5}}
    hashes = json.loads(meta["base_sha256"])
    base = ConvHead()
    torch.manual_seed(0)
    base = ConvHead()
    assert hashes["fc.weight"] == tensor_sha256(base.fc.weight)
    import hashlib

    assert hashes["conv.weight"] == hashlib.sha256(base.conv.weight.detach().numpy().tobytes()).hexdigest()
    cfg = json.loads(meta["config"])
    assert cfg["r"] == 2 and cfg["alpha"] == 3.0 and cfg["targets"] == ["conv", "fc"]
    t = load_file(path)
    assert t["conv.weight.lie_B"].shape == (6, 2) and t["conv.weight.lie_A"].shape == (2, 9)


def test_round_trip_bit_exact(adapter):
    model, path = adapter
    x = torch.randn(2, 3, 5, 5)
    torch.manual_seed(0)
    fresh = ConvHead()
    load_adapter(fresh, path)
    a = {n: (l.lie_B, l.lie_A, l.scale, l.expmap) for n, _, _, l in iter_adapters(model)}
    b = {n: (l.lie_B, l.lie_A, l.scale, l.expmap) for n, _, _, l in iter_adapters(fresh)}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2:] == b[k][2:]
    assert torch.equal(model(x), fresh(x))
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lie_" not in n)
    # loading a second adapter into live adapters of the same layout copies in place
    other = _trained(seed=0)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(other):
            lie.lie_B.normal_(0, 0.1)
    p2 = path.replace("task", "task2")
    save_adapter(other, p2)
    storage = fresh.fc.parametrizations.weight[0].lie_B.data_ptr()
    load_adapter(fresh, p2)
    assert fresh.fc.parametrizations.weight[0].lie_B.data_ptr() == storage
    assert torch.equal(fresh(x), other(x))


def _rewrite(path, out, tensors=None, meta_update=None, drop=()):
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    t.update(tensors or {})
    meta.update(meta_update or {})
    for k in drop:
        meta.pop(k, None)
    save_file(t, out, metadata=meta)
    return out


def _refused(path, match):
    with pytest.raises(AdapterFileError) as err:
        torch.manual_seed(0)
        load_adapter(ConvHead(), path)
    msg = str(err.value)
    assert msg.startswith(str(path) + ": ") and "\n" not in msg
    assert match in msg, msg


def test_refuses_pickles_and_non_safetensors(tmp_path, adapter):
    _, path = adapter
    p = tmp_path / "a.pt"
    torch.save(load_file(path), p)
    _refused(p, "not a safetensors file (it is a zip archive such as a torch.save checkpoint; liedeploy never unpickles")
    p = tmp_path / "a.pkl"
    p.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    _refused(p, "not a safetensors file (it is a pickle file; liedeploy never unpickles")
    p = tmp_path / "a.txt"
    p.write_text("hello world, not tensors")
    _refused(p, "not a safetensors file")
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _refused(p, "not a safetensors file (it is empty)")
    _refused(tmp_path / "missing.safetensors", "no such file")
    p = tmp_path / "badjson.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    _refused(p, "not a safetensors file (its header is not valid JSON)")


def test_refuses_truncated(tmp_path, adapter):
    _, path = adapter
    data = open(path, "rb").read()
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(data[:-10])
    _refused(p, "truncated: tensor")


def test_refuses_format_and_version(tmp_path, adapter):
    _, path = adapter
    _refused(_rewrite(path, tmp_path / "a.safetensors", drop=["format"]), "not a liedeploy adapter (metadata 'format' is missing)")
    _refused(
        _rewrite(path, tmp_path / "b.safetensors", meta_update={"format": "peft.lora"}),
        "not a liedeploy adapter (format is 'peft.lora', expected 'liedeploy.adapter')",
    )
    _refused(
        _rewrite(path, tmp_path / "c.safetensors", meta_update={"format_version": "3"}),
        "unsupported adapter format_version '3' (this liedeploy reads '1' and '2')",
    )
    _refused(_rewrite(path, tmp_path / "d.safetensors", drop=["format_version"]), "unsupported adapter format_version None")
    _refused(
        _rewrite(path, tmp_path / "e.safetensors", meta_update={"expmap": "cayley"}),
        "unknown expmap 'cayley' (expected 'exact' or 'first_order')",
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite(tmp_path, adapter, bad):
    _, path = adapter
    B = load_file(path)["fc.weight.lie_B"].clone()
    B[1, 0] = bad
    _refused(
        _rewrite(path, tmp_path / "nf.safetensors", tensors={"fc.weight.lie_B": B}),
        "factor fc.weight.lie_B holds non-finite values (NaN or inf)",
    )


def test_refuses_shapes_that_disagree_with_targets(tmp_path, adapter):
    _, path = adapter
    _refused(
        _rewrite(path, tmp_path / "s.safetensors", tensors={"fc.weight.lie_A": torch.zeros(2, 7)}),
        "factors of fc.weight have shapes B [4, 2] and A [2, 7], which disagree with its target shape [4, 6]",
    )
    t = json.loads(read_adapter(path).metadata["targets"])
    t["fc.weight"]["shape"] = [4, 3, 2]  # same numel, other shape than the model's
    _refused(
        _rewrite(path, tmp_path / "s2.safetensors", meta_update={"targets": json.dumps(t)}),
        "target fc.weight has shape [4, 3, 2] but the base tensor has shape [4, 6]",
    )
    _refused(
        _rewrite(path, tmp_path / "s3.safetensors", tensors={"extra.weight.lie_A": torch.zeros(1, 1)}),
        "tensor extra.weight.lie_A does not belong to any target listed in 'targets'",
    )


def test_refuses_target_absent_and_wrong_base(tmp_path, adapter):
    _, path = adapter
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        t = {k.replace("fc.", "head."): f.get_tensor(k) for k in f.keys()}
    meta["targets"] = meta["targets"].replace('"fc.', '"head.')
    meta["base_sha256"] = meta["base_sha256"].replace('"fc.', '"head.')
    p = str(tmp_path / "absent.safetensors")
    save_file(t, p, metadata=meta)
    _refused(p, "target head.weight is absent from the base")
    # a base with other weights: same architecture, another seed
    with pytest.raises(AdapterFileError, match=r"base tensor conv\.weight differs from the one this adapter was trained on"):
        torch.manual_seed(123)
        load_adapter(ConvHead(), path)
    torch.manual_seed(123)
    other = ConvHead()
    torch.manual_seed(123)
    fresh = ConvHead()
    loaded = load_adapter(other, path, verify_base=False)  # the escape hatch: the adapter on this other base
    af = read_adapter(path)
    for P, (B, A) in af.factors.items():
        mod, _, attr = P.rpartition(".")
        W = getattr(fresh.get_submodule(mod), attr).detach().double()
        want = W * torch.exp((B.double() @ A.double()).reshape(W.shape) * af.targets[P]["scale"])
        got = getattr(loaded.get_submodule(mod), attr).detach().double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_never_unpickles(tmp_path, monkeypatch, adapter):
    _, path = adapter

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    torch.manual_seed(0)
    load_adapter(ConvHead(), path)
    p = tmp_path / "x.pt"
    p.write_bytes(b"\x80\x04" + b"\x00" * 64)
    _refused(p, "it is a pickle file")


def test_save_is_atomic(tmp_path, monkeypatch, adapter):
    model, path = adapter
    before = open(path, "rb").read()
    import liedeploy.io.adapter_format as af

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(af, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["task.safetensors"]  # no temp file left


def test_saved_file_gets_usual_permissions(tmp_path):
    model = _trained()
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "perm.safetensors")
        save_adapter(model, path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_base_hash_is_recomputed_after_in_place_change(adapter, monkeypatch):
    _, path = adapter
    import liedeploy.core.adapter_file as af_mod

    calls = []
    real = af_mod.tensor_sha256
    monkeypatch.setattr(af_mod, "tensor_sha256", lambda t: calls.append(1) or real(t))
    torch.manual_seed(0)
    model = ConvHead()
    load_adapter(model, path)  # attaching the parametrization bumps the base tensors' version once
    load_adapter(model, path)
    n = len(calls)
    load_adapter(model, path)  # the same untouched base: no rehash
    assert len(calls) == n
    with torch.no_grad():
        model.fc.parametrizations.weight.original.add_(1.0)  # the base changed in place
    with pytest.raises(AdapterFileError, match="base tensor fc.weight differs"):
        load_adapter(model, path)


def test_file_hash_is_the_files_sha256_unless_skipped(adapter):
    import hashlib

    _, path = adapter
    with open(path, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    assert read_adapter(path).file_sha256 == want
    skipped = read_adapter(path, file_hash=False)
    assert skipped.file_sha256 == "" and skipped.factors.keys() == read_adapter(path).factors.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_in_any_factor_is_named_whatever_the_dtype(tmp_path, adapter, dtype, bad):
    # the values are scanned one run of same-dtype tensors at a time: the culprit is still named
    _, path = adapter
    t = {k: v.to(dtype) for k, v in load_file(path).items()}
    for key in sorted(t):
        bent = dict(t)
        bent[key] = t[key].clone()
        bent[key].view(-1)[-1] = bad
        _refused(_rewrite(path, tmp_path / f"nf-{key}.safetensors", tensors=bent),
                 f"factor {key} holds non-finite values (NaN or inf)")


def _raw_safetensors(out, tensors: dict, metadata: dict, pad: int) -> str:
    """A safetensors file written by hand, with ``pad`` extra spaces in its header: the tensors'
    bytes then start at an offset that need not suit their dtype (the format allows it)."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    text = json.dumps(header).encode() + b" " * pad
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return str(out)


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_reads_tensors_at_any_byte_offset_and_still_refuses_non_finite_ones(tmp_path, adapter, pad):
    _, path = adapter
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["conv.weight.lie_A"] = t["conv.weight.lie_A"].half()  # a 2-byte tensor between 4-byte ones
    af = read_adapter(_raw_safetensors(tmp_path / f"p{pad}.safetensors", t, meta, pad))
    for name, (B, A) in af.factors.items():
        assert torch.equal(B, t[f"{name}.lie_B"]) and torch.equal(A, t[f"{name}.lie_A"])
    t["fc.weight.lie_A"] = t["fc.weight.lie_A"].clone()
    t["fc.weight.lie_A"][0, 0] = float("nan")
    _refused(_raw_safetensors(tmp_path / f"q{pad}.safetensors", t, meta, pad),
             "factor fc.weight.lie_A holds non-finite values (NaN or inf)")
