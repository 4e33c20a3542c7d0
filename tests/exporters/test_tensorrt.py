"""The TensorRT path as far as it runs without TensorRT and CUDA: strongly typed graphs, manifests of
only the adapted weights, refit arrays, the slot LRU, the removed-API check and the refusals."""

import ast
import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
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
from tests.conftest import _write_adapter, save_state_dict

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
    save_state_dict(base, base_file)
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


# Names TensorRT 11 removed. Sources: NVIDIA, "Migrating from TensorRT 10.x to 11.x" (weak typing
# removed: precision lives in the ONNX graph) and the TensorRT 11.1 release notes' list of removed
# Python APIs (IBuilderConfig quantization/calibration/algorithm selection, ICudaEngine device-memory
# and weight-streaming queries, ILayer precision setters, Builder platform queries, EXPLICIT_BATCH).
# Qualified names must be reached through their enum (``BuilderFlag.FP16``); members are flagged
# wherever they are read, set or fetched with getattr/setattr/hasattr.
REMOVED_QUALIFIED = {
    "BuilderFlag": {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"},
    "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH"},
}
REMOVED_MEMBERS = {
    "int8_calibrator", "set_quantization_flag", "clear_quantization_flag", "get_quantization_flag",
    "quantization_flags", "set_calibration_profile", "get_calibration_profile", "algorithm_selector",
    "platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32",
    "device_memory_size", "get_device_memory_size_for_profile", "create_execution_context_without_device_memory",
    "weight_streaming_budget", "minimum_weight_streaming_budget",
    "set_output_type", "reset_output_type", "output_type_is_set", "reset_precision", "precision_is_set",
}
REMOVED_STORES = {"precision"}  # ILayer.precision = ... (reading a .precision elsewhere is not TensorRT's)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def removed_api_uses(paths) -> list:
    """``[(file, name)]`` of names TensorRT 11 removed, found in the syntax tree of ``paths``
    (attribute reads and writes, and ``getattr``/``setattr``/``hasattr`` with a literal name)."""
    hits = []
    for p in paths:
        if os.path.abspath(p) == os.path.abspath(__file__):
            continue
        tree = ast.parse(open(p).read())
        for node in ast.walk(tree):
            owner, name, store = None, None, False
            if isinstance(node, ast.Attribute):
                owner, name, store = _dotted(node.value), node.attr, isinstance(node.ctx, ast.Store)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                owner, name, store = _dotted(node.args[0]), node.args[1].value, node.func.id == "setattr"
            if name is None:
                continue
            last = owner.rsplit(".", 1)[-1] if owner else ""
            if name in REMOVED_MEMBERS or (store and name in REMOVED_STORES) or name in REMOVED_QUALIFIED.get(last, ()):
                hits.append((os.path.basename(p), f"{last}.{name}" if last in REMOVED_QUALIFIED else name))
    return hits


def test_no_removed_tensorrt_11_api_is_used():
    files = glob.glob(os.path.join(ROOT, "exporters", "*.py")) + glob.glob(os.path.join(ROOT, "liedeploy", "**", "*.py"),
                                                                          recursive=True)
    files += glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "tests", "**", "*.py"),
                                                                            recursive=True)
    assert removed_api_uses(files) == []


@pytest.mark.parametrize("code, found", [
    ("config.set_flag(trt.BuilderFlag.FP16)\n", "BuilderFlag.FP16"),
    ("f = getattr(trt.BuilderFlag, 'INT8')\n", "BuilderFlag.INT8"),
    ("n = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)\n", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
    ("ok = builder.platform_has_tf32\n", "platform_has_tf32"),
    ("ctx = engine.create_execution_context_without_device_memory()\n", "create_execution_context_without_device_memory"),
    ("n = engine.get_device_memory_size_for_profile(0)\n", "get_device_memory_size_for_profile"),
    ("config.set_quantization_flag(q)\n", "set_quantization_flag"),
    ("config.set_calibration_profile(p)\n", "set_calibration_profile"),
    ("config.algorithm_selector = s\n", "algorithm_selector"),
    ("engine.weight_streaming_budget = 0\n", "weight_streaming_budget"),
    ("b = engine.minimum_weight_streaming_budget\n", "minimum_weight_streaming_budget"),
    ("layer.precision = trt.float16\n", "precision"),
    ("layer.set_output_type(0, trt.float16)\n", "set_output_type"),
    ("layer.reset_precision()\n", "reset_precision"),
    ("setattr(config, 'int8_calibrator', c)\n", "int8_calibrator"),
    ("hasattr(builder, 'platform_has_fast_fp16')\n", "platform_has_fast_fp16"),
])
def test_the_removed_api_check_finds_each_spelling(tmp_path, code, found):
    bad = tmp_path / "uses_removed_api.py"
    bad.write_text(code)
    assert removed_api_uses([str(bad)]) == [("uses_removed_api.py", found)]


def test_the_removed_api_check_leaves_other_names_alone(tmp_path):
    ok = tmp_path / "fine.py"
    ok.write_text("flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)\n"
                  "config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)\np = torch.get_float32_matmul_precision()\n"
                  "x = args.precision\n")
    assert removed_api_uses([str(ok)]) == []


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
    save_state_dict(factory(), w)
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
    save_state_dict(base, w)
    a = _adapter(base, ["0"], tmp_path / "a.safetensors")
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--onnx", "--for-trt", "--model", "tests.exporters.arch:conv3d", "--weights", w,
                 "--input-shape", "1,2,4,8,8", "-o", out, "--refit-targets", a]) == 0
    assert "refit manifest in" in capsys.readouterr().out
    manifest = json.load(open(out + ".refit.json"))
    assert manifest["weights"]["0.weight"]["initializer"] == "0.weight" and set(manifest["weights"]) == {"0.weight"}


# -- the decisions of the TensorRT review, as pure functions (no TensorRT needed) -------------------
def test_batch_profile_from_the_export_flags():
    from liedeploy import ConfigError
    from liedeploy.exporters.tensorrt import batch_profile

    assert batch_profile(4, False, None, None) == (4, 4, 4)  # a fixed batch
    assert batch_profile(4, True, None, None) == (1, 4, 64)
    assert batch_profile(1, True, 32, 8) == (1, 8, 32)
    with pytest.raises(ConfigError, match="add --dynamic-batch"):
        batch_profile(1, False, 32, None)
    with pytest.raises(ConfigError, match=r"--opt-batch must be between 1 and --max-batch \(16\), got 32"):
        batch_profile(1, True, 16, 32)


def test_the_server_refuses_engines_it_cannot_feed_naming_the_flag():
    from liedeploy import ConfigError
    from liedeploy.exporters.tensorrt import check_serving_profile

    dynamic = {"input": ((-1, 3, 8, 8), ((1, 3, 8, 8), (8, 3, 8, 8), (64, 3, 8, 8)))}
    check_serving_profile("m.engine", dynamic, 64)
    with pytest.raises(ConfigError, match=r"input input has a fixed batch of 1.*--dynamic-batch --max-batch 8'"):
        check_serving_profile("m.engine", {"input": ((1, 3, 8, 8), None)}, 8)
    with pytest.raises(ConfigError, match=r"at most 64 samples of input and --max-batch is 128.*--max-batch 128'"):
        check_serving_profile("m.engine", dynamic, 128)


def test_missing_weights_are_completed_from_the_manifest_and_only_unknown_ones_refused():
    from liedeploy.exporters.tensorrt import complete_missing

    manifest = {"weights": {"fc.weight": {"initializer": "fc.weight"}, "fc.bias": {"initializer": "fc.bias"},
                            "lm_head.weight": {"initializer": "wte.weight"}, "wte.weight": {"initializer": "wte.weight"}}}
    supply, unknown = complete_missing(["fc.bias", "wte.weight"], manifest)
    assert supply == {"fc.bias", "lm_head.weight"} and unknown == []
    assert complete_missing(["onnx::Conv_12"], manifest) == (set(), ["onnx::Conv_12"])


def test_refit_weights_supply_a_missing_bias_of_a_task_with_a_head(tmp_path):
    """The missing-weights path's arrays: a bias TensorRT asks for is the task's full tensor."""
    from liedeploy.exporters.tensorrt import complete_missing

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    w = save_state_dict(base, tmp_path / "base.safetensors")
    head = copy.deepcopy(base)
    with torch.no_grad():
        head[2].bias.add_(1.0)
    a = _write_adapter(head, tmp_path / "a.safetensors", ["0"], modules_to_save=["2"])
    manifest = {"weights": {P: {"initializer": P, "shape": list(t.shape), "tied": False}
                            for P, t in base.state_dict().items()}, "dtype": "fp32"}
    supply, unknown = complete_missing(["2.bias"], manifest)
    arrays = refit_weights(w, a, manifest, previous=supply)
    np.testing.assert_array_equal(arrays["2.bias"], head[2].bias.detach().numpy())


def test_the_gpu_script_skips_each_part_in_one_line_without_cuda_or_tensorrt(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the skip path")
    from benchmarks.gpu_extra import PARTS, run_all

    out = run_all(str(tmp_path))
    assert set(out) == set(PARTS) and all("skipped" in v for v in out.values())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == len(PARTS) and all(ln.endswith("skipped (no CUDA device)") for ln in lines)
