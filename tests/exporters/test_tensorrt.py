"""The TensorRT path as far as it runs without TensorRT and CUDA: strongly typed graphs, manifests of
only the adapted weights, refit arrays, the slot LRU, the removed-API check and the refusals."""

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from liedeploy.exporters.tensorrt import (export_refit_onnx, export_tensorrt, refit_weights, refittable_targets,  # noqa: E402
                                strip_size_report)
from liedeploy.serving.backends.trt import SlotLRU  # noqa: E402
from liedeploy import LieConfig, LieError, apply_adapters_, load_adapter, merge_, save_adapter  # noqa: E402
from liedeploy.cli import main  # noqa: E402

from ..layer_cases import randomize_factors  # noqa: E402
from .arch import ARCHS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adapter(base, targets, path, seed=0):
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, targets=targets))
    randomize_factors(m, std=0.1, seed=seed)
    save_adapter(m, str(path))
    return str(path)


@pytest.mark.parametrize("name", ["resnet", "vit", "gpt2"])
def test_manifest_lists_exactly_the_adapted_weights(name, tmp_path):
    factory, targets, make_input = ARCHS[name]
    torch.manual_seed(0)
    model = factory().eval()
    a = _adapter(model, targets, tmp_path / "a.safetensors")
    path = str(tmp_path / "m.onnx")
    report = export_refit_onnx(model, make_input(), path, dynamic_batch=True, refit_adapters=[a])
    assert report["ok"] and not report["optimized"]
    manifest = json.load(open(path + ".refit.json"))
    from liedeploy import read_adapter

    assert set(manifest["weights"]) == set(read_adapter(a).targets)
    inits = {t.name: list(t.dims) for t in onnx.load(path, load_external_data=False).graph.initializer}
    params = dict(model.named_parameters())
    for p, w in manifest["weights"].items():
        assert inits[w["initializer"]] == list(params[p].shape)
    assert set(manifest["refittable"]) == {w["initializer"] for w in manifest["weights"].values()}
    others = [n for n, d in inits.items() if len(d) >= 2 and n not in manifest["refittable"]]
    assert name == "resnet" or others  # weights no adapter changes stay foldable (resnet's adapter takes them all)


def test_tied_weights_map_to_one_refit_name(tmp_path):
    factory, _, make_input = ARCHS["gpt2"]
    torch.manual_seed(0)
    model = factory().eval()
    path = str(tmp_path / "m.onnx")
    export_refit_onnx(model, make_input(), path)  # no adapters: every weight of rank >= 2
    w = json.load(open(path + ".refit.json"))["weights"]
    assert w["inner.transformer.wte.weight"]["initializer"] == w["inner.lm_head.weight"]["initializer"]


def test_refit_arrays_are_the_merges_bit_for_bit_and_never_blend(tmp_path):
    factory, targets, make_input = ARCHS["resnet"]
    torch.manual_seed(0)
    base = factory().eval()
    base_file = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)
    a0 = _adapter(base, targets, tmp_path / "a0.safetensors", 0)
    a1 = _adapter(base, r".*classifier\.1\.weight", tmp_path / "a1.safetensors", 1)
    path = str(tmp_path / "m.onnx")
    export_refit_onnx(base, make_input(), path, refit_adapters=[a0, a1])
    manifest = json.load(open(path + ".refit.json"))
    merged = [merge_(load_adapter(copy.deepcopy(base), p)).state_dict() for p in (a0, a1)]
    w0 = refit_weights(base_file, a0, manifest)
    for name, arr in w0.items():
        np.testing.assert_array_equal(arr, merged[0][name].numpy())
    w1 = refit_weights(base_file, a1, manifest, previous=set(w0))  # A -> B: A's targets go back to the base
    for name, arr in w1.items():
        np.testing.assert_array_equal(arr, merged[1][name].numpy())
    again = refit_weights(base_file, a0, manifest, previous=set(w1))  # B -> A equals A exactly
    for name in w0:
        np.testing.assert_array_equal(again[name], w0[name])
    # each array is cast to the dtype the engine's prototype asks for (an fp16 engine)
    half = refit_weights(base_file, a0, manifest, prototypes={n: np.float16 for n in manifest["refittable"]})
    for name, arr in half.items():
        assert arr.dtype == np.float16
        np.testing.assert_array_equal(arr, merged[0][name].numpy().astype(np.float16))


def test_a_head_of_another_shape_cannot_be_refitted(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    m = copy.deepcopy(base)
    m[2] = nn.Linear(8, 3)
    apply_adapters_(m, LieConfig(r=2, targets=["0"], modules_to_save=["2"]))
    p = str(tmp_path / "head.safetensors")
    save_adapter(m, p)
    with pytest.raises(LieError, match=r"a task whose head changes a shape cannot be refitted into this engine: build an engine for that head"):
        refittable_targets(base, [p])
    same = copy.deepcopy(base)
    apply_adapters_(same, LieConfig(r=2, targets=["0"], modules_to_save=["2"]))
    p2 = str(tmp_path / "same.safetensors")
    save_adapter(same, p2)
    assert refittable_targets(base, [p2]) == ["0.weight", "2.bias", "2.weight"]


def test_slot_lru_refits_the_least_recently_used_idle_slot():
    lru = SlotLRU(2)
    assert lru.acquire("a") == (0, True)
    lru.release(0)
    assert lru.acquire("b") == (1, True)
    lru.release(1)
    assert lru.acquire("a") == (0, False)  # a hit: no refit
    lru.release(0)
    assert lru.acquire("c") == (1, True)  # b was least recently used
    assert lru.acquire("d") == (0, True)  # slot 1 is busy with c: the other one
    assert lru.acquire("e") is None  # both busy: wait
    lru.release(0)
    assert lru.acquire("c") == (1, False) and lru.refits == 4
    assert sorted(lru.resident()) == ["c", "d"]


# Names TensorRT 11 removed (NVIDIA, "Migrating from TensorRT 10.x to 11.x"): weak typing is gone,
# precision lives in the ONNX graph.
REMOVED_IN_TRT11 = ("BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
                    "BuilderFlag.FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
                    "int8_calibrator", "platform_has_fast_fp16", "platform_has_fast_int8", "device_memory_size")


def removed_api_uses(paths) -> list:
    """``[(file, name)]`` of TensorRT 11 removed names used in ``paths`` (this file's list excepted)."""
    hits = []
    for p in paths:
        if os.path.abspath(p) == os.path.abspath(__file__):
            continue
        text = open(p).read()
        hits += [(os.path.basename(p), name) for name in REMOVED_IN_TRT11 if name in text]
    return hits


def test_no_removed_tensorrt_11_api_is_used():
    files = glob.glob(os.path.join(ROOT, "exporters", "*.py")) + glob.glob(os.path.join(ROOT, "liedeploy", "**", "*.py"),
                                                                          recursive=True)
    files += glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "tests", "**", "*.py"),
                                                                            recursive=True)
    assert removed_api_uses(files) == []
    # the check itself finds a use
    bad = os.path.join(os.path.dirname(__file__), "_tmp_removed_api.py")
    try:
        open(bad, "w").write(f"config.set_flag(trt.{REMOVED_IN_TRT11[0]})\n")
        assert removed_api_uses([bad]) == [("_tmp_removed_api.py", REMOVED_IN_TRT11[0])]
    finally:
        os.unlink(bad)


@pytest.mark.parametrize("name,targets", [("resnet", r".*stages\.1.*convolution\.weight"),
                                          ("vit", r".*(query|value|q_proj|v_proj)\.weight")])
def test_strip_size_report(name, targets, tmp_path):
    factory, _, make_input = ARCHS[name]
    torch.manual_seed(0)
    model = factory().eval()
    a = _adapter(model, targets, tmp_path / "a.safetensors")
    path = str(tmp_path / "m.onnx")
    export_refit_onnx(model, make_input(), path, refit_adapters=[a])
    rep = strip_size_report(path, json.load(open(path + ".refit.json")))
    assert 0 < rep["stripped_bytes"] < rep["weights_bytes"]
    assert 0 < rep["kept_ratio"] < 1 and rep["all_refittable_kept_ratio"] < rep["kept_ratio"]


def test_trt_refuses_cleanly_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and CUDA are here")
    except ImportError:
        pass
    factory, _, make_input = ARCHS["conv1d"]
    with pytest.raises(LieError, match=r"TensorRT"):
        export_tensorrt(factory(), make_input(), str(tmp_path / "m.engine"))
    assert os.listdir(tmp_path) == []  # refused before writing anything
    w = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in factory().state_dict().items()}, w)
    assert main(["export", "--trt", "--model", "tests.exporters.arch:conv1d", "--weights", w, "--input-shape", "2,3,20",
                 "-o", str(tmp_path / "m.engine")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT" in err
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_cli_for_trt(tmp_path, capsys):
    factory, _, _ = ARCHS["conv3d"]
    torch.manual_seed(0)
    base = factory()
    w = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, w)
    a = _adapter(base, ["0"], tmp_path / "a.safetensors")
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--onnx", "--for-trt", "--model", "tests.exporters.arch:conv3d", "--weights", w,
                 "--input-shape", "1,2,4,8,8", "-o", out, "--refit-targets", a]) == 0
    assert "refit manifest in" in capsys.readouterr().out
    manifest = json.load(open(out + ".refit.json"))
    assert manifest["weights"]["0.weight"]["initializer"] == "0.weight" and set(manifest["weights"]) == {"0.weight"}
