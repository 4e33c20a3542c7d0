"""Batch workers on a CPU torch server: `--workers 2 --threads 1` against the default (one worker,
2 torch threads), on bench_serve's workload.

    python benchmarks/bench_workers.py [--runs 3] [--duration 8]

Workload and load generator as in bench_serve.py (a ResNet-18-like config at 64x64, r=16 on every
conv and the classifier, 32 clients in their own process, binary tensors, a 0.5 GB budget): 1 task,
10 tasks uniform and 1,000 tasks Zipf(1.1). The two configurations alternate within each round;
medians over the rounds, with the range. Also in process, without HTTP (each configuration in a
fresh process): 10 replicas of the model forwarded round robin for 4 s by one worker of 2 torch
threads or by two workers of 1, at batches of 1, 5 and 16, packed and channels-last as the server
runs them (two such workers side by side is what `serve --processes 2` gives each process). Writes
benchmarks/results/workers_cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"1 worker x 2 threads (default)": dict(workers=1, threads=2), "2 workers x 1 thread": dict(workers=2, threads=1)}
LOADS = {"1 task": (1, 0.0), "10 tasks uniform": (10, 0.0), "1,000 tasks Zipf(1.1)": (1000, 1.1)}


def _forward_rate(workers: int, batch: int, seconds: float = 4.0) -> float:
    """Samples/s of ``workers`` threads forwarding 10 replicas round robin, cores / workers torch
    threads each (torch's thread count is per process: call in a fresh one). The replicas run as
    the server runs them on CPU: Conv2d weights packed, inputs channels-last (eager where this torch
    cannot pack)."""
    import copy
    import threading
    import time

    import torch

    from benchmarks.serve_models import resnet18
    from liedeploy.core import conv_pack

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    torch.manual_seed(0)
    base = resnet18().eval()
    models = [copy.deepcopy(base) for _ in range(10)]
    x = torch.randn(batch, 3, 64, 64)
    if conv_pack.pack_status() == "ready":
        plans = conv_pack.plan_convs(base, lambda m: m(torch.zeros(1, 3, 64, 64)), (1, 16))
        models = [conv_pack.pack_model(m, plans) for m in models]
        x = x.contiguous(memory_format=torch.channels_last)
    done = [0] * workers

    def work(k):
        with torch.inference_mode():
            for m in models:  # warm
                m(x)
            end, i = time.monotonic() + seconds, k
            while time.monotonic() < end:
                models[i % 10](x)
                done[k] += batch
                i += workers

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def _in_process() -> dict:
    out = {}
    for batch in (1, 5, 16):
        for workers in (1, 2):
            r = subprocess.run([sys.executable, __file__, "--forward-rate", str(workers), str(batch)],
                               capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
            out[f"batch {batch}, {workers} worker(s)"] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    from benchmarks import bench_serve as bs
    from benchmarks._results import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--forward-rate", nargs=2, type=int, help=argparse.SUPPRESS)  # WORKERS BATCH, in a child
    args = ap.parse_args(argv)
    if args.forward_rate:
        print(json.dumps(_forward_rate(*args.forward_rate)))
        return 0
    raw: dict = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        setup = bs._setup(work, 1000)
        for _ in range(args.runs):
            for load, (n, zipf) in LOADS.items():
                spec = setup["spec_one"] if n == 1 else setup["sizes"][n]["spec"]
                for name, kw in CONFIGS.items():
                    proc = bs._serve(setup, n, bs.GB // 2, **kw)
                    try:
                        res = bs._load(proc, spec, zipf=zipf, duration=args.duration)
                        res["mean_batch"] = bs._metric(proc.url, "liedeploy_batch_size_sum") / max(
                            bs._metric(proc.url, "liedeploy_batch_size_count"), 1)
                    finally:
                        proc.stop()
                    assert res["errors"] == 0 and res["wrong"] == 0, (load, name, res["error_kinds"])
                    raw.setdefault(load, {}).setdefault(name, []).append(res)
                    print(f"{load:24s} {name:32s} {res['rps']:7.1f} req/s  batch {res['mean_batch']:.1f}  "
                          f"cores busy {res['server_cores_busy']:.2f}", flush=True)
    base, alt = list(CONFIGS)
    lines = [f"--workers 2 --threads 1 vs the default, medians of {args.runs} alternating runs ({args.duration:g} s each), "
             f"req/s (range); 0 errors, 0 wrong outputs",
             f"{'load':24s} {'default':>22s} {'2 workers x 1 thread':>22s} {'ratio':>7s} {'batch':>11s} {'cores busy':>11s}"]
    med = {}
    for load, by in raw.items():
        m = {k: statistics.median(r["rps"] for r in v) for k, v in by.items()}
        med[load] = m
        rng = {k: f"{m[k]:.1f} ({min(r['rps'] for r in v):.0f}-{max(r['rps'] for r in v):.0f})" for k, v in by.items()}
        batch = "/".join(f"{statistics.median(r['mean_batch'] for r in by[k]):.1f}" for k in (base, alt))
        busy = "/".join(f"{statistics.median(r['server_cores_busy'] for r in by[k]):.2f}" for k in (base, alt))
        lines.append(f"{load:24s} {rng[base]:>22s} {rng[alt]:>22s} {m[alt] / m[base]:6.2f}x {batch:>11s} {busy:>11s}")
    ten, one = "10 tasks uniform", "1 task"
    lines.append(f"10 tasks uniform / 1 task (the ceiling), each configuration against its own: default "
                 f"{med[ten][base] / med[one][base]:.2f}x, 2 workers {med[ten][alt] / med[one][alt]:.2f}x")
    fwd = _in_process()
    lines.append("in process, no HTTP, samples/s of 10 replicas round robin (one run of 4 s each): " + "; ".join(
        f"batch {b}: 2 workers x 1 thread {fwd[f'batch {b}, 2 worker(s)']:.0f} vs 1 x 2 {fwd[f'batch {b}, 1 worker(s)']:.0f}, "
        f"{fwd[f'batch {b}, 2 worker(s)'] / fwd[f'batch {b}, 1 worker(s)']:.2f}x" for b in (1, 5, 16)))
    write_results("workers_cpu", "\n".join(lines), {"runs": raw, "median_rps": med, "in_process": fwd})
    return 0


if __name__ == "__main__":
    sys.exit(main())
