import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from liedeploy import LieConfig, apply_adapters_, read_adapter, save_adapter
from liedeploy.distributed import fsdp2_available

from .dist_common import STEPS, batches, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(path):
    model = apply_adapters_(make_model(), LieConfig(r=2, alpha=2, targets=["0", "2"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for x, y in batches(STEPS):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, path, name="dist")
    return read_adapter(path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.slow
def test_two_process_training_equals_one_process(strategy, tmp_path):
    if strategy == "fsdp2" and not fsdp2_available():
        pytest.skip("this torch has no FSDP2")
    out = str(tmp_path / f"{strategy}.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_train_script.py"), strategy, out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_adapter(out)
    ref = _reference(str(tmp_path / "single.safetensors"))
    assert got.targets == ref.targets and got.base_sha256 == ref.base_sha256
    for P in ref.factors:
        for a, b in zip(got.factors[P], ref.factors[P]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # only the reduction order differs
