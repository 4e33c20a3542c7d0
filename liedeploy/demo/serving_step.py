"""The demo's last step: serve every task over HTTP and check the answers with the real client.

Starts the server in this process on a free loopback port (uvicorn in a thread), sends each demo
task a few test images with ``tritonclient.http`` (binary tensors), checks the logits equal the
in-process AdapterBank's, and stops the server.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable

import numpy as np

from liedeploy.errors import require

__all__ = ["run_demo_serve"]


def run_demo_serve(summary: dict, out_dir: str, seed: int = 0, images: int = 8,
                   log: Callable[[str], None] = print) -> dict:
    """Serve the demo's tasks, query them over HTTP, compare with in-process outputs; returns a report."""
    httpclient = require("tritonclient.http", "demo", "the demo's serving step")
    uvicorn = require("uvicorn", "serve", "liedeploy serve")
    import torch
    from safetensors.torch import load_file

    from liedeploy.bank.adapter_bank import AdapterBank
    from liedeploy.demo.pipeline import TASKS, DigitsNet, load_digits_tensors, task_labels
    from liedeploy.serving.app import create_app
    from liedeploy.serving.state import ServingState
    from liedeploy.serving.backends.torch import TorchBackend
    from liedeploy.serving.specs import default_input

    t0 = time.perf_counter()
    folder = os.path.join(out_dir, "serve_tasks")  # adapter files only: each file is a task
    os.makedirs(folder, exist_ok=True)
    for r in summary["tasks"]:
        link = os.path.join(folder, f"{r['task']}.safetensors")
        if os.path.lexists(link):
            os.unlink(link)
        os.link(r["adapter_file"], link)
    base = DigitsNet()
    base.load_state_dict(load_file(summary["base_file"]))
    base.eval()
    state = ServingState(TorchBackend(base, [default_input((1, 1, 8, 8))]), folder,
                         batching={"max_batch": 16, "max_delay": 0.002})
    state.scan()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    xte, yte = x[perm][: len(x) // 4][:images], y[perm][: len(x) // 4][:images]
    ref_base = DigitsNet()
    ref_base.load_state_dict(load_file(summary["base_file"]))
    reference = AdapterBank(ref_base.eval(), adapters={r["task"]: r["adapter_file"] for r in summary["tasks"]})
    rows = []
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=10, network_timeout=10)
        deadline = time.monotonic() + 10
        while not client.is_server_ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the demo server did not become ready in 10 s")
            time.sleep(0.02)
        for r in summary["tasks"]:
            imgs = TASKS[r["task"]](xte).numpy().astype(np.float32)
            inp = httpclient.InferInput("input", list(imgs.shape), "FP32")
            inp.set_data_from_numpy(imgs, binary_data=True)
            got = client.infer(r["task"], [inp]).as_numpy("output")
            with torch.no_grad():
                want = reference(torch.from_numpy(imgs), task=r["task"]).numpy()
            err = float(np.abs(got - want).max())
            correct = int((got.argmax(-1) == task_labels(r["task"], yte).numpy()).sum())
            rows.append({"task": r["task"], "images": len(imgs), "correct": correct, "max_abs_vs_in_process": err})
    finally:
        server.should_exit = True
        thread.join(10)
        state.batcher.close()
        sock.close()
    ok = all(row["max_abs_vs_in_process"] <= 1e-5 for row in rows)
    log("")
    log(f"{'task':<10} {'served over HTTP':>17} {'max |HTTP - in-process|':>24}")
    for row in rows:
        log(f"{row['task']:<10} {row['correct']:>10}/{row['images']:<6} {row['max_abs_vs_in_process']:>24.2e}")
    seconds = time.perf_counter() - t0
    log(f"(liedeploy serve's app on 127.0.0.1:{port}, queried with tritonclient.http, binary tensors; "
        f"{'answers equal the in-process bank' if ok else 'ANSWERS DIFFER from the in-process bank'}; {seconds:.1f} s)")
    if not ok:
        raise RuntimeError("the served answers differ from the in-process ones")
    return {"ok": ok, "port": port, "seconds": round(seconds, 2), "tasks": rows}
