"""The Ray part of bench_serve.py (``--ray``): 2 replicas against the single-process server, same workload.

Also the folds per task across replicas with and without affinity (multiplexed routing).
Ray runs as a local instance (num_cpus=2, no dashboard) on loopback and is shut down at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metric(url, name):
    import re

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def run_ray(setup, sizes, duration, _load_unused=None) -> dict:
    import ray
    from ray import serve

    from liedeploy.serving.ray import build_app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    results = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for label, n, zipf, affinity in (("ray 2 replicas: 10 tasks uniform", 10, 0.0, True),
                                         ("ray 2 replicas: 1000 tasks Zipf(1.1), affinity", 1000, 1.1, True),
                                         ("ray 2 replicas: 1000 tasks Zipf(1.1), no affinity", 1000, 1.1, False)):
            app = build_app({"model": "benchmarks.serve_models:resnet18", "weights": setup["base"],
                             "adapters": sizes[n]["dir"], "input_shape": "1,3,64,64", "num_replicas": "2",
                             "max_tasks_per_replica": "6", "cache_bytes": str(300 * 10**6), "replica_num_cpus": "0.5",
                             "max_batch": "16", "max_delay_ms": "4", "threads": "1", "affinity": str(affinity),
                             "max_queue": "4096"})
            serve.run(app, name="liedeploy", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "_serve_load.py"), "--host", "127.0.0.1", "--port",
                   str(port), "--spec", sizes[n]["spec"], "--clients", "32", "--duration", str(duration), "--zipf", str(zipf)]
            t0 = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 300, env=dict(os.environ, PYTHONPATH=ROOT))
            res = json.loads(out.stdout)
            res["wall_s"] = time.monotonic() - t0
            res["folds"] = _metric(url, "liedeploy_folds_total")
            res["folds_per_task_touched"] = res["folds"] / max(res["tasks_touched"], 1)
            results[label] = res
            print(f"{label:48s} {res['rps']:8.1f} req/s  p50 {res.get('p50_ms', 0):7.1f}  p99 {res.get('p99_ms', 0):7.1f} ms  "
                  f"err {res['errors']}  wrong {res['wrong']}  folds {res['folds']:.0f} "
                  f"({res['folds_per_task_touched']:.2f} per task touched)", flush=True)
            serve.delete("liedeploy")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results
