"""`liedeploy serve` end to end: real server processes on loopback, a client nobody here wrote: answers
for every task and encoding, concurrency and eviction, batch workers, named inputs, other backends."""

import concurrent.futures as cf
import copy
import json
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from liedeploy import load_adapter, merge_  # noqa: E402
from tests.conftest import _write_adapter, save_state_dict  # noqa: E402
from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.models import TwoInputs  # noqa: E402
from tests.serving.server_farm import N_TASKS, ONE_TASK_BYTES, request, infer_json, metric, ref, triton_input  # noqa: E402
from tests.serving.server_farm import farm, server  # noqa: E402,F401  (fixtures, used by name)


def test_tritonclient_both_encodings_every_task(server, farm):
    c = httpclient.InferenceServerClient(server.hostport)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "liedeploy" and "binary_tensor_data" in meta["extensions"]
    m = c.get_model_metadata("task3")
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert m["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 5]}]
    assert c.is_model_ready("task3") and c.is_model_ready("base") and not c.is_model_ready("nope")
    rng = np.random.default_rng(0)
    for task in ["base"] + [f"task{i}" for i in range(N_TASKS)]:
        x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
        for binary in (True, False):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("output", binary_data=binary)
            got = c.infer(task, [inp], outputs=[out]).as_numpy("output")
            np.testing.assert_allclose(got, ref(farm, task, x), rtol=1e-5, atol=1e-6)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_allclose(c.infer(task, [inp]).as_numpy("output"), ref(farm, task, x), rtol=1e-5, atol=1e-6)


def test_plain_http_json(server, farm):
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    status, headers, body = infer_json(server.url, "task5", x)
    assert status == 200 and headers["content-type"].startswith("application/json")
    out = json.loads(body)
    assert out["model_name"] == "task5" and out["outputs"][0]["shape"] == [2, 5]
    got = np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, 5)
    np.testing.assert_allclose(got, ref(farm, "task5", x), rtol=1e-5, atol=1e-6)


def _many_clients(server, farm, rounds=50):
    """16 client threads, ``rounds`` random-task requests each (binary or JSON); (errors, wrong)."""
    rng = np.random.default_rng(2)
    xs = {t: rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for t in farm["refs"]}
    want = {t: ref(farm, t, x) for t, x in xs.items()}
    tasks = [f"task{i}" for i in range(N_TASKS)] + ["base"]
    wrong, errors = [], []

    def client(seed):
        c = httpclient.InferenceServerClient(server.hostport, connection_timeout=30, network_timeout=30)
        r = np.random.default_rng(seed)
        for _ in range(rounds):
            t = tasks[r.integers(len(tasks))]
            inp = httpclient.InferInput("input", [1, 3, 8, 8], "FP32")
            inp.set_data_from_numpy(xs[t], binary_data=bool(r.integers(2)))
            try:
                got = c.infer(t, [inp]).as_numpy("output")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                continue
            if not np.allclose(got, want[t], rtol=1e-5, atol=1e-6):
                wrong.append(t)

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    return errors, wrong


def test_threads_over_20_tasks_with_constant_eviction(server, farm):
    errors, wrong = _many_clients(server, farm)
    assert errors == [] and wrong == []
    _, _, metrics = request(f"{server.url}/metrics")
    text = metrics.decode()
    assert metric(text, "liedeploy_cache_evictions_total") > 0  # the cache held 2 of 20 tasks
    assert metric(text, "liedeploy_resident_bytes") <= 2 * ONE_TASK_BYTES


def test_two_workers_share_the_cores_and_answer_right_under_eviction(farm):
    cores = len(os.sched_getaffinity(0))
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--cache-bytes", str(2 * ONE_TASK_BYTES), "--max-batch", "8",
            "--max-delay-ms", "2", "--workers", "2"]
    with ServerProcess(args) as srv:
        assert f"liedeploy serve: 2 workers x {max(1, cores // 2)} torch thread(s) on {cores} cores" in srv.lines
        errors, wrong = _many_clients(srv, farm, rounds=20)
        assert errors == [] and wrong == []
        text = request(f"{srv.url}/metrics")[2].decode()
        assert metric(text, "liedeploy_cache_evictions_total") > 0
    with ServerProcess(args + ["--threads", str(cores)]) as srv:  # more threads than cores: said at start
        assert any("more threads than cores" in line for line in srv.lines)


def test_workers_below_one_is_a_usage_error(capsys, tmp_path):
    from liedeploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tests.serving.models:net", "--weights", str(tmp_path / "w.safetensors"),
              "--adapters", str(tmp_path), "--workers", "0"])
    assert e.value.code == 2 and "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_two_named_inputs_and_structured_outputs(tmp_path):
    torch.manual_seed(0)
    base = TwoInputs().eval()
    w = str(tmp_path / "base.safetensors")
    save_state_dict(base, w)
    (tmp_path / "tasks").mkdir()
    p = _write_adapter(base, tmp_path / "tasks" / "t.safetensors", ["emb", "proj"], std=0.3)
    ref = merge_(load_adapter(copy.deepcopy(base), p)).eval()
    args = ["--model", "tests.serving.models:two_inputs", "--weights", w, "--adapters", str(tmp_path / "tasks"),
            "--input", "input_ids:INT64:-1,7", "--input", "attention_mask:INT64:-1,7"]
    with ServerProcess(args) as srv:
        c = httpclient.InferenceServerClient(srv.hostport)
        meta = c.get_model_metadata("t")
        assert [o["name"] for o in meta["outputs"]] == ["logits", "hidden.0", "hidden.1"]
        ids = np.random.default_rng(0).integers(0, 50, (2, 7)).astype(np.int64)
        mask = np.ones((2, 7), np.int64)
        mask[1, 4:] = 0
        inputs = []
        for name, arr in (("input_ids", ids), ("attention_mask", mask)):
            i = httpclient.InferInput(name, list(arr.shape), "INT64")
            i.set_data_from_numpy(arr)
            inputs.append(i)
        r = c.infer("t", inputs)
        with torch.no_grad():
            want = ref(torch.from_numpy(ids), torch.from_numpy(mask))
        np.testing.assert_allclose(r.as_numpy("logits"), want["logits"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.as_numpy("hidden.1"), want["hidden"][1].numpy(), rtol=1e-5, atol=1e-6)


def test_a_thousand_tasks_register_lazily(farm, tmp_path):
    tasks = tmp_path / "many"
    tasks.mkdir()
    src = os.path.join(farm["tasks"], "task0.safetensors")
    for i in range(1000):
        os.link(src, tasks / f"t{i:04d}.safetensors")
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", str(tasks),
            "--input-shape", "1,3,8,8"]
    t0 = time.monotonic()
    with ServerProcess(args) as srv:
        started = time.monotonic() - t0
        text = request(f"{srv.url}/metrics")[2].decode()
        assert metric(text, "liedeploy_registered_tasks") == 1000
        assert metric(text, "liedeploy_resident_tasks") == 0 and metric(text, "liedeploy_folds_total") == 0
        x = np.zeros((1, 3, 8, 8), np.float32)
        assert infer_json(srv.url, "t0999", x)[0] == 200
        assert metric(request(f"{srv.url}/metrics")[2].decode(), "liedeploy_folds_total") == 1
    assert started < 30


def test_ort_backend_serves_the_task_models_export(farm, tmp_path):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.task_models import export_task_models

    torch.manual_seed(0)
    base = farm["refs"]["base"]
    out = tmp_path / "export"
    out.mkdir()
    paths = [os.path.join(farm["tasks"], f"task{i}.safetensors") for i in (1, 4)]
    export_task_models(copy.deepcopy(base), torch.randn(2, 3, 8, 8), str(out), paths, dynamic_batch=True)
    with ServerProcess(["--backend", "ort", "--adapters", str(out)]) as srv:
        c = httpclient.InferenceServerClient(srv.hostport)
        meta = c.get_model_metadata("task4")
        assert meta["platform"] == "liedeploy_ort" and meta["inputs"][0]["shape"] == [-1, 3, 8, 8]
        out_name = meta["outputs"][0]["name"]
        x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
        for task in ("base", "task1", "task4"):
            got = c.infer(task, [triton_input(x)]).as_numpy(out_name)
            np.testing.assert_allclose(got, ref(farm, task, x), rtol=1e-4, atol=1e-5)
        with pytest.raises(InferenceServerException, match="unknown task 'task2'"):
            c.infer("task2", [triton_input(x)])


def test_trt_backend_is_refused_in_one_line_without_tensorrt(farm):
    import subprocess
    import sys

    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and CUDA are here: the refusal does not apply")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "serve", "--backend", "trt", "--model",
                           "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
                           "--input-shape", "1,3,8,8", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "TensorRT" in proc.stderr and "listening" not in proc.stdout
