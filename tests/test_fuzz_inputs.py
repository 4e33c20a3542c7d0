"""Fuzz, round 2: format-2 full tensors against real modules, ONNX export folders' files and PEFT
folders. Each input is either used correctly or refused with a LieError naming the file; never
another exception, never a hang."""

import json
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from liedeploy import AdapterBank, AdapterFileError, LieError  # noqa: E402

FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 5)).eval()


_full_name = st.sampled_from(["3.weight", "3.bias", "2.weight", "2.bias", "0.bias", "9.weight", "3.extra"])
_shape = st.lists(st.integers(0, 9), min_size=0, max_size=3)
_dtype = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURES)
@given(full=st.dictionaries(_full_name, st.tuples(_shape, _dtype), min_size=1, max_size=3))
def test_full_tensors_against_real_modules(tmp_path, write_adapter, full):
    import copy

    base = _base()
    path = write_adapter(base, tmp_path / "t.safetensors", ["0.weight"])
    from safetensors.torch import load_file

    from liedeploy.io.safetensors_header import SafetensorsFile

    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
    tensors = load_file(path)
    spec = {}
    for P, (shape, dtype) in full.items():
        tensors[P] = torch.randn(shape).to(dtype) if shape else torch.randn(()).to(dtype)
        spec[P] = {"shape": list(shape), "dtype": {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]}
    meta.update(format_version="2", full=json.dumps(spec))
    save_file(tensors, path, metadata=meta)
    try:
        bank = AdapterBank(copy.deepcopy(base), adapters={"t": path})
    except LieError as exc:
        assert str(exc).startswith(path + ": ") and "\n" not in str(exc)
        return
    y = bank(torch.randn(2, 8), task="t")  # registered: it must run, with the rows its head has
    assert y.shape[0] == 2


def _onnx_bytes():
    import io

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.5] * 16)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [w])
    buf = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), buf)
    return buf.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_onnx_export_folder_files(tmp_path, data):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.onnx_files import read_onnx_file

    good = _onnx_bytes()
    kind = data.draw(st.sampled_from(["noise", "truncated", "flipped", "external"]))
    if kind == "noise":
        blob = data.draw(st.binary(max_size=300))
    elif kind == "truncated":
        blob = good[: data.draw(st.integers(0, len(good)))]
    elif kind == "flipped":
        i = data.draw(st.integers(0, len(good) - 1))
        blob = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1:]
    else:
        import onnx

        proto = onnx.load_model_from_string(good)
        t = proto.graph.initializer[0]
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", data.draw(st.sampled_from(["w.bin", "../w.bin", "/etc/passwd", "", "sub/w.bin"]))),
                     ("offset", str(data.draw(st.integers(-4, 80)))), ("length", str(data.draw(st.integers(-4, 80))))):
            e = t.external_data.add()
            e.key, e.value = k, v
        (tmp_path / "w.bin").write_bytes(b"\0" * 64)
        blob = proto.SerializeToString()
    path = str(tmp_path / "t.onnx")
    with open(path, "wb") as f:
        f.write(blob)
    try:
        read_onnx_file(path)
    except AdapterFileError as exc:
        assert str(exc).startswith(path + ": ") and "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(cfg=st.one_of(st.binary(max_size=40), st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
           st.sampled_from(["peft_type", "r", "fan_in_fan_out", "target_modules"]),
           st.one_of(st.sampled_from(["HIRA", "LORA", "hira"]), st.integers(-2, 4), st.booleans(), st.none()),
           max_size=4))),
       factors=st.dictionaries(st.sampled_from(["base_model.model.0.hira_A", "base_model.model.0.hira_B",
                                                "base_model.model.2.hira_A", "base_model.model.2.hira_B",
                                                "base_model.model.0.lora_A", "other"]),
                               st.tuples(st.lists(st.integers(0, 6), max_size=3), st.booleans()), max_size=4))
def test_peft_folders(tmp_path, cfg, factors):
    from liedeploy import read_adapter
    from liedeploy.files.peft_convert import from_peft

    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bpath = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, bpath)
    folder = tmp_path / "peft"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_bytes(cfg)
    tensors = {k: (torch.full(shape, float("nan")) if nan else torch.randn(shape)) for k, (shape, nan) in factors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    out = str(tmp_path / "o.safetensors")
    if os.path.exists(out):
        os.unlink(out)
    try:
        from_peft(str(folder), bpath, out)
    except LieError as exc:
        assert "\n" not in str(exc) and not os.path.exists(out)
        return
    read_adapter(out)  # what convert writes, every reader accepts
