import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from liedeploy.exporters.onnx import export_onnx  # noqa: E402
from liedeploy import LieConfig, LieError, apply_adapters_, merge_  # noqa: E402
from liedeploy.core.adapt import iter_adapters  # noqa: E402
from liedeploy.cli import main  # noqa: E402

from .arch import ARCHS  # noqa: E402
from tests.conftest import save_state_dict


def _adapted(name, seed=0):
    factory, targets, make_input = ARCHS[name]
    torch.manual_seed(seed)
    model = factory().eval()
    apply_adapters_(model, LieConfig(r=2, alpha=2, targets=targets))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.1)
    return model, make_input()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_adapt_merge_export_check(name, tmp_path):
    model, x = _adapted(name)
    with torch.no_grad():
        ref = model(x)
    path = str(tmp_path / f"{name}.onnx")
    report = export_onnx(model, x, path, dynamic_batch=True)
    assert report["ok"] and len(report["checks"]) == 2  # two batch sizes
    assert report["checks"][1]["batch"] == x.shape[0] + 2
    saved = json.load(open(path + ".report.json"))
    assert saved["ok"] and saved["opset"] == 18
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-3, atol=1e-4)  # the adapted model's output
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}.onnx", f"{name}.onnx.report.json"])


class _Drifting(torch.nn.Module):
    """Dropout forced on in eval: torch and ONNX Runtime drop different elements, so they disagree."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(x), 0.5, training=True)


def test_refused_export_leaves_nothing(tmp_path):
    path = str(tmp_path / "m.onnx")
    with pytest.raises(LieError, match=r"the ONNX export of m\.onnx disagrees with torch: max abs error .* nothing was written"):
        export_onnx(_Drifting(), torch.randn(8, 64), path)
    assert os.listdir(tmp_path) == []


def test_fp16_export_is_strongly_typed_with_fp32_io(tmp_path):
    """Weights and compute in fp16, inputs and outputs in fp32: the graph TensorRT 11 builds fp16 from."""
    import onnx
    import onnxruntime as ort

    model, x = _adapted("conv1d")
    path = str(tmp_path / "h.onnx")
    report = export_onnx(model, x, path, fp16=True, dynamic_batch=True)
    assert report["ok"] and report["dtype"] == "fp16" and report["io_dtype"] == "fp32" and report["atol"] == 2e-2
    proto = onnx.load(path)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [F32]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [F32]
    weights = [t for t in proto.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == F16 for t in weights)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xb = torch.randn(5, *x.shape[1:])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0])
    with torch.no_grad():
        want = merge_(copy.deepcopy(model))(xb)  # the fp32 model
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # the stated fp16 tolerance


def test_cli_export_strict_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIEDEPLOY_DEBUG", raising=False)
    model, _ = _adapted("conv3d")
    merge_(model)
    w = str(tmp_path / "w.safetensors")
    save_state_dict(model, w)
    out = str(tmp_path / "c.onnx")
    args = ["export", "--onnx", "--model", "tests.exporters.arch:conv3d", "--weights", w, "--input-shape", "1,2,4,8,8", "-o", out]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.pop("2.bias")
    save_file(sd, w)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"liedeploy export: error: {w}: missing key 2.bias"
    sd["2.bias"] = torch.zeros(4)
    sd["extra"] = torch.zeros(1)
    save_file(sd, w)
    assert main(args) == 1
    assert f"{w}: unexpected key extra" in capsys.readouterr().err
    assert main(["export", "--onnx", "--model", "tests.exporters.arch:nope", "--weights", w, "--input-shape", "1,2", "-o", out]) == 1
    assert "tests.exporters.arch has no attribute nope" in capsys.readouterr().err
    engine = str(tmp_path / "c.engine")
    assert main(["export", "--trt", "--model", "tests.exporters.arch:conv3d", "--weights", w, "--input-shape", "1,2,4,8,8", "-o", engine]) == 1
    assert "TensorRT is not installed: pip install 'liedeploy[trt]'" in capsys.readouterr().err
    assert not os.path.exists(engine)
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "x:y", "--weights", w, "--input-shape", "1", "-o", out])  # no --onnx/--trt
    assert e.value.code == 2
