"""The TensorRT path as far as it runs without TensorRT and CUDA: refit-ready ONNX, manifest, refit weights."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from exporters.tensorrt import export_refit_onnx, export_tensorrt, refit_weights  # noqa: E402
from liedeploy import LieConfig, LieError, apply_adapters_, load_adapter, merge_, save_adapter  # noqa: E402
from liedeploy.cli import main  # noqa: E402

from ..layer_cases import randomize_factors  # noqa: E402
from .arch import ARCHS  # noqa: E402


@pytest.mark.parametrize("name", ["resnet", "vit", "gpt2"])
def test_refit_manifest_names_every_parameter(name, tmp_path):
    factory, _, make_input = ARCHS[name]
    torch.manual_seed(0)
    model = factory().eval()
    path = str(tmp_path / "m.onnx")
    report = export_refit_onnx(model, make_input(), path, dynamic_batch=True)
    assert report["ok"] and not report["optimized"]
    manifest = json.load(open(path + ".refit.json"))
    inits = {t.name: list(t.dims) for t in onnx.load(path, load_external_data=False).graph.initializer}
    names = dict(model.named_parameters(remove_duplicate=False))
    assert set(manifest["weights"]) == set(names)
    for p, w in manifest["weights"].items():
        assert inits[w["initializer"]] == list(names[p].shape)
    if name == "gpt2":  # wte and lm_head are one tensor: both map to the same refit name
        w = manifest["weights"]
        assert w["inner.transformer.wte.weight"]["initializer"] == w["inner.lm_head.weight"]["initializer"]


def test_refit_weights_come_from_the_pristine_base(tmp_path):
    factory, targets, make_input = ARCHS["resnet"]
    torch.manual_seed(0)
    base = factory().eval()
    base_file = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)
    path = str(tmp_path / "m.onnx")
    export_refit_onnx(base, make_input(), path)
    manifest = json.load(open(path + ".refit.json"))
    adapters = []
    for i, t in enumerate([targets, r".*classifier\.1\.weight"]):
        m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, targets=t))
        randomize_factors(m, std=0.1, seed=i)
        p = str(tmp_path / f"a{i}.safetensors")
        save_adapter(m, p)
        adapters.append(p)
    merged = {i: merge_(load_adapter(copy.deepcopy(base), p)).state_dict() for i, p in enumerate(adapters)}
    w0 = refit_weights(base_file, adapters[0], manifest)
    for name, arr in w0.items():
        np.testing.assert_array_equal(arr, merged[0][name].numpy())
    # A -> B: B's weights, and every target of A that B does not adapt goes back to the base
    w1 = refit_weights(base_file, adapters[1], manifest, previous=set(w0))
    assert set(w1) == set(w0) | {"inner.classifier.1.weight"}
    for name, arr in w1.items():
        np.testing.assert_array_equal(arr, merged[1][name].numpy())
    # B -> A again equals A exactly: computed from the base, never on top of refitted weights
    w0_again = refit_weights(base_file, adapters[0], manifest, previous=set(w1))
    for name in w0:
        np.testing.assert_array_equal(w0_again[name], w0[name])


def test_trt_refuses_cleanly_without_tensorrt(tmp_path, capsys, monkeypatch):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    factory, _, make_input = ARCHS["conv1d"]
    with pytest.raises(LieError, match=r"TensorRT is not installed: pip install 'liedeploy\[trt\]'"):
        export_tensorrt(factory(), make_input(), str(tmp_path / "m.engine"))
    assert os.listdir(tmp_path) == []  # refused before writing anything


def test_cli_for_trt(tmp_path, capsys):
    factory, _, _ = ARCHS["conv3d"]
    torch.manual_seed(0)
    w = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in factory().state_dict().items()}, w)
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--onnx", "--for-trt", "--model", "tests.exporters.arch:conv3d", "--weights", w,
                 "--input-shape", "1,2,4,8,8", "-o", out]) == 0
    assert "refit manifest in" in capsys.readouterr().out
    assert json.load(open(out + ".refit.json"))["weights"]["0.weight"]["initializer"] == "0.weight"
