"""One error model: refusals are LieError subclasses; the CLI exits 2 on usage errors before any work."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import liedeploy
from liedeploy import ConfigError, LieConfig, LieError, MissingDependencyError
from liedeploy.cli import main
from liedeploy.errors import require
from tests.conftest import save_state_dict


def test_config_validation_is_a_lie_error():
    for kwargs, msg in (({"r": 0}, "LieConfig.r must be a positive integer, got 0"),
                        ({"expmap": "taylor"}, "LieConfig.expmap must be one of exact, first_order, got 'taylor'"),
                        ({"targets": None}, "LieConfig.targets is None and no filter_fn given")):
        with pytest.raises(ConfigError) as e:
            LieConfig(**kwargs)
        assert isinstance(e.value, LieError) and isinstance(e.value, ValueError) and msg in str(e.value)
    with pytest.raises(ConfigError, match="apply_adapters_ expects a LieConfig, got dict"):
        liedeploy.apply_adapters_(nn.Linear(2, 2), {"r": 2})


def test_missing_dependency_is_an_import_error_and_a_lie_error():
    with pytest.raises(MissingDependencyError) as e:
        require("surely_not_installed_pkg", "serve", "liedeploy serve")
    assert isinstance(e.value, ImportError) and isinstance(e.value, LieError)
    assert str(e.value) == "liedeploy serve needs surely_not_installed_pkg: pip install 'liedeploy[serve]'"


@pytest.fixture
def weights(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_state_dict(nn.Linear(4, 2), path)
    return path


USAGE = {
    "bank and task models": (["--onnx", "--bank", "a.safetensors", "--task-models", "b.safetensors"], "--bank and --task-models"),
    "for-trt with bank": (["--onnx", "--for-trt", "--bank", "a.safetensors"], "--for-trt writes one refit-ready graph"),
    "trt with task models": (["--trt", "--task-models", "a.safetensors"], "--trt builds one engine"),
    "strip without trt": (["--onnx", "--strip"], "--strip applies to --trt engines only"),
    "malformed shape": (["--onnx", "--input-shape", "1,x,3"], "--input-shape must be positive integers"),
    "zero in shape": (["--onnx", "--input-shape", "1,0"], "--input-shape must be positive integers"),
    "fp16 with bank": (["--onnx", "--fp16", "--bank", "a.safetensors"], "--fp16 does not apply to the onnx-bank export"),
    "bad model spec": (["--onnx", "--model", "not a spec"], "--model must look like PKG.MOD:FACTORY"),
    "bad kwargs": (["--onnx", "--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    "negative atol": (["--onnx", "--atol", "-1"], "--atol must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2_before_any_model_is_built(tmp_path, weights, capsys, case):
    extra, msg = USAGE[case]
    flag = str(tmp_path / "built")
    argv = ["export", "--model", "tests.exporters.arch:marker", "--model-kwargs", json.dumps({"path": flag}),
            "--weights", weights, "--input-shape", "1,4", "-o", str(tmp_path / "m.onnx")]
    # later flags win: the case's own --model/--input-shape/--model-kwargs replace the defaults
    with pytest.raises(SystemExit) as e:
        main(argv + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "usage: liedeploy export" in err, err
    assert not os.path.exists(flag)
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_merge_scale_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "b.safetensors", "a.safetensors", "-o", "o.safetensors", "--scale", "1", "2"])
    assert e.value.code == 2 and "got 2 --scale values for 1 adapters" in capsys.readouterr().err


def test_example_input_that_does_not_fit_is_one_line(tmp_path, weights, capsys):
    pytest.importorskip("onnx")
    code = main(["export", "--onnx", "--model", "tests.exporters.arch:marker", "--model-kwargs",
                 json.dumps({"path": str(tmp_path / "built")}), "--weights", weights, "--input-shape", "1,3,5",
                 "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "the model does not accept the example input (1, 3, 5) float32: RuntimeError: mat1 and mat2 shapes" in err
    assert "(check --input-shape and --input-dtype)" in err
    assert sorted(os.listdir(tmp_path)) == ["built", "w.safetensors"]


@pytest.mark.slow
def test_llama_with_its_cache_is_refused_up_front_and_exports_without(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from tests.exporters.arch import llama

    torch.manual_seed(0)
    w = str(tmp_path / "llama.safetensors")
    save_state_dict(llama(), w)
    argv = ["export", "--onnx", "--model", "tests.exporters.arch:llama", "--weights", w, "--input-shape", "1,8",
            "--input-dtype", "int64", "-o", str(tmp_path / "llama.onnx")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "returns a transformers cache (DynamicCache)" in err and "use_cache=False" in err
    assert sorted(os.listdir(tmp_path)) == ["llama.safetensors"]
    assert main(argv + ["--model-kwargs", '{"use_cache": false}']) == 0, capsys.readouterr().err
    assert os.path.exists(tmp_path / "llama.onnx")


def test_unexpected_exception_in_cli_subprocess_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "merge", str(tmp_path / "nope.safetensors"),
                           str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
