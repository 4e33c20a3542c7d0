"""Hardening round 2, files and CLI: special files, malformed inputs and quadratic patterns are
refused in one sentence naming the file; newcomer rough edges."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from liedeploy import AdapterBank, AdapterFileError, ConfigError
from liedeploy.cli import main
from tests.conftest import save_state_dict


def _peft_folder(tmp_path, *, nan=False, flat=False):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bpath = str(tmp_path / "base.safetensors")
    save_state_dict(base, bpath)
    folder = tmp_path / "hira"
    peft.get_peft_model(base, peft.HiraConfig(r=2, target_modules=["0"])).save_pretrained(str(folder))
    if nan or flat:
        from safetensors.torch import load_file

        w = load_file(str(folder / "adapter_model.safetensors"))
        key = next(k for k in w if k.endswith("hira_A"))
        w[key] = torch.full_like(w[key], float("nan")) if nan else w[key].reshape(-1)
        save_file(w, str(folder / "adapter_model.safetensors"))
    return folder, bpath


# 12. convert --from-peft -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_convert_refuses_special_config_files_at_once(tmp_path, capsys, kind):
    folder, bpath = _peft_folder(tmp_path)
    cfg = folder / "adapter_config.json"
    cfg.unlink()
    if kind == "fifo":
        os.mkfifo(cfg)
    else:
        cfg.symlink_to("/dev/zero")
    assert main(["convert", "--from-peft", str(folder), "--base", bpath, "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "adapter_config.json: is a" in err and "not a regular file" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_nan_factors(tmp_path, capsys):
    folder, bpath = _peft_folder(tmp_path, nan=True)
    assert main(["convert", "--from-peft", str(folder), "--base", bpath, "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "holds non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_a_one_axis_factor_naming_it(tmp_path, capsys):
    folder, bpath = _peft_folder(tmp_path, flat=True)
    assert main(["convert", "--from-peft", str(folder), "--base", bpath, "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "hira_A has shape" in err and "at least 2 axes" in err and str(folder) in err


# 13. calibration files -------------------------------------------------------------------------
def test_calibration_special_files_and_npz_are_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.quantize import load_calibration

    fifo = tmp_path / "c.npy"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        load_calibration(str(fifo), (1, 4))
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match=r"c\.npz: not a numpy \.npy array \(an \.npz archive"):
        load_calibration(str(npz), (1, 4))
    good = tmp_path / "g.npy"
    np.save(good, np.ones((3, 4), np.float32))
    assert load_calibration(str(good), (1, 4)).shape == (3, 4)


# 14. bounded tensor names: regex targets stay linear ------------------------------------------------
def test_a_megabyte_tensor_name_is_refused_at_parse_time(tmp_path, capsys):
    name = "a" * (1 << 20)
    blob = json.dumps({name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    import time

    t0 = time.monotonic()
    assert main(["prune", str(path), "-o", str(tmp_path / "p.safetensors"), "--sparsity", "0.5",
                 "--targets", r"(.*\.)*(weight|bias)"]) == 1
    assert time.monotonic() - t0 < 10
    assert "has a tensor name of 1048576 characters (at most 1024" in capsys.readouterr().err


# 15 and 6, in the bank: replaced files and heads the base cannot take ---------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))


def test_bank_refuses_a_task_file_replaced_after_registration(tmp_path, write_adapter):
    base = _net()
    path = write_adapter(base, tmp_path / "t.safetensors", ["0"], seed=1)
    bank = AdapterBank(base, adapters={"t": path}, lazy=True, cache_bytes=0)
    bank(torch.zeros(1, 8), task="t")
    other = write_adapter(base, tmp_path / "o.safetensors", ["0"], seed=2)
    os.replace(other, path)
    with pytest.raises(AdapterFileError, match="replaced or changed since it was registered"):
        bank(torch.zeros(1, 8), task="t")
    bank.add("t", path, replace=True)
    bank(torch.zeros(1, 8), task="t")


@pytest.mark.parametrize("head, message", [
    (nn.Linear(5, 2), r"full tensor 2\.weight has shape \[2, 5\] but the base's module takes \[5, 8\]"),
    (nn.Linear(8, 2).half(), r"full tensor 2\.(bias|weight) is F16 but the base's is F32"),
])
def test_bank_refuses_heads_the_base_cannot_use_at_registration(tmp_path, write_adapter, head, message):
    import copy

    base = _net()
    m = copy.deepcopy(base)
    m[2] = head
    path = write_adapter(m, tmp_path / "t.safetensors", ["0"], modules_to_save=["2"])
    with pytest.raises(AdapterFileError, match=message):
        AdapterBank(copy.deepcopy(base), adapters={"t": path}, lazy=True)


def test_a_head_with_another_number_of_classes_is_accepted(tmp_path, write_adapter):
    import copy

    base = _net()
    m = copy.deepcopy(base)
    m[2] = nn.Linear(8, 2)
    path = write_adapter(m, tmp_path / "t.safetensors", ["0"], modules_to_save=["2"])
    bank = AdapterBank(copy.deepcopy(base), adapters={"t": path})
    assert bank(torch.zeros(3, 8), task="t").shape == (3, 2)


# newcomer edges -------------------------------------------------------------------------------------
def test_export_task_models_creates_its_folder_and_prints_no_evaluation_noise(tmp_path, write_adapter, capfd):
    pytest.importorskip("onnxruntime")
    from tests.exporters.arch import conv3d_files

    w, a = conv3d_files(tmp_path)
    out = tmp_path / "new" / "folder"
    assert main(["export", "--onnx", "--model", "tests.exporters.arch:conv3d", "--weights", w,
                 "--input-shape", "1,2,4,8,8", "-o", str(out), "--task-models", a]) == 0
    captured = capfd.readouterr()
    assert (out / "base.onnx").exists() and (out / "a.onnx").exists()
    assert "Evaluation failed" not in captured.out + captured.err


def test_inspect_shows_the_weights_that_make_2_4_no(tmp_path, capsys):
    w = torch.randn(4, 8)
    w[:, ::2] = 0  # 2:4
    dense = torch.randn(4, 8)
    save_file({"a.weight": w, "b.weight": dense}, str(tmp_path / "w.safetensors"))
    assert main(["inspect", str(tmp_path / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "2:4 on every weight: no" in out
    assert any(line.split()[:1] == ["b.weight"] and line.split()[-1] == "no" for line in out.splitlines())
