"""Compression: pruned bases whose zeros every task keeps, and int8 exports with the standard tools."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from liedeploy import AdapterBank, LieConfig, apply_adapters_, merge_, merge_files, save_adapter
from liedeploy.core.adapt import iter_adapters
from liedeploy.cli import main
from liedeploy.files.sparsity import nm_conforms

from .layer_cases import CASES, make_case
from tests.models import ConvMLP
from tests.conftest import save_state_dict


def _pruned(tmp_path, method):
    torch.manual_seed(0)
    base = ConvMLP().eval()
    path = str(tmp_path / "base.safetensors")
    save_state_dict(base, path)
    out = str(tmp_path / f"pruned-{method.replace(':', '-')}.safetensors")
    flag = ["--pattern", method] if ":" in method else ["--sparsity", method]
    assert main(["prune", path, "-o", out, "--json"] + flag) == 0
    model = ConvMLP().eval()
    model.load_state_dict(load_file(out))
    return model, out


def test_prune_unstructured_and_2_4(tmp_path, capsys):
    model, out = _pruned(tmp_path, "0.5")
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["tensors"]) == {"conv.weight", "fc.weight", "out.weight"}  # rank >= 2 only
    for name, t in rep["tensors"].items():
        w = load_file(out)[name]
        assert (w == 0).sum().item() == int(0.5 * w.numel()) and t["sparsity"] == pytest.approx(0.5)
    base = load_file(str(tmp_path / "base.safetensors"))
    kept = load_file(out)["fc.weight"] != 0
    assert base["fc.weight"].abs()[kept].min() >= base["fc.weight"].abs()[~kept].max()  # smallest magnitudes went
    assert torch.equal(load_file(out)["fc.bias"], base["fc.bias"])
    model, out24 = _pruned(tmp_path, "2:4")
    rep = json.loads(capsys.readouterr().out)
    assert rep["tensors"]["conv.weight"]["2:4"] and rep["tensors"]["fc.weight"]["2:4"]
    assert "out.weight" in rep["tensors"] or "out.weight" in rep["skipped"]
    w = load_file(out24)["conv.weight"].numpy()  # groups of 4 input channels at each kernel position
    assert nm_conforms(w == 0, 2, 4) and (np.moveaxis(w, 1, -1).reshape(-1, 4) == 0).sum(-1).min() == 2
    assert main(["inspect", out24]) == 0
    text = capsys.readouterr().out
    assert "2:4 on every weight: no" in text or "2:4 on every weight: yes" in text
    assert main(["inspect", out24, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparsity"]["weights"]["conv.weight"]["2:4"] is True


def test_prune_usage_errors(tmp_path, capsys):
    for argv, msg in ((["--sparsity", "1.5"], "--sparsity must be in (0, 1)"), (["--pattern", "4:2"], "N:M with 0 < N < M"),
                      (["--sparsity", "0.5", "--targets", "("], "not a valid regex")):
        with pytest.raises(SystemExit) as e:
            main(["prune", "b.safetensors", "-o", "o.safetensors"] + argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("expmap", ["exact", "first_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_keeps_the_zero_pattern_on_every_layer_kind(case, dtype, expmap):
    layer, _ = make_case(case)
    layer = layer.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() >= 2:
                p.mul_((torch.rand(p.shape) > 0.5).to(dtype))  # a pruned base
    zeros = {n: (p == 0) for n, p in layer.named_parameters() if p.dim() >= 2}
    m = apply_adapters_(copy.deepcopy(layer), LieConfig(r=2, expmap=expmap, targets=["0"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.5)
    merge_(m)
    for n, p in m.named_parameters():
        if n in zeros:
            assert torch.equal(p == 0, zeros[n]), (case, n)  # the pattern, bit for bit


def test_merge_files_reports_kept_zeros_and_first_order_sign_flips(tmp_path, capsys):
    model, pruned = _pruned(tmp_path, "0.5")
    capsys.readouterr()
    a = str(tmp_path / "fo.safetensors")
    m = apply_adapters_(copy.deepcopy(model), LieConfig(r=2, alpha=2, expmap="first_order", targets=["fc"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.fill_(-3.0)  # 1 + dW < 0 on many weights
            lie.lie_A.fill_(1.0)
    save_adapter(m, a)
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", pruned, a, "-o", out]) == 0
    text = capsys.readouterr().out
    assert "sparsity kept:" in text and "(100.0%)" in text and "signs flipped:" in text
    e = str(tmp_path / "ex.safetensors")
    m = apply_adapters_(copy.deepcopy(model), LieConfig(r=2, targets=["fc", "conv"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.5)
    save_adapter(m, e)
    summary = merge_files(pruned, [e], out)
    sp = summary["sparsity"]
    assert sp["zeros_base"] > 0 and sp["zeros_kept"] == sp["zeros_base"] and sp["sign_flips"] == 0
    # the bank and an ONNX export keep the zeros too
    bank = AdapterBank(copy.deepcopy(model), adapters={"t": e})
    rep = bank.model_for("t")
    assert torch.equal(rep.fc.weight == 0, model.fc.weight == 0)
    assert torch.equal(rep.conv.weight == 0, model.conv.weight == 0)


def test_int8_export_qdq_per_channel_checked(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    w = str(tmp_path / "w.safetensors")
    save_state_dict(big, w)
    calib = str(tmp_path / "calib.npy")
    np.save(calib, np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    (tmp_path / "models.py").write_text("import torch.nn as nn\n"
                                        "def big():\n    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), "
                                        "nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        fp32 = str(tmp_path / "fp32.onnx")
        int8 = str(tmp_path / "int8.onnx")
        common = ["export", "--onnx", "--model", "models:big", "--weights", w, "--input-shape", "1,3,8,8", "--dynamic-batch"]
        assert main(common + ["-o", fp32]) == 0
        assert main(common + ["-o", int8, "--quantize", "int8", "--calibration", calib, "--json"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    report = json.load(open(int8 + ".report.json"))
    assert report["dtype"] == "int8" and report["int8"]["ok"] and report["int8"]["format"] == "QDQ"
    assert "max |int8 - fp32| <=" in report["int8"]["tolerance"]
    assert report["int8"]["checks"][0]["top1_agreement"] >= 0.9
    ops = {n.op_type for n in onnx.load(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert os.path.getsize(int8) <= 0.35 * os.path.getsize(fp32)
    with pytest.raises(SystemExit) as e:
        main(common + ["-o", int8, "--quantize", "int8"])
    assert e.value.code == 2 and "--quantize int8 needs --calibration" in capsys.readouterr().err


def test_int8_task_models_share_the_base_bytes(tmp_path):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.task_models import export_task_models

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=2, targets=["0"]))  # only the first conv changes
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.1)
    a = str(tmp_path / "t.safetensors")
    save_adapter(m, a)
    out = tmp_path / "out"
    out.mkdir()
    calib = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    rep = export_task_models(base, torch.zeros(1, 3, 8, 8), str(out), [a], quantize="int8", calibration=calib,
                             dynamic_batch=True)
    assert rep["files"]["t"]["check"]["ok"] and rep["files"]["t"]["check"]["int8"]["ok"]
    base_bytes = os.path.getsize(out / "base.onnx.data")
    assert rep["files"]["t"]["own_data_bytes"] <= 0.2 * base_bytes  # the unchanged layers share the base int8 bytes
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "t.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: calib[:4]})[0]
    with torch.no_grad():
        want = merge_(copy.deepcopy(m))(torch.from_numpy(calib[:4])).numpy()
    assert (y.argmax(-1) == want.argmax(-1)).mean() >= 0.75
