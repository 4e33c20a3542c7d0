"""The server under hostile clients: health-check latency while the largest bad body is refused, and
normal clients while idle half-sent connections exceed the connection cap.

Baseline: the same health checks on the same idle server, in the same run (a ratio, median of
several runs). A real ``liedeploy serve`` process on loopback, the ResNet-like test model.

    python benchmarks/bench_hostile.py [--runs 3]

Writes benchmarks/results/hostile_cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import write_results  # noqa: E402


def _get(url, timeout=30):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        r.read()
        status = r.status
    return status, time.perf_counter() - t0


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _health_while(url, busy, limit=2000):
    lat = []
    while busy() and len(lat) < limit:
        status, dt = _get(f"{url}/v2/health/live")
        assert status == 200
        lat.append(dt)
        time.sleep(0.005)
    return lat


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None) -> int:
    import torch
    from safetensors.torch import save_file

    from tests.serving.helpers import ServerProcess
    from tests.serving.models import Net

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-body-mib", type=int, default=64)
    args = ap.parse_args(argv)
    d = tempfile.mkdtemp()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, os.path.join(d, "base.safetensors"))
    os.makedirs(os.path.join(d, "tasks"))
    n = (args.max_body_mib << 20) // 12 - 100  # JSON numbers of 11 characters and a comma: just under --max-body
    bad = (b'{"inputs":[{"name":"input","datatype":"FP64","shape":[1,3,8,8],"data":['
           + b",".join([b"0.123456789"] * n) + b"]}]}")
    cap, runs = 64, []
    server_args = ["--model", "tests.serving.models:net", "--weights", os.path.join(d, "base.safetensors"),
                   "--adapters", os.path.join(d, "tasks"), "--input-shape", "1,3,8,8",
                   "--max-body", f"{args.max_body_mib}MiB", "--max-connections", str(cap)]
    with ServerProcess(server_args) as srv:
        for _ in range(args.runs):
            t_end = time.perf_counter() + 2.0
            idle = _health_while(srv.url, lambda: time.perf_counter() < t_end, 200)
            result = {}
            th = threading.Thread(target=lambda: result.update(status=_post(f"{srv.url}/v2/models/base/infer", bad)))
            t0 = time.perf_counter()
            th.start()
            busy = _health_while(srv.url, th.is_alive)
            th.join()
            refused_s = time.perf_counter() - t0
            host, port = srv.hostport.split(":")
            socks = []
            for _ in range(2 * cap):  # twice the cap, all stuck in their request head
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"POST /v2/models/base/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
                socks.append(s)
            served = [_get(f"{srv.url}/v2/health/ready")[1] for _ in range(20)]
            for s in socks:
                s.close()
            runs.append({"bad_status": result.get("status"), "bad_body_bytes": len(bad), "refused_seconds": refused_s,
                         "idle_p50": statistics.median(idle), "busy_p50": statistics.median(busy),
                         "busy_p99": _pct(busy, 0.99), "busy_max": max(busy), "busy_checks": len(busy),
                         "capped_p50": statistics.median(served), "capped_max": max(served)})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    spread = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in ("busy_max", "busy_p99", "capped_max")}
    lines = [
        f"health-check latency while a {len(bad) / 2**20:.0f} MiB bad JSON body is refused (400 in all runs: "
        f"{all(r['bad_status'] == 400 for r in runs)}), {args.runs} runs, medians",
        "| measure | value | vs idle server |",
        "|---|---|---|",
        f"| idle p50 | {1000 * med['idle_p50']:.1f} ms | 1.00x |",
        f"| during the bad body, p50 | {1000 * med['busy_p50']:.1f} ms | {med['busy_p50'] / med['idle_p50']:.2f}x |",
        f"| during the bad body, p99 | {1000 * med['busy_p99']:.1f} ms (runs {1000 * spread['busy_p99'][0]:.1f}-"
        f"{1000 * spread['busy_p99'][1]:.1f}) | {med['busy_p99'] / med['idle_p50']:.2f}x |",
        f"| during the bad body, max | {1000 * med['busy_max']:.1f} ms (runs {1000 * spread['busy_max'][0]:.1f}-"
        f"{1000 * spread['busy_max'][1]:.1f}) | {med['busy_max'] / med['idle_p50']:.2f}x |",
        f"| {2 * cap} idle half-sent heads (cap {cap}): a normal client, max | {1000 * med['capped_max']:.1f} ms "
        f"| {med['capped_max'] / med['idle_p50']:.2f}x |",
        f"time to refuse the bad body (upload included): {med['refused_seconds']:.2f} s",
    ]
    write_results("hostile_cpu", "\n".join(lines), {"runs": runs, "median": med, "cap": cap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
