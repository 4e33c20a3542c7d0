"""Load generator for bench_serve.py: N concurrent clients in this process, bounded in time and count.

Each client keeps one HTTP/1.1 connection and sends Open Inference Protocol v2 infer requests
(binary tensor data, or JSON with --json), choosing tasks from a Zipf or uniform popularity, and
checks every answer against the expected logits. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spec", required=True, help="JSON file: tasks, their expected-output keys, inputs, expected")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--max-requests", type=int, default=100000)
    ap.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent (0: uniform)")
    ap.add_argument("--json", action="store_true", help="send JSON tensors instead of binary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latencies", action="store_true", help="include every latency (ms) in the JSON")
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    tasks = spec["tasks"]  # [[task, expected key]]
    x = np.asarray(spec["input"], np.float32)
    expected = {k: np.asarray(v, np.float32) for k, v in spec["expected"].items()}
    if args.zipf > 0:
        w = 1.0 / np.arange(1, len(tasks) + 1) ** args.zipf
    else:
        w = np.ones(len(tasks))
    w = w / w.sum()
    rng = np.random.default_rng(args.seed)
    order = rng.choice(len(tasks), size=args.max_requests, p=w)
    if args.json:
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.reshape(-1).tolist()}]}).encode()
        body, extra = head, {"Content-Type": "application/json"}
    else:
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        body = head + x.tobytes()
        extra = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    lock = threading.Lock()
    nxt = [0]
    lat, errors, wrong, touched = [], [], [0], set()
    deadline = time.monotonic() + args.duration

    def client():
        conn = http.client.HTTPConnection(args.host, args.port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(order):
                return
            task, key = tasks[order[i]]
            t0 = time.monotonic()
            try:
                conn.request("POST", f"/v2/models/{task}/infer", body=body, headers=extra)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    errors.append(r.status)
                    continue
                hl = r.getheader("Inference-Header-Content-Length")
                if hl is not None:
                    out = np.frombuffer(data[int(hl):], np.float32)
                else:
                    out = np.asarray(json.loads(data)["outputs"][0]["data"], np.float32)
                if not np.allclose(out.reshape(expected[key].shape), expected[key], rtol=1e-3, atol=1e-4):
                    wrong[0] += 1
                with lock:
                    lat.append(time.monotonic() - t0)
                    touched.add(task)
            except Exception as exc:  # noqa: BLE001
                errors.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection(args.host, args.port, timeout=60)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + 120)
    wall = time.monotonic() - t0
    lat_ms = np.asarray(lat) * 1000
    res = {"requests": len(lat), "seconds": wall, "rps": len(lat) / wall, "errors": len(errors),
           "error_kinds": sorted(set(map(str, errors)))[:5], "wrong": wrong[0], "tasks_touched": len(touched)}
    if len(lat_ms):
        res.update({"p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
                    "p99_ms": float(np.percentile(lat_ms, 99))})
    if args.latencies:
        res["latencies_ms"] = [round(float(v), 3) for v in lat_ms]
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
