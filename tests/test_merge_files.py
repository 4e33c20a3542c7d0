import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from liedeploy import read_adapter
from liedeploy import AdapterFileError, LieConfig, LieError, apply_adapters_, merge_, merge_files, save_adapter
from liedeploy.core.adapt import iter_adapters
from liedeploy.cli import main
from tests.models import MixedLayers
from tests.conftest import save_state_dict


def _base(tmp_path, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = MixedLayers().to(dtype)
    path = str(tmp_path / f"base-{str(dtype)[6:]}.safetensors")
    save_state_dict(model, path, metadata={"source": "test"})
    return model, path


def _adapter(model, path, seed, expmap="exact", targets=("emb", "conv", "fc"), r=3, std=0.15):
    m = apply_adapters_(__import__("copy").deepcopy(model), LieConfig(r=r, alpha=2 * r, expmap=expmap, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * std)
            lie.lie_A.copy_(torch.randn(lie.lie_A.shape, generator=g) * std)
    save_adapter(m, path)
    return m


def _ref(base_sd, adapters_and_scales):
    """float64 reference written here: W * exp(sum s_i dW_i) or W * (1 + sum s_i dW_i)."""
    from liedeploy import read_adapter

    out = {}
    for k, W in base_sd.items():
        d = None
        expmap = None
        for path, s in adapters_and_scales:
            a = read_adapter(path)
            if k in a.factors:
                B, A = a.factors[k]
                dk = (B.double() @ A.double()).reshape(W.shape) * a.targets[k]["scale"] * s
                d = dk if d is None else d + dk
                expmap = a.expmap
        if d is None:
            out[k] = None
        else:
            out[k] = W.double() * (torch.exp(d) if expmap == "exact" else 1 + d)
    return out


def test_fp32_merge_matches_float64_and_live_merge(tmp_path):
    model, base = _base(tmp_path)
    live = _adapter(model, str(tmp_path / "a.safetensors"), 1)
    out = str(tmp_path / "m.safetensors")
    summary = merge_files(base, [str(tmp_path / "a.safetensors")], out)
    assert summary["tensors_merged"] == 3 and summary["tensors"] == len(model.state_dict())
    got = load_file(out)
    ref = _ref(model.state_dict(), [(str(tmp_path / "a.safetensors"), 1.0)])
    for k, v in got.items():
        if ref[k] is None:
            assert torch.equal(v, model.state_dict()[k])  # untouched: byte copy
        else:
            rel = ((v.double() - ref[k]).abs() / ref[k].abs().clamp_min(1e-30)).max().item()
            assert rel <= 1e-6, (k, rel)
    merge_(live)
    for k, v in live.state_dict().items():
        assert torch.equal(got[k], v), k  # file merge == in-memory merge, bit for bit
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["source"] == "test"
    mf = json.loads(meta["liedeploy.merged_from"])
    assert mf[0]["name"] == "a" and mf[0]["scale"] == 1.0 and len(mf[0]["sha256"]) == 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_merge_is_rounded_once(tmp_path, dtype):
    model, base = _base(tmp_path, dtype)
    # a bigger tensor so that 0.1% is meaningful
    _adapter(model, str(tmp_path / "a.safetensors"), 2)
    out = str(tmp_path / "m.safetensors")
    merge_files(base, [str(tmp_path / "a.safetensors")], out)
    got = load_file(out)
    ref = _ref(model.state_dict(), [(str(tmp_path / "a.safetensors"), 1.0)])
    total = off = 0
    for k, r in ref.items():
        if r is None:
            continue
        want = r.to(dtype)  # float64 result rounded to the base dtype
        v = got[k]
        assert v.dtype == dtype
        diff = (v.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert diff.max() <= 1, k  # at most one ulp
        off += int((diff == 1).sum())
        total += v.numel()
    assert off <= 0.001 * total, f"{off} of {total} elements off by one ulp"


def test_composition_scales_and_negative_scale_removes_a_task(tmp_path):
    model, base = _base(tmp_path)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _adapter(model, a, 1)
    _adapter(model, b, 2, targets=("fc",))
    out = str(tmp_path / "ab.safetensors")
    merge_files(base, [a, b], out, scales=[0.5, -1.25])
    got = load_file(out)
    ref = _ref(model.state_dict(), [(a, 0.5), (b, -1.25)])
    for k, r in ref.items():
        if r is not None:
            assert ((got[k].double() - r).abs() / r.abs().clamp_min(1e-30)).max() <= 1e-6, k
    # adding a task and removing it again gives the base back (exact group inverse)
    out2 = str(tmp_path / "aa.safetensors")
    merge_files(base, [a, a], out2, scales=[1.0, -1.0])
    for k, v in load_file(out2).items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-6, atol=0)


def test_first_order_composes_additively_and_mixing_is_refused(tmp_path):
    model, base = _base(tmp_path)
    a, b = str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")
    _adapter(model, a, 1, expmap="first_order")
    _adapter(model, b, 2, expmap="first_order")
    out = str(tmp_path / "fo.safetensors")
    merge_files(base, [a, b], out)
    ref = _ref(model.state_dict(), [(a, 1.0), (b, 1.0)])
    got = load_file(out)
    for k, r in ref.items():
        if r is not None:
            torch.testing.assert_close(got[k].double(), r, rtol=1e-6, atol=1e-7)
    e = str(tmp_path / "e.safetensors")
    _adapter(model, e, 3)
    with pytest.raises(LieError, match="uses the exact map and .* the first_order map; they do not compose exactly"):
        merge_files(base, [e, a], str(tmp_path / "mixed.safetensors"))
    assert not os.path.exists(tmp_path / "mixed.safetensors")
    merge_files(base, [e, a], str(tmp_path / "mixed.safetensors"), allow_mixed_maps=True)
    got = load_file(str(tmp_path / "mixed.safetensors"))
    ex, fo = read_adapter(e), read_adapter(a)
    for k, W in model.state_dict().items():  # W * exp(dW_exact) * (1 + dW_first_order), float64 here
        if k not in ex.factors:
            assert torch.equal(got[k], W)
            continue
        d = {}
        for af in (ex, fo):
            B, A = af.factors[k]
            d[af.expmap] = (B.double() @ A.double()).reshape(W.shape) * af.targets[k]["scale"]
        want = W.double() * torch.exp(d["exact"]) * (1 + d["first_order"])
        torch.testing.assert_close(got[k].double(), want, rtol=2e-6, atol=1e-7)


def test_dtype_conversion(tmp_path):
    model, base = _base(tmp_path)
    a = str(tmp_path / "a.safetensors")
    _adapter(model, a, 1)
    out = str(tmp_path / "bf.safetensors")
    merge_files(base, [a], out, dtype="bf16")
    got = load_file(out)
    ref = _ref(model.state_dict(), [(a, 1.0)])
    assert got["fc.weight"].dtype == torch.bfloat16 and got["norm.num_batches_tracked"].dtype == torch.int64
    assert got["norm.running_var"].dtype == torch.bfloat16
    diff = (got["fc.weight"].view(torch.int16).int() - ref["fc.weight"].to(torch.bfloat16).view(torch.int16).int()).abs()
    assert diff.max() <= 1


def test_sharded_in_sharded_out(tmp_path):
    model, _ = _base(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for fname, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(shard_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    index = str(shard_dir / "model.safetensors.index.json")
    json.dump({"metadata": {"total_size": 1}, "weight_map": weight_map}, open(index, "w"))
    a = str(tmp_path / "a.safetensors")
    live = _adapter(model, a, 1)
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / "model.safetensors.index.json")
    summary = merge_files(index, [a], out)
    assert summary["tensors_merged"] == 3
    assert sorted(os.listdir(tmp_path / "out")) == sorted(list(parts) + ["model.safetensors.index.json"])
    new_index = json.load(open(out))
    assert new_index["weight_map"] == weight_map and "liedeploy.merged_from" in new_index["metadata"]
    merge_(live)
    for fname in parts:
        for k, v in load_file(str(tmp_path / "out" / fname)).items():
            assert torch.equal(v, live.state_dict()[k])
    with pytest.raises(LieError, match="is sharded: OUT must be a \\*.safetensors.index.json path"):
        merge_files(index, [a], str(tmp_path / "x.safetensors"))


def test_refusals_leave_nothing_and_never_touch_the_base(tmp_path):
    model, base = _base(tmp_path)
    before = open(base, "rb").read()
    a = str(tmp_path / "a.safetensors")
    _adapter(model, a, 1)
    torch.manual_seed(9)
    other = MixedLayers()
    b = str(tmp_path / "b.safetensors")
    _adapter(other, b, 1)  # trained on another base
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(AdapterFileError, match=r"base tensor (conv|emb|fc)\.weight differs from the one this adapter was trained on"):
        merge_files(base, [b], out)
    assert not os.path.exists(out)
    merge_files(base, [b], out, verify_base=False)  # the escape hatch: folded into the base given
    got, ref = load_file(out), _ref(model.state_dict(), [(b, 1.0)])
    for k, r in ref.items():
        if r is not None:
            torch.testing.assert_close(got[k].double(), r, rtol=1e-6, atol=1e-7)
    os.unlink(out)
    with pytest.raises(LieError, match="is the input .*; write the output elsewhere"):
        merge_files(base, [a], base)
    with pytest.raises(LieError, match="got 2 scales for 1 adapters"):
        merge_files(base, [a], out, scales=[1, 2])
    # overflow names the tensor and its largest |dW|
    big = str(tmp_path / "big.safetensors")
    _adapter(model, big, 1, std=20.0)
    with pytest.raises(LieError, match=r"merging (emb|conv|fc)\.weight overflows .*the largest \|dW\| is "):
        merge_files(base, [big], out)
    assert not os.path.exists(out)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temp files left
    assert open(base, "rb").read() == before


def test_cli_merge_exit_codes_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIEDEPLOY_DEBUG", raising=False)
    model, base = _base(tmp_path)
    a = str(tmp_path / "a.safetensors")
    _adapter(model, a, 1)
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", base, a, "-o", out, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tensors_merged"] == 3 and s["bytes_written"] == os.path.getsize(out) and 0 < s["seconds"] < 60
    bad = tmp_path / "bad.pt"
    torch.save({}, bad)
    assert main(["merge", base, str(bad), "-o", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a safetensors file" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["merge", base, a])  # no -o
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["merge", base, a, "-o", out, "--dtype", "fp8"])
    assert e.value.code == 2


@pytest.mark.parametrize("step", ["tensor:1", "tensor:2", "publish:1", "committed"])
def test_sigkill_at_each_step_leaves_old_or_new_and_a_rerun_cleans(tmp_path, step):
    """A merge killed with SIGKILL (deterministically, at a test hook) leaves OUT whole: old or new."""
    model, base = _base(tmp_path)
    a = str(tmp_path / "a.safetensors")
    _adapter(model, a, 1)
    out = str(tmp_path / "out.safetensors")
    save_file({"old": torch.ones(3)}, out)  # a previous output at OUT
    old = open(out, "rb").read()
    env = dict(os.environ, LIEDEPLOY_TEST_KILL_AT=step)
    code = f"import liedeploy; liedeploy.merge_files({base!r}, [{a!r}], {out!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    now = open(out, "rb").read()
    if step == "committed":
        assert now != old and "fc.weight" in load_file(out)
    else:
        assert now == old
    merge_files(base, [a], out)  # the rerun cleans what the killed run left
    assert sorted(os.listdir(tmp_path)) == sorted(["a.safetensors", "base-float32.safetensors", "out.safetensors"])
