"""Regressions of the faults that scattered copies of one piece of logic caused (issue: one owner,
one copy). Bugs 1-3 (adapter state) are in test_state.py."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from liedeploy import AdapterFileError, ConfigError
from liedeploy.cli import main
from liedeploy.files.prune import prune_files

from tests.models import MLP3

from .test_hardening import _read_sharded, _sharded
from tests.conftest import save_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prune_three_times_into_one_sharded_out_leaves_no_orphan(tmp_path):  # bug 4
    torch.manual_seed(0)
    base = _sharded(tmp_path / "base", MLP3())
    out = str(tmp_path / "out" / "p.safetensors.index.json")
    os.makedirs(os.path.dirname(out))
    for _ in range(3):
        prune_files(base, out, sparsity=0.5)
        _, shards = _read_sharded(out)
        files = sorted(os.listdir(os.path.dirname(out)))
        assert files == sorted([os.path.basename(s) for s in shards] + [os.path.basename(out)])


def test_prune_checks_shards_like_merge(tmp_path):  # bug 4: the "shard lacks tensor" check
    torch.manual_seed(0)
    base = _sharded(tmp_path / "base", MLP3())
    idx = json.load(open(base))
    idx["weight_map"]["ghost.weight"] = "s0.safetensors"
    open(base, "w").write(json.dumps(idx))
    out = str(tmp_path / "p.safetensors.index.json")
    with pytest.raises(AdapterFileError, match="names tensor ghost.weight in shard s0.safetensors, which lacks it"):
        prune_files(base, out, sparsity=0.5)
    assert not os.path.exists(out)


def test_convert_from_peft_writes_the_full_config(tmp_path):  # bug 5
    peft = pytest.importorskip("peft")
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bpath = str(tmp_path / "base.safetensors")
    save_state_dict(base, bpath)
    pm = peft.get_peft_model(base, peft.HiraConfig(r=2, target_modules=["0", "2"]))
    pm.save_pretrained(str(tmp_path / "hira"))
    out = str(tmp_path / "lie.safetensors")
    assert main(["convert", "--from-peft", str(tmp_path / "hira"), "--base", bpath, "-o", out]) == 0
    from liedeploy import LieConfig, read_adapter

    cfg = read_adapter(out).config
    assert {"modules_to_save", "exclude_modules", "rank_pattern", "alpha_pattern"} <= set(cfg)
    assert LieConfig.from_dict(cfg).expmap == "first_order"


def test_an_empty_admin_token_file_is_refused_by_serve_and_ray_alike(tmp_path):  # bug 6
    pytest.importorskip("prometheus_client")
    from liedeploy.serving.ray import ingress_state, parse_args
    from liedeploy.serving.server import ServeConfig, build_state, read_admin_token

    empty = tmp_path / "token"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="the admin token file is empty"):
        read_admin_token(str(empty))
    w = str(tmp_path / "w.safetensors")
    save_file({"fc.weight": torch.zeros(2, 2)}, w)
    (tmp_path / "tasks").mkdir()
    settings = parse_args({"model": "m:f", "weights": w, "adapters": str(tmp_path / "tasks"), "input_shape": "1,2",
                           "admin_token_file": str(empty)})
    with pytest.raises(ConfigError, match="the admin token file is empty"):
        ingress_state(None, settings)  # the Ray ingress
    with pytest.raises(ConfigError, match="the admin token file is empty"):
        build_state(ServeConfig(adapters=str(tmp_path / "tasks"), admin_token_file=str(empty)), backend=object())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        read_admin_token(str(fifo))


@pytest.mark.slow
@pytest.mark.parametrize("step", ["publish:1", "publish:2", "committed"])
def test_for_trt_graph_is_never_published_without_its_manifest(tmp_path, step):  # bug 7
    pytest.importorskip("onnxruntime")
    from tests.exporters.arch import conv3d_files

    w, a = conv3d_files(tmp_path)
    out = str(tmp_path / "out" / "m.onnx")
    os.makedirs(os.path.dirname(out))
    argv = ["export", "--onnx", "--for-trt", "--model", "tests.exporters.arch:conv3d", "--weights", w,
            "--input-shape", "1,2,4,8,8", "-o", out, "--refit-targets", a]
    env = dict(os.environ, LIEDEPLOY_TEST_KILL_AT=step, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", *argv], env=env, cwd=ROOT, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if os.path.exists(out):
        manifest = json.load(open(out + ".refit.json"))
        assert manifest["onnx"] == "m.onnx"
    assert os.path.exists(out) == (step == "committed")
