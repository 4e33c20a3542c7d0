"""The torch CPU server loads its model, folds and runs its batches on one compute thread (GNU
OpenMP throttles its spin-waiting once a second thread owns a team: measured slower), and the
generation server decodes on the thread that loaded its model."""

import asyncio
import threading

import numpy as np
import torch

from liedeploy import load_adapter, merge_
from liedeploy.serving.server import ServeConfig, _compute_thread_state, resolved_fold_ahead
from tests.conftest import _write_adapter, save_state_dict
from tests.serving import models


def test_model_load_folds_and_batches_share_one_thread_that_is_not_the_callers(tmp_path):
    base = models.Net()
    save_state_dict(base, tmp_path / "base.safetensors")
    (tmp_path / "tasks").mkdir()
    path = _write_adapter(base, tmp_path / "tasks" / "t.safetensors", ["conv", "fc"], std=0.3, seed=2)
    cfg = ServeConfig(model="tests.serving.models:thread_recorder", weights=str(tmp_path / "base.safetensors"),
                      adapters=str(tmp_path / "tasks"), input_shape=(1, 3, 8, 8))
    assert resolved_fold_ahead(cfg) == 0  # CPU torch: no prefetch thread by default
    models.THREADS["built"].clear()
    models.THREADS["forward"].clear()
    state = _compute_thread_state(cfg)
    try:
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)

        async def infer():
            return await asyncio.wait_for(state.batcher.submit("t", {"input": torch.from_numpy(x)}, 2), 30)

        out = asyncio.run(infer())
    finally:
        state.batcher.close()
    ref = merge_(load_adapter(_loaded(tmp_path), path)).eval()
    with torch.no_grad():
        got = out["output"] if isinstance(out, dict) else out
        np.testing.assert_allclose(np.asarray(got), ref(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    assert len(models.THREADS["built"]) == 1 and models.THREADS["forward"] <= models.THREADS["built"]
    assert threading.get_ident() not in models.THREADS["built"]


def _loaded(tmp_path):
    from safetensors.torch import load_file

    m = models.Net()
    m.load_state_dict(load_file(str(tmp_path / "base.safetensors")))
    return m
