"""`liedeploy serve` under bad input and operations: refused requests, unusable adapters, the admin
API and its token, loading and unloading under traffic, a full queue and draining, metrics."""

import concurrent.futures as cf
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.server_farm import N_TASKS, request, infer_json, metric, ref, triton_input  # noqa: E402
from tests.serving.server_farm import farm, server  # noqa: E402,F401  (fixtures, used by name)


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
    got, _, out = request(f"{server.url}/v2/models/task1/infer", "POST", body, headers)
    assert got == status and msg in json.loads(out)["error"], out
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert infer_json(server.url, "task1", x)[0] == 200  # the server keeps serving


def test_unknown_task_404_too_large_413(server):
    x = np.zeros((1, 3, 8, 8), np.float32)
    status, _, body = infer_json(server.url, "nope", x)
    assert status == 404 and json.loads(body)["error"] == "unknown task 'nope'"
    big = np.zeros((64, 3, 8, 8), np.float32)  # ~50 KB of JSON text... and more in binary below
    status, _, body = request(f"{server.url}/v2/models/task1/infer", "POST", b"x" * (65 * 1024))
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
    assert infer_json(server.url, "task1", big[:1])[0] == 200


def test_corrupt_and_foreign_adapters_are_unavailable_with_a_reason(server):
    c = httpclient.InferenceServerClient(server.hostport)
    for task, reason in (("broken", "it is a pickle file"), ("foreign", "differs from the one this adapter was trained on")):
        meta = c.get_model_metadata(task)
        assert meta["state"] == "UNAVAILABLE" and reason in meta["reason"]
        assert not c.is_model_ready(task)
        status, _, body = infer_json(server.url, task, np.zeros((1, 3, 8, 8), np.float32))
        assert status == 503 and reason in json.loads(body)["error"]


def test_admin_auth(server, farm):
    c = httpclient.InferenceServerClient(server.hostport)
    with pytest.raises(InferenceServerException, match="Authorization: Bearer"):
        c.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="Authorization: Bearer"):
        c.get_model_repository_index(headers={"Authorization": "Bearer wrong"})
    status, _, _ = request(f"{server.url}/v2/repository/index", "POST", b"{}", {"Authorization": "Bearer wrong"})
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
            status, _, body = request(srv.url + path, "POST", b"{}", {"Authorization": "Bearer s3cret"})
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
                        if not np.allclose(got, ref(farm, t, x), rtol=1e-5, atol=1e-6):
                            wrong.append(t)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(repr(exc))

        th = threading.Thread(target=traffic)
        th.start()
        try:
            with pytest.raises(InferenceServerException, match="unknown task 'task7'"):
                c.infer("task7", [triton_input(x)])
            shutil.copy(os.path.join(farm["tasks"], "task7.safetensors"), tasks)
            c.load_model("task7", headers=auth)
            np.testing.assert_allclose(c.infer("task7", [triton_input(x)]).as_numpy("output"), ref(farm, "task7", x), rtol=1e-5, atol=1e-6)
            c.unload_model("task2", headers=auth)
            assert not c.is_model_ready("task2")
            with pytest.raises(InferenceServerException, match="unknown task 'task2'"):
                c.infer("task2", [triton_input(x)])
            with pytest.raises(InferenceServerException, match="is not a task name"):
                c.load_model("..%2Fbase", headers=auth)
            with pytest.raises(InferenceServerException, match="no task file"):
                c.load_model("task9", headers=auth)
        finally:
            stop.set()
            th.join(30)
        assert errors == [] and wrong == []


def test_queue_full_is_503_with_retry_after_and_sigterm_drains(farm):
    args = ["--model", "tests.serving.models:slow", "--model-kwargs", '{"delay": "0.3"}', "--weights", farm["base"],
            "--adapters", farm["tasks"], "--input-shape", "1,3,8,8", "--max-queue", "2", "--max-batch", "1"]
    with ServerProcess(args) as srv:
        x = np.zeros((1, 3, 8, 8), np.float32)
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: infer_json(srv.url, "task1", x, ), range(8)))
        codes = sorted(r[0] for r in results)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        full = next(r for r in results if r[0] == 503)
        assert full[1].get("retry-after", full[1].get("Retry-After")) == "1"
        assert "queue is full" in json.loads(full[2])["error"]
        # drain: requests in flight finish, readiness turns 503, exit 0
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(infer_json, srv.url, "task1", x) for _ in range(2)]
            time.sleep(0.15)
            srv.proc.send_signal(__import__("signal").SIGTERM)
            time.sleep(0.05)
            ready = request(f"{srv.url}/v2/health/ready")[0]
            done = [f.result(timeout=30)[0] for f in futs]
        assert ready == 503 and done == [200, 200]
        assert srv.proc.wait(30) == 0
        assert any("drained and stopped" in line for line in srv.lines)


def test_metrics_scrape_parses(server):
    status, headers, body = request(f"{server.url}/metrics")
    assert status == 200
    text = body.decode()
    assert metric(text, "liedeploy_registered_tasks") == N_TASKS
    # folds take the compiled CPU kernel here (a C compiler is part of this machine kind), said at start
    assert metric(text, "liedeploy_fold_fused") == 1
    assert "liedeploy serve: folds: fused (the C fold kernel is built and checked)" in server.lines
    # the tasks' Conv2d weights are folded into oneDNN's blocked layout (this machine's torch has oneDNN)
    assert metric(text, "liedeploy_packed_convs") == 1
    assert ("liedeploy serve: conv weights: 1 of 1 Conv2d layers folded into oneDNN's blocked layout (batches 1-8); "
            "inputs channels-last; fused graph: 1 packed convolutions, 0 with their batch norm folded in, 0 with a "
            "residual add and 1 with a ReLU done by oneDNN") in server.lines
    ok = metric(text, "liedeploy_requests_total", {"outcome": "ok"})
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert infer_json(server.url, "task0", x)[0] == 200
    assert infer_json(server.url, "nope", x)[0] == 404
    text = request(f"{server.url}/metrics")[2].decode()
    assert metric(text, "liedeploy_requests_total", {"outcome": "ok"}) == ok + 1
    for name in ("liedeploy_request_seconds_count", "liedeploy_queue_seconds_count", "liedeploy_batch_size_count",
                 "liedeploy_folds_total", "liedeploy_fold_seconds_total", "liedeploy_cache_hits_total",
                 "liedeploy_cache_misses_total", "liedeploy_resident_tasks", "liedeploy_queue_depth"):
        metric(text, name)
