"""`liedeploy serve` under hostile clients and files: each fault of the round-2 probe, against a real
server process on loopback, every loop bounded in count and time, every server stopped."""

import concurrent.futures as cf
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.models import Tokens  # noqa: E402
from tests.serving.server_farm import base_and_tasks, infer_json, request  # noqa: E402
from tests.conftest import save_state_dict


def _post_json(url, payload, timeout=30):
    return request(url, "POST", json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout=timeout)


def _ids_request(ids):
    ids = np.asarray(ids, dtype=np.int64)
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "data": ids.reshape(-1).tolist()}]}


def _index(url, token):
    status, _, body = request(f"{url}/v2/repository/index", "POST", b"{}", {"Authorization": f"Bearer {token}"})
    assert status == 200
    return {r["name"]: r for r in json.loads(body)}


def _metric(url, line_start):
    _, _, body = request(f"{url}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    base, tasks, _ = base_and_tasks(d, 3, seed=10, prefix="t")
    tok = Tokens().eval()
    save_state_dict(tok, str(d / "tokens.safetensors"))
    ttasks = d / "ttasks"
    ttasks.mkdir()
    _write_adapter(tok, ttasks / "a.safetensors", ["fc"], std=0.3, seed=3)
    token = d / "token"
    token.write_text("s3cret\n")
    return {"dir": d, "base": str(d / "base.safetensors"), "tasks": str(tasks), "token": str(token), "model": base,
            "tokens": str(d / "tokens.safetensors"), "ttasks": str(ttasks), "tok": tok}


def _net_server(farm, *extra, adapters=None, model="tests.serving.models:net"):
    return ServerProcess(["--model", model, "--weights", farm["base"], "--adapters", adapters or farm["tasks"],
                          "--input-shape", "1,3,8,8", "--admin-token-file", farm["token"], *extra])


# 1. one request poisons its batch -------------------------------------------------------------
def test_out_of_range_token_ids_are_400_and_the_batch_is_served(farm):
    args = ["--model", "tests.serving.models:tokens", "--weights", farm["tokens"], "--adapters", farm["ttasks"],
            "--input", "input_ids:INT64:-1,8", "--max-batch", "16", "--max-delay-ms", "50"]
    with ServerProcess(args) as srv:
        good = np.arange(16, dtype=np.int64).reshape(2, 8)
        with torch.no_grad():
            want = farm["tok"](torch.from_numpy(good)).numpy()
        bad = [1000000, -1, 2**63 - 1, 100]
        jobs = [("good", good)] * 6 + [("bad", np.full((1, 8), v, dtype=np.int64)) for v in bad]
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            results = list(ex.map(lambda j: (j[0], _post_json(f"{srv.url}/v2/models/base/infer", _ids_request(j[1]))),
                                  jobs))
        for kind, (status, _, body) in results:
            if kind == "good":
                assert status == 200, body
                got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(2, 4)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                assert status == 400 and b"outside [0, 100)" in body, body


def test_a_model_fault_on_one_request_fails_only_that_request(farm):
    with _net_server(farm, "--max-batch", "16", "--max-delay-ms", "100", model="tests.serving.models:picky") as srv:
        x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
        with torch.no_grad():
            want = farm["model"](torch.from_numpy(x)).numpy()
        jobs = ["good"] * 5 + ["bad"] + ["good"] * 2
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            results = list(ex.map(lambda k: (k, infer_json(srv.url, "base", x if k == "good" else x * 0 + 1e7)), jobs))
        for kind, (status, _, body) in results:
            if kind == "good":
                assert status == 200, body
                np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(1, 5), want,
                                           rtol=1e-5, atol=1e-6)
            else:
                assert status == 400 and b"input out of the range this model was trained on" in body, body
        assert _metric(srv.url, 'liedeploy_requests_total{outcome="error"}') == 0


# 2. idle and slow connections -------------------------------------------------------------------
def test_idle_half_header_connections_never_lock_a_normal_client_out(farm):
    with _net_server(farm, "--max-connections", "8", "--header-timeout", "30") as srv:
        host, port = srv.hostport.split(":")
        socks = []
        try:
            for _ in range(20):  # more than the cap, all stuck in their request head
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"POST /v2/models/base/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
                socks.append(s)
            t0 = time.monotonic()
            status, _, _ = request(f"{srv.url}/v2/health/ready", timeout=10)
            assert status == 200 and time.monotonic() - t0 < 5
        finally:
            for s in socks:
                s.close()


def test_a_half_sent_head_is_cut_off_at_the_header_timeout(farm):
    with _net_server(farm, "--header-timeout", "1") as srv:
        host, port = srv.hostport.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the server
            assert time.monotonic() - t0 < 8


# 3. decoding off the event loop, bytes in flight --------------------------------------------------
def test_health_stays_fast_while_a_large_bad_body_is_refused(farm):
    with _net_server(farm, "--max-body", "64MiB") as srv:
        n = 5 * 1000 * 1000  # ~ 60 MB of JSON numbers with the wrong datatype (the default --max-body)
        body = (b'{"inputs":[{"name":"input","datatype":"FP64","shape":[1,3,8,8],"data":['
                + b",".join([b"0.123456789"] * n) + b"]}]}")
        result = {}

        def send():
            result["r"] = request(f"{srv.url}/v2/models/base/infer", "POST", body, {"Content-Type": "application/json"},
                                timeout=60)

        th = threading.Thread(target=send)
        th.start()
        lat = []
        try:
            while th.is_alive() and len(lat) < 400:
                t0 = time.monotonic()
                assert request(f"{srv.url}/v2/health/live", timeout=10)[0] == 200
                lat.append(time.monotonic() - t0)
                time.sleep(0.01)
        finally:
            th.join(60)
        assert result["r"][0] == 400 and b"datatype" in result["r"][2]
        assert lat and max(lat) < 0.25, max(lat)  # target 50 ms; the bound leaves room for a busy CI machine


def test_bytes_in_flight_are_bounded(farm):
    with _net_server(farm, "--max-body", "1MiB", "--max-inflight-bytes", "1MiB") as srv:
        host, port = srv.hostport.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/base/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 900000\r\n\r\n" + b" " * 1000)
            time.sleep(0.5)  # the first body is being read: 900000 bytes reserved
            with socket.create_connection((host, int(port)), timeout=10) as t:
                t.sendall(b"POST /v2/models/base/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 900000\r\n\r\n")
                try:  # the server may answer and close before the whole body is sent
                    t.sendall(b" " * 900000)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                answer = b""
                while b"\r\n\r\n" not in answer or b"bound" not in answer:
                    chunk = t.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 503") and b"retry-after" in head and b"bound" in answer, answer[:300]


# 4. admin load after traffic -----------------------------------------------------------------------
def test_admin_loads_after_traffic_with_a_small_cache(farm):
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    with _net_server(farm, "--cache-bytes", str(one_task)) as srv:
        x = np.zeros((1, 3, 8, 8), np.float32)
        auth = {"Authorization": "Bearer s3cret"}
        for i in range(6):
            assert infer_json(srv.url, f"t{i % 3}", x)[0] == 200
            status, _, body = request(f"{srv.url}/v2/repository/models/t{(i + 1) % 3}/load", "POST", b"{}", auth)
            assert status == 200, body


def test_bank_folds_again_after_an_eviction_under_inference_mode(farm):
    import copy

    from liedeploy import AdapterBank

    bank = AdapterBank(copy.deepcopy(farm["model"]), adapters={f"t{i}": os.path.join(farm["tasks"], f"t{i}.safetensors")
                                                              for i in range(2)})
    x = torch.zeros(1, 3, 8, 8)
    with torch.inference_mode():
        bank(x, task="t0")
    bank.remove("t0")
    bank.prefetch("t1")  # outside inference mode, into storage an inference-mode fold left
    torch.testing.assert_close(bank(x, task="t1"), bank.model_for("t1")(x))


# 6, 7. files in the adapters folder -----------------------------------------------------------------
def test_odd_entries_and_unusable_heads_are_unavailable_and_start_up_goes_on(farm, tmp_path):
    import shutil

    folder = tmp_path / "tasks"
    shutil.copytree(farm["tasks"], folder)
    (folder / "dangling.safetensors").symlink_to(tmp_path / "missing.safetensors")
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    for odd in ("a b", "é", "v1:a"):
        shutil.copy(folder / "t0.safetensors", folder / f"{odd}.safetensors")
    import copy

    head = copy.deepcopy(farm["model"])
    head.fc = torch.nn.Linear(5, 2)  # a [2, 5] weight: the base's fc takes 8 inputs
    _write_adapter(head, folder / "badhead.safetensors", ["conv"], modules_to_save=["fc"])
    with _net_server(farm, adapters=str(folder)) as srv:
        idx = _index(srv.url, "s3cret")
        for t in ("t0", "t1", "t2"):
            assert idx[t]["state"] == "READY"
        for t in ("dangling", "loop", "a b", "é", "v1:a", "badhead"):
            assert idx[t]["state"] == "UNAVAILABLE" and idx[t]["reason"], t
        assert "has shape [2, 5] but the base's module takes [5, 8]" in idx["badhead"]["reason"]
        x = np.zeros((1, 3, 8, 8), np.float32)
        status, _, body = infer_json(srv.url, "badhead", x)
        assert status == 503 and b"badhead" in body
        assert infer_json(srv.url, "t1", x)[0] == 200


# 9. unload mid-traffic leaves no ghost; errors never enumerate tasks ---------------------------------
def test_unload_during_traffic_leaves_no_ghost_and_errors_name_no_other_task(farm):
    with _net_server(farm, "--max-delay-ms", "5") as srv:
        x = np.zeros((2, 3, 8, 8), np.float32)
        stop = threading.Event()
        statuses = []

        def traffic():
            for _ in range(300):
                if stop.is_set():
                    break
                statuses.append(infer_json(srv.url, "t1", x)[0])

        th = threading.Thread(target=traffic)
        th.start()
        try:
            time.sleep(0.3)
            assert request(f"{srv.url}/v2/repository/models/t1/unload", "POST", b"{}",
                         {"Authorization": "Bearer s3cret"})[0] == 200
            time.sleep(0.3)
        finally:
            stop.set()
            th.join(60)
        assert set(statuses) <= {200, 404}, set(statuses)
        assert "t1" not in _index(srv.url, "s3cret")
        status, _, body = infer_json(srv.url, "t1", x)
        assert status == 404 and b"t0" not in body and b"t2" not in body


# 10. admin token file --------------------------------------------------------------------------------
def test_a_fifo_admin_token_file_is_refused_at_once(farm, tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    from tests.serving.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "serve", "--port", "0", "--model",
                           "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
                           "--input-shape", "1,3,8,8", "--admin-token-file", str(fifo)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and "is a FIFO, not a regular file" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


# 11. a client that hangs up mid-body ---------------------------------------------------------------
def test_a_client_hanging_up_mid_body_is_a_client_abort(farm):
    with _net_server(farm) as srv:
        host, port = srv.hostport.split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"POST /v2/models/base/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 5000\r\n\r\n{\"inputs\": [")
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _metric(srv.url, 'liedeploy_requests_total{outcome="client_abort"}') < 3:
            time.sleep(0.1)
        assert _metric(srv.url, 'liedeploy_requests_total{outcome="client_abort"}') == 3
        assert _metric(srv.url, 'liedeploy_requests_total{outcome="error"}') == 0


# 15. a task file replaced on disk -------------------------------------------------------------------
def test_a_replaced_task_file_is_unavailable_until_loaded_again(farm, tmp_path):
    import shutil

    folder = tmp_path / "tasks"
    shutil.copytree(farm["tasks"], folder)
    with _net_server(farm, "--cache-bytes", "1", adapters=str(folder)) as srv:  # every fold reads the file
        x = np.zeros((1, 3, 8, 8), np.float32)
        assert infer_json(srv.url, "t0", x)[0] == 200
        _write_adapter(farm["model"], folder / "new.safetensors", ["conv", "fc"], std=0.3, seed=99)
        os.replace(folder / "new.safetensors", folder / "t0.safetensors")
        status, _, body = infer_json(srv.url, "t0", x)
        assert status == 503 and b"replaced or changed since it was registered" in body
        assert request(f"{srv.url}/v2/repository/models/t0/load", "POST", b"{}", {"Authorization": "Bearer s3cret"})[0] == 200
        assert infer_json(srv.url, "t0", x)[0] == 200


# newcomer edges ----------------------------------------------------------------------------------
def test_start_up_reports_the_default_cache_bound_and_the_limits(farm):
    with _net_server(farm) as srv:
        line = next(ln for ln in srv.lines if "limits:" in ln)
        assert "(default: a quarter of available memory)" in line and "512 connections" in line


def test_draining_says_so_without_naming_replicas(farm):
    with _net_server(farm, model="tests.serving.models:slow") as srv:
        x = np.zeros((1, 3, 8, 8), np.float32)
        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(infer_json, srv.url, "t0", x) for _ in range(4)]
            time.sleep(0.3)
            srv.proc.send_signal(15)
            time.sleep(0.05)
            try:
                status, _, body = infer_json(srv.url, "t0", x, )
            except OSError:
                status, body = None, b""
            [f.result() for f in futs]
        if status == 503:
            assert b"the server is draining" in body and b"replica" not in body
        assert srv.proc.wait(30) == 0


# 5, 8. --backend ort: one bad file makes one task unavailable ------------------------------------------
@pytest.mark.slow
def test_ort_backend_bad_files_make_one_task_unavailable(farm, tmp_path):
    pytest.importorskip("onnxruntime")
    import copy

    import onnx

    from liedeploy.exporters.task_models import export_task_models

    out = tmp_path / "export"
    paths = [os.path.join(farm["tasks"], "t1.safetensors")]
    export_task_models(copy.deepcopy(farm["model"]), torch.randn(2, 3, 8, 8), str(out), paths, dynamic_batch=True)
    (out / "x.onnx").write_bytes(os.urandom(4096))
    os.mkfifo(out / "fifo.onnx")
    (out / "zero.onnx").symlink_to("/dev/zero")
    proto = onnx.load(str(out / "t1.onnx"))  # its weights moved to a file outside the folder
    onnx.save_model(proto, str(tmp_path / "escape.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="outside.data", size_threshold=0)
    proto = onnx.load(str(tmp_path / "escape.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save(proto, str(out / "escape.onnx"))
    with ServerProcess(["--backend", "ort", "--adapters", str(out), "--admin-token-file", farm["token"]],
                       timeout=60) as srv:
        idx = _index(srv.url, "s3cret")
        assert idx["t1"]["state"] == "READY"
        for t in ("x", "fifo", "zero", "escape"):
            assert idx[t]["state"] == "UNAVAILABLE", t
        assert "outside the graph's folder" in idx["escape"]["reason"]
        assert "FIFO" in idx["fifo"]["reason"] and "not an ONNX model" in idx["x"]["reason"]
        x = np.zeros((1, 3, 8, 8), np.float32)
        assert infer_json(srv.url, "t1", x)[0] == 200
        status, _, body = infer_json(srv.url, "escape", x)
        assert status == 503
