import json

import torch
from safetensors.torch import save_file
from torch import nn

from liedeploy import LieConfig, apply_adapters_, save_adapter
from liedeploy.cli import main


def _adapter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    apply_adapters_(model, LieConfig(r=2, alpha=4, targets=["0", "2"]))
    path = str(tmp_path / "rot.safetensors")
    save_adapter(model, path, name="rotated")
    return model, path


def test_inspect_adapter_table_and_json(tmp_path, capsys):
    _, path = _adapter(tmp_path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "adapter file" in out and "name: rotated" in out and "expmap: exact" in out
    assert "0.weight  8x3x3x3  2     2      70" in out  # 2 * (8 + 27)
    assert "trainable parameters: 90" in out  # 70 + 2 * (2 + 8)
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["num_parameters"] == 90
    assert [t["rank"] for t in info["targets"]] == [2, 2] and info["targets"][0]["scale"] == 2.0
    assert info["size_bytes"] > 0


def test_inspect_weights_file(tmp_path, capsys):
    p = str(tmp_path / "base.safetensors")
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, p, metadata={"k": "v"})
    assert main(["inspect", p, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "weights" and info["num_tensors"] == 2 and info["num_elements"] == 10
    assert info["dtypes"] == {"F32": 1, "BF16": 1}


def test_bad_input_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIEDEPLOY_DEBUG", raising=False)
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, p)
    assert main(["inspect", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"liedeploy inspect: error: {p}: not a safetensors file")


def test_bad_usage_exits_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import liedeploy.files.describe as describe

    def boom(path):
        raise KeyError("surprise")

    monkeypatch.setattr(describe, "describe_file", boom)
    monkeypatch.delenv("LIEDEPLOY_DEBUG", raising=False)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError: 'surprise' (set LIEDEPLOY_DEBUG=1 for the traceback)" in err
    monkeypatch.setenv("LIEDEPLOY_DEBUG", "1")
    import pytest

    with pytest.raises(KeyError):
        main(["inspect", "x"])
