"""`liedeploy serve --processes 2`: batches in worker processes (torch on CPU) give the same answers,
registry changes reach every process, a worker process that dies is started again, and the server
stops its worker processes when it stops."""

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.server_farm import infer_json, metric, ref, request  # noqa: E402
from tests.serving.server_farm import farm  # noqa: E402,F401  (fixture, used by name)

AUTH = {"Authorization": "Bearer s3cret"}


def _children(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _workers(pid):
    """The server's worker processes (its children running liedeploy's worker loop)."""
    found = []
    for c in _children(pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            found.append(c)
    return found


def _infer_ok(url, farm, task, x, deadline):
    """Infer until a 200 (a 503 with Retry-After while a worker process starts again); its output."""
    while True:
        status, headers, body = infer_json(url, task, x)
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503 and "retry-after" in {k.lower() for k in headers}, (status, body)
        time.sleep(0.2)
    assert status == 200, body
    import json

    got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(1, -1)
    np.testing.assert_allclose(got, ref(farm, task, x).reshape(1, -1), rtol=1e-4, atol=1e-5)


def test_worker_processes_answer_like_one_process_and_are_restarted(farm):
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--processes", "2", "--max-batch", "4", "--max-delay-ms", "2",
            "--admin-token-file", farm["token"]]
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with ServerProcess(args) as srv:
        assert any("2 worker processes x 1 torch thread(s)" in line for line in srv.lines), srv.lines
        workers = _workers(srv.proc.pid)
        assert len(workers) == 2
        deadline = time.monotonic() + 60
        for task in ("task0", "task1", "task2", "task3", "base"):
            _infer_ok(srv.url, farm, task, x, deadline)
        text = request(f"{srv.url}/metrics")[2].decode()
        assert metric(text, "liedeploy_worker_processes") == 2
        import json

        index = json.loads(request(f"{srv.url}/v2/repository/index", "POST", b"{}", AUTH)[2])
        ready = [r["name"] for r in index if r["state"] == "READY" and r["name"] != "base"]
        assert metric(text, "liedeploy_registered_tasks") == len(ready) >= 18
        assert metric(text, "liedeploy_folds_total") >= 4

        # unload and load reach every worker process
        assert request(f"{srv.url}/v2/repository/models/task1/unload", "POST", b"{}", AUTH)[0] == 200
        for _ in range(4):
            status, _, body = infer_json(srv.url, "task1", x)
            assert status == 404 and b"unknown task 'task1'" in body
        assert request(f"{srv.url}/v2/repository/models/task1/load", "POST", b"{}", AUTH)[0] == 200
        for _ in range(4):
            _infer_ok(srv.url, farm, "task1", x, deadline)

        # a worker process killed: its batch worker starts it again; requests are answered throughout
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 90
        for i in range(40):
            _infer_ok(srv.url, farm, f"task{i % 6}", x, deadline)
        while time.monotonic() < deadline:
            text = request(f"{srv.url}/metrics")[2].decode()
            if metric(text, "liedeploy_worker_restarts_total") >= 1:
                break
            _infer_ok(srv.url, farm, "task0", x, deadline)
        assert metric(text, "liedeploy_worker_restarts_total") >= 1
        assert len(_workers(srv.proc.pid)) == 2
        assert srv.terminate() == 0
        for pid in workers[1:]:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.mark.parametrize("extra, message", [
    (["--workers", "2"], "not both"),
    (["--device", "cuda"], "torch backend on CPU"),
    (["--fold-ahead", "4"], "--fold-ahead needs one process"),
    (["--backend", "ort"], "torch backend on CPU"),
])
def test_processes_refuse_what_they_cannot_run(farm, extra, message):
    import subprocess
    import sys

    from tests.serving.helpers import ROOT

    args = ["serve", "--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--processes", "2", *extra]
    r = subprocess.run([sys.executable, "-m", "liedeploy.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_task_no_process_holds_goes_to_the_process_holding_the_fewest():
    """ProcessBackend.takes, without starting processes: the rule that fills the split caches evenly."""
    import threading

    from liedeploy.serving.backends.processes import ProcessBackend

    class W:
        def __init__(self, resident=(), incoming=()):
            self.resident, self.incoming = frozenset(resident), set(incoming)

    b = object.__new__(ProcessBackend)
    b.processes, b._local = 2, threading.local()
    b._workers = [W({"a", "b"}), W({"c"}, incoming={"d"})]
    b.bind_worker(0)
    assert b.takes("a") and not b.takes("c") and not b.takes("d")  # held here / held or folding elsewhere
    assert b.takes(None)  # the base runs anywhere
    assert b.takes("e")  # cold: 2 tasks here, 2 there (one of them on the way): a tie takes it
    b.bind_worker(1)
    assert b.takes("d") and b.takes("e") and not b.takes("a")
    b._workers[1].incoming.add("f")
    b.bind_worker(0)
    assert b.takes("e")  # 2 here against 3 there
    b.bind_worker(1)
    assert not b.takes("e")  # 3 here against 2: process 0 takes it


def test_a_worker_process_that_cannot_build_the_model_stops_the_start_in_one_line(farm, tmp_path):
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from tests.serving.helpers import ROOT

    wrong = tmp_path / "wrong.safetensors"
    save_file({"other.weight": torch.zeros(2, 2)}, str(wrong))
    args = ["serve", "--model", "tests.serving.models:net", "--weights", str(wrong), "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--port", "0", "--processes", "2"]
    r = subprocess.run([sys.executable, "-m", "liedeploy.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "wrong.safetensors: missing key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
