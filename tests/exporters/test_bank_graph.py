import copy
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from liedeploy.exporters.bank_graph import BankSession, export_bank_graph  # noqa: E402
from liedeploy.exporters.task_models import export_task_models, shared_initializers  # noqa: E402
from liedeploy import LieConfig, LieError, apply_adapters_, load_adapter, merge_, save_adapter  # noqa: E402
from liedeploy.core.adapt import iter_adapters  # noqa: E402
from liedeploy.cli import main  # noqa: E402

from .arch import ARCHS  # noqa: E402
from tests.conftest import save_state_dict


def _tasks(tmp_path, name="resnet", ranks=(2, 4), targets=None):
    factory, default_targets, make_input = ARCHS[name]
    torch.manual_seed(0)
    base = factory().eval()
    paths = []
    for i, r in enumerate(ranks):
        m = apply_adapters_(copy.deepcopy(base), LieConfig(r=r, alpha=r, targets=targets or default_targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, _, _, lie in iter_adapters(m):
                lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.1)
        p = str(tmp_path / f"task{i}.safetensors")
        save_adapter(m, p, name=f"task{i}")
        paths.append(p)
    return base, paths, make_input()


def test_bank_graph_base_and_each_task(tmp_path):
    base, paths, x = _tasks(tmp_path, ranks=(2, 5))  # different ranks: dynamic rank axis
    out = str(tmp_path / "bank.onnx")
    report = export_bank_graph(base, x, out, paths, dynamic_batch=True)
    assert report["ok"] and set(report["tasks"]) == {"<base>", "task0", "task1"}
    assert os.path.exists(tmp_path / "task0.onnx_adapter") and os.path.exists(out + ".bank.json")
    sess = BankSession(out)
    with torch.no_grad():
        ref_base = base(x).numpy()
    np.testing.assert_allclose(sess.run(x)[0], ref_base, rtol=1e-4, atol=1e-5)  # no adapter: the base
    for i, p in enumerate(paths):
        merged = merge_(load_adapter(copy.deepcopy(base), p))
        with torch.no_grad():
            ref = merged(x).numpy()
        got = sess.run(x, adapter=str(tmp_path / f"task{i}.onnx_adapter"))[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        assert np.abs(got - ref_base).max() > 1e-3  # the adapter really changes the output
    # a second batch size through the same session
    x2 = torch.randn(5, *x.shape[1:])
    merged = merge_(load_adapter(copy.deepcopy(base), paths[1]))
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(x2, adapter=str(tmp_path / "task1.onnx_adapter"))[0], merged(x2).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_adapter_for_another_graph_is_refused(tmp_path):
    base, paths, x = _tasks(tmp_path, ranks=(2,))
    export_bank_graph(base, x, str(tmp_path / "a.onnx"), paths)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    obase, opaths, ox = _tasks(other_dir, name="conv1d", ranks=(2,))
    export_bank_graph(obase, ox, str(other_dir / "b.onnx"), opaths)
    sess = BankSession(str(tmp_path / "a.onnx"))
    with pytest.raises(LieError, match=r"made for another bank graph than .*a\.onnx"):
        sess.run(x, adapter=str(other_dir / "task0.onnx_adapter"))
    with pytest.raises(LieError, match=r"not a liedeploy bank graph"):
        BankSession(str(tmp_path / "task0.onnx_adapter"))


def test_bank_graph_refuses_first_order(tmp_path):
    factory, targets, make_input = ARCHS["conv1d"]
    torch.manual_seed(0)
    base = factory().eval()
    m = apply_adapters_(copy.deepcopy(base), LieConfig(expmap="first_order", targets=targets))
    p = str(tmp_path / "fo.safetensors")
    save_adapter(m, p)
    with pytest.raises(LieError, match="a first_order adapter must be merged instead"):
        export_bank_graph(base, make_input(), str(tmp_path / "b.onnx"), [p])
    assert not os.path.exists(tmp_path / "b.onnx")


def test_task_models_share_unchanged_weights(tmp_path):
    # adapt only the classifier: every conv weight is shared on disk
    base, paths, x = _tasks(tmp_path, ranks=(2, 3), targets=r".*classifier\.1\.weight")
    out = tmp_path / "tasks"
    out.mkdir()
    report = export_task_models(base, x, str(out), paths)
    assert all(f["check"]["ok"] for f in report["files"].values())
    base_bytes = os.path.getsize(out / "base.onnx.data")
    for t in ("task0", "task1"):
        own = report["files"][t]["own_data_bytes"]
        assert own < 0.05 * base_bytes  # only what the adapter changed (the classifier is small)
    shared = shared_initializers([str(out / "base.onnx"), str(out / "task0.onnx"), str(out / "task1.onnx")])
    assert shared and all(loc == "base.onnx.data" for loc, _, _ in shared.values())
    import onnxruntime as ort

    for i, p in enumerate(paths):
        merged = merge_(load_adapter(copy.deepcopy(base), p))
        sess = ort.InferenceSession(str(out / f"task{i}.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], merged(x).numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_cli_bank(tmp_path, capsys):
    base, paths, _ = _tasks(tmp_path, name="conv3d", ranks=(2,))
    w = str(tmp_path / "base.safetensors")
    save_state_dict(base, w)
    out = str(tmp_path / "bank.onnx")
    assert main(["export", "--onnx", "--model", "tests.exporters.arch:conv3d", "--weights", w,
                 "--input-shape", "1,2,4,8,8", "-o", out, "--bank"] + paths + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["exporter"] == "onnx-bank"
    sess = BankSession(out)  # the files the CLI wrote compute the merged task
    x = torch.randn(1, 2, 4, 8, 8)
    merged = merge_(load_adapter(copy.deepcopy(base), paths[0]))
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(x, adapter=str(tmp_path / "task0.onnx_adapter"))[0], merged(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ort_adapter_bank_hot_sessions_and_long_tail(tmp_path):
    from liedeploy.exporters.ort_bank import OrtAdapterBank

    base, paths, x = _tasks(tmp_path, ranks=(2, 3, 4), targets=r".*(layer\.1\.convolution|classifier\.1)\.weight")
    out = tmp_path / "tasks"
    out.mkdir()
    export_task_models(base, x, str(out), paths[:2], dynamic_batch=True)  # two hot tasks
    export_bank_graph(base, x, str(tmp_path / "bank.onnx"), paths, dynamic_batch=True)  # all three
    bank = OrtAdapterBank(task_models=str(out), bank_graph=str(tmp_path / "bank.onnx"), max_sessions=1)
    assert bank.tasks == ["task0", "task1", "task2"] and bank._shared_values  # shared weights loaded once
    refs = {}
    for i, p in enumerate(paths):
        with torch.no_grad():
            refs[f"task{i}"] = merge_(load_adapter(copy.deepcopy(base), p))(x).numpy()
    for _ in range(2):
        for t, ref in refs.items():
            np.testing.assert_allclose(bank(x, task=t), ref, rtol=1e-4, atol=1e-5)
    assert bank.stats["bank_graph_calls"] == 2  # task2 has no merged model: the long tail
    assert bank.stats["sessions_built"] >= 3  # max_sessions=1: hot sessions were evicted and rebuilt
    with torch.no_grad():
        np.testing.assert_allclose(bank(x), base(x).numpy(), rtol=1e-4, atol=1e-5)
    tasks = ["task2", "task0", None]
    xs = torch.cat([x[:1]] * 3)
    mixed = bank.forward_mixed(xs, tasks)
    for i, t in enumerate(tasks):
        np.testing.assert_allclose(mixed[i : i + 1], bank(xs[i : i + 1], task=t), rtol=1e-5, atol=1e-6)
    with pytest.raises(LieError, match=r"unknown task 'zz'; known tasks: task0, task1, task2"):
        bank(x, task="zz")
    # the hot session kept is the most used one, as in the torch bank: a rare task is served, not kept
    bank = OrtAdapterBank(task_models=str(out), bank_graph=str(tmp_path / "bank.onnx"), max_sessions=1)
    for _ in range(3):
        bank(x, task="task0")
    np.testing.assert_allclose(bank(x, task="task1"), refs["task1"], rtol=1e-4, atol=1e-5)
    assert bank.hot_tasks == ["task0"] and bank.stats["not_kept"] == 1
