"""The Ray Serve application: same HTTP API, tasks multiplexed over 2 replicas, faults survived.

A local Ray instance (num_cpus=2, no dashboard) on loopback; every test is bounded in time and the
module shuts Ray down at the end, also when a test fails.
"""

import concurrent.futures as cf
import json
import socket
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpclient = pytest.importorskip("tritonclient.http")

from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.server_farm import base_and_tasks  # noqa: E402

pytestmark = pytest.mark.slow
N_TASKS = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from liedeploy.serving.ray import build_app

    d = tmp_path_factory.mktemp("ray")
    base, tasks, refs = base_and_tasks(d, N_TASKS, seed=200)
    bad = _write_adapter(base, tasks / "nan.safetensors", ["conv"], seed=1)  # a valid header, NaN factors
    _nan_factors(bad)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="liedeploy-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": "tests.serving.models:slow", "model_kwargs": json.dumps({"delay": "0.01"}),
                         "weights": str(d / "base.safetensors"), "adapters": str(tasks), "input_shape": "1,3,8,8",
                         "num_replicas": "2", "max_tasks_per_replica": "6", "replica_num_cpus": "0.5",
                         "max_ongoing_requests": "2", "request_timeout": "30"})
        serve.run(app, name="liedeploy", route_prefix="/")
        yield {"url": f"127.0.0.1:{port}", "refs": refs, "tasks": str(tasks)}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _nan_factors(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    for k in t:
        if k.endswith("lie_B"):
            t[k][0, 0] = float("nan")
    save_file(t, path, metadata=meta)


def _infer(c, task, x):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    r = c.infer(task, [inp])
    return r.as_numpy("output")


def _ref(cluster, task, x):
    with torch.no_grad():
        return cluster["refs"][task](torch.from_numpy(x)).numpy()


def test_two_replicas_serve_20_tasks_correctly(cluster):
    c = httpclient.InferenceServerClient(cluster["url"], network_timeout=60)
    assert c.is_server_ready()
    rng = np.random.default_rng(0)
    for task in ["base"] + [f"task{i}" for i in range(N_TASKS)]:
        x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_infer(c, task, x), _ref(cluster, task, x), rtol=1e-5, atol=1e-6)
    for binary in (False,):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        inp = httpclient.InferInput("input", [1, 3, 8, 8], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        got = c.infer("task3", [inp], outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)])
        np.testing.assert_allclose(got.as_numpy("output"), _ref(cluster, "task3", x), rtol=1e-5, atol=1e-6)


def _replica_of(url, task, x):
    import urllib.request

    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/{task}/infer", data=head + x.tobytes(), method="POST",
                                 headers={"Inference-Header-Content-Length": str(len(head))})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers["liedeploy-replica"]


def test_affinity_and_fallback(cluster):
    x = np.zeros((1, 3, 8, 8), np.float32)
    for task in ("task5", "task6", "task7"):
        _replica_of(cluster["url"], task, x)  # folds it somewhere
    time.sleep(2.0)  # replicas report what they hold to Ray's routers (pushed every 0.1 s, then broadcast)
    for task in ("task5", "task6", "task7"):
        first = _replica_of(cluster["url"], task, x)
        assert all(_replica_of(cluster["url"], task, x) == first for _ in range(6)), task  # stays where it is folded
    # a burst for one task: its replica is busy (max_ongoing_requests=2), so Ray falls back to the other
    with cf.ThreadPoolExecutor(12) as pool:
        seen = set(pool.map(lambda i: _replica_of(cluster["url"], "task8", np.full((1, 3, 8, 8), float(i), np.float32)),
                            range(48)))
    assert len(seen) == 2


def test_corrupt_adapter_unavailable_with_the_same_reason(cluster):
    c = httpclient.InferenceServerClient(cluster["url"], network_timeout=60)
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(Exception, match="non-finite values"):
        _infer(c, "nan", x)
    for _ in range(3):  # every later request, whichever replica it would reach, gives the same reason
        meta = c.get_model_metadata("nan")
        assert meta["state"] == "UNAVAILABLE" and "holds non-finite values" in meta["reason"]
        with pytest.raises(Exception, match="unavailable: .*holds non-finite values"):
            _infer(c, "nan", x)
    np.testing.assert_allclose(_infer(c, "task1", x), _ref(cluster, "task1", x), rtol=1e-5, atol=1e-6)


def test_metrics_through_the_ingress(cluster):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{cluster['url']}/metrics", timeout=30).read().decode()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert {"liedeploy_requests_total", "liedeploy_folds_total", "liedeploy_registered_tasks"} <= names


def test_replica_killed_mid_load_no_wrong_answers(cluster):
    c_url = cluster["url"]
    rng = np.random.default_rng(9)
    xs = {t: rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for t in cluster["refs"]}
    want = {t: _ref(cluster, t, xs[t]) for t in xs}
    tasks = [f"task{i}" for i in range(10)]
    results = []

    def client(seed):
        c = httpclient.InferenceServerClient(c_url, network_timeout=60)
        r = np.random.default_rng(seed)
        for _ in range(25):
            t = tasks[r.integers(len(tasks))]
            try:
                got = _infer(c, t, xs[t])
                results.append("ok" if np.allclose(got, want[t], rtol=1e-5, atol=1e-6) else "WRONG")
            except Exception as exc:  # noqa: BLE001
                results.append("503" if "503" in str(exc) or "retry" in str(exc) else f"error: {exc}")

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "TaskReplica" in a["name"]]
    assert len(names) == 2
    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(client, s) for s in range(6)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        for f in futs:
            f.result(timeout=180)
    assert "WRONG" not in results
    assert all(r in ("ok", "503") for r in results), [r for r in results if r not in ("ok", "503")][:3]
    assert results.count("ok") >= len(results) // 2
    # after the restart, traffic is served (both replicas up again)
    deadline = time.time() + 90
    while time.time() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "TaskReplica" in a["name"]]
        if len(names) == 2:
            break
        time.sleep(0.5)
    c = httpclient.InferenceServerClient(c_url, network_timeout=60)
    for t in tasks:
        np.testing.assert_allclose(_infer(c, t, xs[t]), want[t], rtol=1e-5, atol=1e-6)
