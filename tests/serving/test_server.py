"""`liedeploy serve` end to end: real server processes on loopback, a client nobody here wrote."""

import concurrent.futures as cf
import copy
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from liedeploy import load_adapter, merge_  # noqa: E402
from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.models import Net, TwoInputs  # noqa: E402
from tests.conftest import save_state_dict

N_TASKS = 20
ONE_TASK_BYTES = (8 * 3 * 9 + 5 * 8) * 4


def _http(url, method="GET", body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _infer_json(url, task, x, name="input", datatype="FP32"):
    body = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()
    return _http(f"{url}/v2/models/{task}/infer", "POST", body, {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A base, 20 tasks (one of them with an adapter file that is corrupt), their merged references."""
    d = tmp_path_factory.mktemp("farm")
    torch.manual_seed(0)
    base = Net().eval()
    save_state_dict(base, str(d / "base.safetensors"))
    tasks = d / "tasks"
    tasks.mkdir()
    refs = {}
    for i in range(N_TASKS):
        p = _write_adapter(base, tasks / f"task{i}.safetensors", ["conv", "fc"], std=0.3, seed=100 + i)
        refs[f"task{i}"] = merge_(load_adapter(copy.deepcopy(base), p)).eval()
    refs["base"] = base
    (tasks / "broken.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    other = Net()
    _write_adapter(other, tasks / "foreign.safetensors", ["conv"], seed=1)  # made for another base
    token = d / "token"
    token.write_text("s3cret\n")
    return {"dir": d, "base": str(d / "base.safetensors"), "tasks": str(tasks), "refs": refs, "token": str(token)}


@pytest.fixture(scope="module")
def server(farm):
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--cache-bytes", str(2 * ONE_TASK_BYTES), "--max-batch", "8",
            "--max-delay-ms", "2", "--max-body", "64KiB", "--admin-token-file", farm["token"]]
    with ServerProcess(args) as srv:
        yield srv


def _ref(farm, task, x):
    with torch.no_grad():
        return farm["refs"][task](torch.from_numpy(x)).numpy()


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
            np.testing.assert_allclose(got, _ref(farm, task, x), rtol=1e-5, atol=1e-6)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_allclose(c.infer(task, [inp]).as_numpy("output"), _ref(farm, task, x), rtol=1e-5, atol=1e-6)


def test_plain_http_json(server, farm):
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    status, headers, body = _infer_json(server.url, "task5", x)
    assert status == 200 and headers["content-type"].startswith("application/json")
    out = json.loads(body)
    assert out["model_name"] == "task5" and out["outputs"][0]["shape"] == [2, 5]
    got = np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, 5)
    np.testing.assert_allclose(got, _ref(farm, "task5", x), rtol=1e-5, atol=1e-6)


def _many_clients(server, farm, rounds=50):
    """16 client threads, ``rounds`` random-task requests each (binary or JSON); (errors, wrong)."""
    rng = np.random.default_rng(2)
    xs = {t: rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for t in farm["refs"]}
    want = {t: _ref(farm, t, x) for t, x in xs.items()}
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
    _, _, metrics = _http(f"{server.url}/metrics")
    text = metrics.decode()
    assert _metric(text, "liedeploy_cache_evictions_total") > 0  # the cache held 2 of 20 tasks
    assert _metric(text, "liedeploy_resident_bytes") <= 2 * ONE_TASK_BYTES


def test_two_workers_share_the_cores_and_answer_right_under_eviction(farm):
    cores = len(os.sched_getaffinity(0))
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--cache-bytes", str(2 * ONE_TASK_BYTES), "--max-batch", "8",
            "--max-delay-ms", "2", "--workers", "2"]
    with ServerProcess(args) as srv:
        assert f"liedeploy serve: 2 workers x {max(1, cores // 2)} torch thread(s) on {cores} cores" in srv.lines
        errors, wrong = _many_clients(srv, farm, rounds=20)
        assert errors == [] and wrong == []
        text = _http(f"{srv.url}/metrics")[2].decode()
        assert _metric(text, "liedeploy_cache_evictions_total") > 0
    with ServerProcess(args + ["--threads", str(cores)]) as srv:  # more threads than cores: said at start
        assert any("more threads than cores" in line for line in srv.lines)


def test_workers_below_one_is_a_usage_error(capsys, tmp_path):
    from liedeploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tests.serving.models:net", "--weights", str(tmp_path / "w.safetensors"),
              "--adapters", str(tmp_path), "--workers", "0"])
    assert e.value.code == 2 and "--workers must be >= 1, got 0" in capsys.readouterr().err


def _metric(text, name, labels=None):
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    raise KeyError(name)


BAD = [
    # (description, body, headers, status, message)
    ("not json", b"{nope", {}, 400, "not valid JSON"),
    ("no inputs", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    ("wrong datatype", json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 3, 8, 8],
                                               "data": [0] * 192}]}).encode(), {}, 400, "has datatype 'INT64', the model takes FP32"),
    ("wrong shape", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 9, 8],
                                            "data": [0.0] * 216}]}).encode(), {}, 400, "has shape [1, 3, 9, 8]"),
    ("wrong count", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                            "data": [0.0] * 5}]}).encode(), {}, 400, "holds 5 values"),
    ("unknown input", json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0.0]}]}).encode(),
     {}, 400, "unknown input 'pixels'"),
    ("short binary", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                             "parameters": {"binary_data_size": 768}}]}).encode() + b"\0" * 10,
     "HL", 400, "needs 768 bytes of binary data"),
    ("bad header length", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, "is not a length"),
    ("negative shape", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8],
                                               "data": []}]}).encode(), {}, 400, "non-negative integers"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_400_never_500(server, farm, case):
    _, body, headers, status, msg = case
    if headers == "HL":
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    got, _, out = _http(f"{server.url}/v2/models/task1/infer", "POST", body, headers)
    assert got == status and msg in json.loads(out)["error"], out
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert _infer_json(server.url, "task1", x)[0] == 200  # the server keeps serving


def test_unknown_task_404_too_large_413(server):
    x = np.zeros((1, 3, 8, 8), np.float32)
    status, _, body = _infer_json(server.url, "nope", x)
    assert status == 404 and json.loads(body)["error"] == "unknown task 'nope'"
    big = np.zeros((64, 3, 8, 8), np.float32)  # ~50 KB of JSON text... and more in binary below
    status, _, body = _http(f"{server.url}/v2/models/task1/infer", "POST", b"x" * (65 * 1024))
    assert status == 413 and "over the limit of 65536 bytes" in json.loads(body)["error"]
    # a client announcing a huge body is refused before sending it whole
    import http.client

    conn = http.client.HTTPConnection(*server.hostport.split(":"), timeout=10)
    conn.putrequest("POST", "/v2/models/task1/infer")
    conn.putheader("Content-Length", str(10**10))
    conn.endheaders()
    conn.send(b"{" * 1000)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert _infer_json(server.url, "task1", big[:1])[0] == 200


def test_corrupt_and_foreign_adapters_are_unavailable_with_a_reason(server):
    c = httpclient.InferenceServerClient(server.hostport)
    for task, reason in (("broken", "it is a pickle file"), ("foreign", "differs from the one this adapter was trained on")):
        meta = c.get_model_metadata(task)
        assert meta["state"] == "UNAVAILABLE" and reason in meta["reason"]
        assert not c.is_model_ready(task)
        status, _, body = _infer_json(server.url, task, np.zeros((1, 3, 8, 8), np.float32))
        assert status == 503 and reason in json.loads(body)["error"]


def test_admin_auth(server, farm):
    c = httpclient.InferenceServerClient(server.hostport)
    with pytest.raises(InferenceServerException, match="Authorization: Bearer"):
        c.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="Authorization: Bearer"):
        c.get_model_repository_index(headers={"Authorization": "Bearer wrong"})
    status, _, _ = _http(f"{server.url}/v2/repository/index", "POST", b"{}", {"Authorization": "Bearer wrong"})
    assert status == 401
    index = c.get_model_repository_index(headers={"Authorization": "Bearer s3cret"})
    states = {r["name"]: r["state"] for r in index}
    assert states["task0"] == "READY" and states["base"] == "READY" and states["broken"] == "UNAVAILABLE"
    assert len(states) == N_TASKS + 3


def test_admin_without_token_configured_is_403(farm):
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8"]
    with ServerProcess(args) as srv:
        for path in ("/v2/repository/index", "/v2/repository/models/task1/load", "/v2/repository/models/task1/unload"):
            status, _, body = _http(srv.url + path, "POST", b"{}", {"Authorization": "Bearer s3cret"})
            assert status == 403 and "--admin-token-file" in json.loads(body)["error"]


def test_load_unload_while_traffic_runs(farm, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(farm["tasks"], f"task{i}.safetensors"), tasks)
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", str(tasks),
            "--input-shape", "1,3,8,8", "--admin-token-file", farm["token"]]
    auth = {"Authorization": "Bearer s3cret"}
    with ServerProcess(args) as srv:
        c = httpclient.InferenceServerClient(srv.hostport)
        x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
        stop, wrong, errors = threading.Event(), [], []

        def traffic():
            cc = httpclient.InferenceServerClient(srv.hostport)
            while not stop.is_set():
                for t in ("task0", "task1"):
                    inp = httpclient.InferInput("input", [1, 3, 8, 8], "FP32")
                    inp.set_data_from_numpy(x)
                    try:
                        got = cc.infer(t, [inp]).as_numpy("output")
                        if not np.allclose(got, _ref(farm, t, x), rtol=1e-5, atol=1e-6):
                            wrong.append(t)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(repr(exc))

        th = threading.Thread(target=traffic)
        th.start()
        try:
            with pytest.raises(InferenceServerException, match="unknown task 'task7'"):
                c.infer("task7", [_inp(x)])
            shutil.copy(os.path.join(farm["tasks"], "task7.safetensors"), tasks)
            c.load_model("task7", headers=auth)
            np.testing.assert_allclose(c.infer("task7", [_inp(x)]).as_numpy("output"), _ref(farm, "task7", x), rtol=1e-5, atol=1e-6)
            c.unload_model("task2", headers=auth)
            assert not c.is_model_ready("task2")
            with pytest.raises(InferenceServerException, match="unknown task 'task2'"):
                c.infer("task2", [_inp(x)])
            with pytest.raises(InferenceServerException, match="is not a task name"):
                c.load_model("..%2Fbase", headers=auth)
            with pytest.raises(InferenceServerException, match="no task file"):
                c.load_model("task9", headers=auth)
        finally:
            stop.set()
            th.join(30)
        assert errors == [] and wrong == []


def _inp(x):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_queue_full_is_503_with_retry_after_and_sigterm_drains(farm):
    args = ["--model", "tests.serving.models:slow", "--model-kwargs", '{"delay": "0.3"}', "--weights", farm["base"],
            "--adapters", farm["tasks"], "--input-shape", "1,3,8,8", "--max-queue", "2", "--max-batch", "1"]
    with ServerProcess(args) as srv:
        x = np.zeros((1, 3, 8, 8), np.float32)
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _infer_json(srv.url, "task1", x, ), range(8)))
        codes = sorted(r[0] for r in results)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        full = next(r for r in results if r[0] == 503)
        assert full[1].get("retry-after", full[1].get("Retry-After")) == "1"
        assert "queue is full" in json.loads(full[2])["error"]
        # drain: requests in flight finish, readiness turns 503, exit 0
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_infer_json, srv.url, "task1", x) for _ in range(2)]
            time.sleep(0.15)
            srv.proc.send_signal(__import__("signal").SIGTERM)
            time.sleep(0.05)
            ready = _http(f"{srv.url}/v2/health/ready")[0]
            done = [f.result(timeout=30)[0] for f in futs]
        assert ready == 503 and done == [200, 200]
        assert srv.proc.wait(30) == 0
        assert any("drained and stopped" in line for line in srv.lines)


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


def test_metrics_scrape_parses(server):
    status, headers, body = _http(f"{server.url}/metrics")
    assert status == 200
    text = body.decode()
    assert _metric(text, "liedeploy_registered_tasks") == N_TASKS
    # folds take the compiled CPU kernel here (a C compiler is part of this machine kind), said at start
    assert _metric(text, "liedeploy_fold_fused") == 1
    assert "liedeploy serve: folds: fused (the C fold kernel is built and checked)" in server.lines
    ok = _metric(text, "liedeploy_requests_total", {"outcome": "ok"})
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert _infer_json(server.url, "task0", x)[0] == 200
    assert _infer_json(server.url, "nope", x)[0] == 404
    text = _http(f"{server.url}/metrics")[2].decode()
    assert _metric(text, "liedeploy_requests_total", {"outcome": "ok"}) == ok + 1
    for name in ("liedeploy_request_seconds_count", "liedeploy_queue_seconds_count", "liedeploy_batch_size_count",
                 "liedeploy_folds_total", "liedeploy_fold_seconds_total", "liedeploy_cache_hits_total",
                 "liedeploy_cache_misses_total", "liedeploy_resident_tasks", "liedeploy_queue_depth"):
        _metric(text, name)


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
        text = _http(f"{srv.url}/metrics")[2].decode()
        assert _metric(text, "liedeploy_registered_tasks") == 1000
        assert _metric(text, "liedeploy_resident_tasks") == 0 and _metric(text, "liedeploy_folds_total") == 0
        x = np.zeros((1, 3, 8, 8), np.float32)
        assert _infer_json(srv.url, "t0999", x)[0] == 200
        assert _metric(_http(f"{srv.url}/metrics")[2].decode(), "liedeploy_folds_total") == 1
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
            got = c.infer(task, [_inp(x)]).as_numpy(out_name)
            np.testing.assert_allclose(got, _ref(farm, task, x), rtol=1e-4, atol=1e-5)
        with pytest.raises(InferenceServerException, match="unknown task 'task2'"):
            c.infer("task2", [_inp(x)])


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
