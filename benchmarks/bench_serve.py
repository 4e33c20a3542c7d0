"""Serving many tasks over HTTP: `liedeploy serve` against its ceiling, no batching, and the naive deployment.

    python benchmarks/bench_serve.py [--duration 15] [--quick]

Workload: a ResNet-18-like transformers config (basic blocks) at 64x64, r=16 Lie adapters on every
conv and the classifier; 32 concurrent clients in a separate process (one keep-alive connection
each) sending binary tensor data (one run with JSON too); task popularity Zipf(1.1) or uniform;
1, 10, 100 and 1,000 registered tasks; cache budgets of 0.5 and 2 GB. Every answer is checked
against the expected logits (wrong outputs are counted).

Baselines in the same run: (a) the same server with all traffic on one task (the ceiling); (b) the
same server with --max-batch 1; (c) the naive deployment (benchmarks/naive_server.py: FastAPI,
no batching, an LRU of merged per-task models in the same budget, a merged file loaded on a miss).
To keep the disk small, tasks cycle over 20 distinct adapter files (hard links): every task is
still folded (or loaded) on its own.

The server also runs with ``--processes 2`` (two worker processes of one torch thread each, the
cache split between them) at 1,000, 10 and 1 task(s); the 10-task ratio to the ceiling then takes
the faster of the two 1-task servers. At 1,000 tasks both servers also run against two load-generator
processes (the client must not be what limits either rate), and ``--processes 2`` once more with
``LIEDEPLOY_FUSE=off`` (packed layers run as modules instead of the fused graph of
liedeploy.core.conv_graph).

Reports requests/s, p50/p95/p99, errors, wrong outputs, folds, peak RSS of the server (with worker
processes: each process's peak, summed), and CPU seconds of the server (all its processes) and
client (they share 2 cores). Writes benchmarks/results/serve_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DISTINCT = 20
GB = 10**9


def _tree(pid: int) -> list:
    """``pid`` and its descendants (a server with --processes has worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its living descendants."""
    total = 0.0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _peak_rss(pid: int) -> int:
    """Peak RSS of ``pid``, plus that of each descendant (their peaks summed: an upper bound)."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Proc:
    """A server process whose first 'listening on http://...' line gives its address."""

    def __init__(self, argv, env=None):
        env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines, self.url = [], None
        ready = threading.Event()

        def read():
            for line in self.p.stdout:
                self.lines.append(line.rstrip())
                m = re.search(r"listening on http://([\d.]+):(\d+)", line)
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    self.url = f"http://{self.host}:{self.port}"
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _load(proc: Proc, spec: str, *, zipf: float, duration: float, json_mode: bool = False, clients: int = 32,
          procs: int = 1) -> dict:
    """Drive ``proc`` with ``clients`` clients spread over ``procs`` load-generator processes."""
    import resource

    import numpy as np

    c0 = _cpu_seconds(proc.p.pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start_rss = _peak_rss(proc.p.pid)
    t0 = time.monotonic()
    gens = []
    for i in range(procs):
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "_serve_load.py"), "--host", proc.host, "--port",
               str(proc.port), "--spec", spec, "--clients", str(clients // procs + (i < clients % procs)),
               "--duration", str(duration), "--zipf", str(zipf), "--seed", str(i), "--latencies"]
        if json_mode:
            cmd.append("--json")
        gens.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    outs = [json.loads(g.communicate(timeout=duration + 300)[0]) for g in gens]
    wall = time.monotonic() - t0
    lat = np.concatenate([np.asarray(o.pop("latencies_ms", []), float) for o in outs] or [np.zeros(0)])
    res = {"requests": sum(o["requests"] for o in outs), "rps": sum(o["rps"] for o in outs),
           "errors": sum(o["errors"] for o in outs), "wrong": sum(o["wrong"] for o in outs),
           "error_kinds": sorted({k for o in outs for k in o["error_kinds"]})[:5], "load_procs": procs}
    if len(lat):
        res.update({"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                    "p99_ms": float(np.percentile(lat, 99))})
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["server_cpu_s"] = _cpu_seconds(proc.p.pid) - c0
    res["server_cores_busy"] = res["server_cpu_s"] / max(wall, 1e-9) / (os.cpu_count() or 1)
    res["client_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res["server_start_rss"] = start_rss
    res["wall_s"] = wall
    res["server_peak_rss"] = _peak_rss(proc.p.pid)
    return res


def _setup(work: str, n_tasks: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from benchmarks.serve_models import resnet18
    from liedeploy import load_adapter, merge_, merge_files
    from tests.conftest import _write_adapter

    torch.manual_seed(0)
    base = resnet18()
    base_path = os.path.join(work, "base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    distinct = os.path.join(work, "distinct")
    merged = os.path.join(work, "merged_distinct")
    os.makedirs(distinct)
    os.makedirs(merged)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = {"base": base(x).detach().numpy().tolist()}
    for i in range(DISTINCT):
        p = _write_adapter(base, os.path.join(distinct, f"a{i}.safetensors"), r".*(convolution|classifier\.1)\.weight",
                           r=16, alpha=16, std=0.02, seed=1000 + i)
        merge_files(base_path, [p], os.path.join(merged, f"a{i}.safetensors"))
        with torch.no_grad():
            expected[f"a{i}"] = merge_(load_adapter(copy.deepcopy(base), p))(x).numpy().tolist()
    sizes = {}
    for n in sorted({1, 10, 100, n_tasks}):
        d = os.path.join(work, f"tasks{n}")
        md = os.path.join(work, f"merged{n}")
        os.makedirs(d)
        os.makedirs(md)
        tasks = []
        for t in range(n):
            src = f"a{t % DISTINCT}"
            os.link(os.path.join(distinct, src + ".safetensors"), os.path.join(d, f"t{t:04d}.safetensors"))
            os.link(os.path.join(merged, src + ".safetensors"), os.path.join(md, f"t{t:04d}.safetensors"))
            tasks.append([f"t{t:04d}", src])
        spec = os.path.join(work, f"spec{n}.json")
        json.dump({"tasks": tasks, "input": x.numpy().tolist(), "expected": expected}, open(spec, "w"))
        sizes[n] = {"dir": d, "merged": md, "spec": spec}
    one = os.path.join(work, "spec_one.json")
    json.dump({"tasks": [["t0000", "a0"]], "input": x.numpy().tolist(), "expected": expected}, open(one, "w"))
    base_bytes = os.path.getsize(base_path)
    return {"base": base_path, "sizes": sizes, "spec_one": one, "base_bytes": base_bytes}


def _serve(setup, n: int, budget: int, *, max_batch: int = 16, threads: int = 2, fold_ahead=None,
           cache_policy=None, workers: int = 1, processes: int = 1, env=None) -> Proc:
    extra = [] if fold_ahead is None else ["--fold-ahead", str(fold_ahead)]  # None: the server's default
    extra += [] if workers == 1 else ["--workers", str(workers)]
    if processes > 1:  # the cores shared out: threads per worker process
        extra += ["--processes", str(processes)]
        threads = max(1, threads // processes)
    extra += [] if cache_policy is None else ["--cache-policy", cache_policy]
    return Proc([sys.executable, "-m", "liedeploy.cli", "serve", "--model", "benchmarks.serve_models:resnet18",
                 "--weights", setup["base"], "--adapters", setup["sizes"][n]["dir"], "--input-shape", "1,3,64,64",
                 "--port", "0", "--max-batch", str(max_batch), "--max-delay-ms", "4", "--cache-bytes", str(budget),
                 "--max-queue", "4096", "--threads", str(threads)] + extra, env=env)


def _naive(setup, n: int, budget: int, workers: int, threads: int) -> Proc:
    return Proc([sys.executable, os.path.join(ROOT, "benchmarks", "naive_server.py"), "--merged",
                 setup["sizes"][n]["merged"], "--budget-bytes", str(budget), "--workers", str(workers),
                 "--threads", str(threads)])


def main(argv=None) -> int:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration and run")
    ap.add_argument("--runs", type=int, default=3, help="runs of every configuration (medians and spreads)")
    ap.add_argument("--quick", action="store_true", help="one run of each configuration")
    ap.add_argument("--ray", action="store_true", help="also the Ray Serve application with 2 replicas (one run)")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "results", "serve_cpu.json"))
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    cores = os.cpu_count() or 1
    raw: dict = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        t0 = time.monotonic()
        setup = _setup(work, 1000)
        s = setup["sizes"]
        print(f"setup: base {setup['base_bytes'] / 1e6:.0f} MB, {DISTINCT} distinct adapters, {cores} cores, "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        budget = GB // 2

        def run(label, proc_fn, spec, zipf, json_mode=False, naive=False, procs=1):
            proc = proc_fn()
            try:
                res = _load(proc, spec, zipf=zipf, duration=args.duration, json_mode=json_mode, procs=procs)
                if naive:
                    res["folds"] = json.loads(urllib.request.urlopen(proc.url + "/loads").read())["loads"]
                else:
                    res["folds"] = _metric(proc.url, "liedeploy_folds_total")
                    res["mean_batch"] = _metric(proc.url, "liedeploy_batch_size_sum") / max(
                        _metric(proc.url, "liedeploy_batch_size_count"), 1)
            finally:
                proc.stop()
            raw.setdefault(label, []).append(res)
            print(f"{label:46s} {res['rps']:7.1f} req/s  p50 {res.get('p50_ms', 0):6.1f}  p99 {res.get('p99_ms', 0):7.1f} ms  "
                  f"err {res['errors']}  wrong {res['wrong']}  loads {res['folds']:.0f}  batch {res.get('mean_batch', 1):.1f}  "
                  f"rss {res['server_peak_rss'] / 1e6:.0f} MB  cores busy {res['server_cores_busy']:.2f}", flush=True)

        naive_configs = [(w, cores // w) for w in (1, cores) if cores // w >= 1]  # workers x threads = cores
        for _ in range(runs):
            for w, th in naive_configs:  # the naive server's sweep (its best is the baseline)
                run(f"naive {w}x{th}: 1000 tasks Zipf, binary", lambda w=w, th=th: _naive(setup, 1000, budget, w, th),
                    s[1000]["spec"], 1.1, naive=True)
            run("liedeploy: 1000 tasks Zipf, binary", lambda: _serve(setup, 1000, budget), s[1000]["spec"], 1.1)
            run("liedeploy: 1000 tasks Zipf, binary, 2 load procs", lambda: _serve(setup, 1000, budget),
                s[1000]["spec"], 1.1, procs=2)
            run("liedeploy --fold-ahead 4: 1000 tasks Zipf", lambda: _serve(setup, 1000, budget, fold_ahead=4),
                s[1000]["spec"], 1.1)
            run("liedeploy LIEDEPLOY_PACK=off: 1000 tasks Zipf",
                lambda: _serve(setup, 1000, budget, env={"LIEDEPLOY_PACK": "off"}), s[1000]["spec"], 1.1)
            run("liedeploy --cache-policy lru: 1000 tasks Zipf", lambda: _serve(setup, 1000, budget, cache_policy="lru"),
                s[1000]["spec"], 1.1)
            run("liedeploy: 1000 tasks Zipf, JSON", lambda: _serve(setup, 1000, budget), s[1000]["spec"], 1.1,
                json_mode=True)
            run("liedeploy: 1 task (ceiling), binary", lambda: _serve(setup, 1, budget), setup["spec_one"], 0)
            run("liedeploy: 10 tasks uniform, binary", lambda: _serve(setup, 10, budget), s[10]["spec"], 0)
            run("liedeploy --processes 2: 1000 tasks Zipf", lambda: _serve(setup, 1000, budget, processes=2),
                s[1000]["spec"], 1.1)
            run("liedeploy --processes 2: 1000 tasks Zipf, 2 load procs", lambda: _serve(setup, 1000, budget, processes=2),
                s[1000]["spec"], 1.1, procs=2)
            run("liedeploy --processes 2 LIEDEPLOY_FUSE=off: 1000 tasks Zipf",
                lambda: _serve(setup, 1000, budget, processes=2, env={"LIEDEPLOY_FUSE": "off"}), s[1000]["spec"], 1.1)
            run("liedeploy --processes 2: 1 task", lambda: _serve(setup, 1, budget, processes=2), setup["spec_one"], 0)
            run("liedeploy --processes 2: 10 tasks uniform", lambda: _serve(setup, 10, budget, processes=2),
                s[10]["spec"], 0)
        med = {k: statistics.median(r["rps"] for r in v) for k, v in raw.items()}
        best = max(naive_configs, key=lambda c: med[f"naive {c[0]}x{c[1]}: 1000 tasks Zipf, binary"])
        nb = f"{best[0]}x{best[1]}"
        for _ in range(runs):  # the best naive configuration for the other workloads
            run(f"naive {nb}: 1000 tasks Zipf, JSON", lambda: _naive(setup, 1000, budget, *best), s[1000]["spec"], 1.1,
                json_mode=True, naive=True)
            run(f"naive {nb}: 1 task, binary", lambda: _naive(setup, 1, budget, *best), setup["spec_one"], 0, naive=True)
        if args.ray:
            from benchmarks.bench_serve_ray import run_ray

            for label, res in run_ray(setup, s, args.duration).items():
                raw[label] = [res]
        med = {k: statistics.median(r["rps"] for r in v) for k, v in raw.items()}

    def ratio(a, b):
        va = [r["rps"] for r in raw[a]]
        vb = [r["rps"] for r in raw[b]]
        return {"median": med[a] / med[b], "min": min(va) / max(vb), "max": max(va) / min(vb)}

    ceiling = max(("liedeploy: 1 task (ceiling), binary", "liedeploy --processes 2: 1 task"), key=med.get)
    ratios = {
        "1000 tasks Zipf, binary: liedeploy / competent naive": ratio("liedeploy: 1000 tasks Zipf, binary",
                                                                       f"naive {nb}: 1000 tasks Zipf, binary"),
        "1000 tasks Zipf, JSON: liedeploy / competent naive": ratio("liedeploy: 1000 tasks Zipf, JSON",
                                                                     f"naive {nb}: 1000 tasks Zipf, JSON"),
        "1 task: liedeploy / competent naive (batching)": ratio("liedeploy: 1 task (ceiling), binary", f"naive {nb}: 1 task, binary"),
        "10 tasks uniform / ceiling": ratio("liedeploy: 10 tasks uniform, binary", "liedeploy: 1 task (ceiling), binary"),
        "1000 tasks: 2 load processes / 1": ratio("liedeploy: 1000 tasks Zipf, binary, 2 load procs",
                                                  "liedeploy: 1000 tasks Zipf, binary"),
        "1000 tasks: default (folds on the compute thread) / --fold-ahead 4 (prefetch thread)": ratio(
            "liedeploy: 1000 tasks Zipf, binary", "liedeploy --fold-ahead 4: 1000 tasks Zipf"),
        "1000 tasks: conv weights packed (default) / LIEDEPLOY_PACK=off": ratio(
            "liedeploy: 1000 tasks Zipf, binary", "liedeploy LIEDEPLOY_PACK=off: 1000 tasks Zipf"),
        "1000 tasks: default cache (most used kept) / --cache-policy lru": ratio(
            "liedeploy: 1000 tasks Zipf, binary", "liedeploy --cache-policy lru: 1000 tasks Zipf"),
        "1000 tasks Zipf, binary: liedeploy --processes 2 / competent naive": ratio(
            "liedeploy --processes 2: 1000 tasks Zipf", f"naive {nb}: 1000 tasks Zipf, binary"),
        "1000 tasks, --processes 2: 2 load processes / 1": ratio(
            "liedeploy --processes 2: 1000 tasks Zipf, 2 load procs", "liedeploy --processes 2: 1000 tasks Zipf"),
        "1000 tasks, --processes 2: fused graph (default) / LIEDEPLOY_FUSE=off (modules)": ratio(
            "liedeploy --processes 2: 1000 tasks Zipf", "liedeploy --processes 2 LIEDEPLOY_FUSE=off: 1000 tasks Zipf"),
        "1000 tasks: --processes 2 / 1 process (default)": ratio(
            "liedeploy --processes 2: 1000 tasks Zipf", "liedeploy: 1000 tasks Zipf, binary"),
        "10 tasks uniform: --processes 2 / 1 process (default)": ratio(
            "liedeploy --processes 2: 10 tasks uniform", "liedeploy: 10 tasks uniform, binary"),
        "1 task: --processes 2 / 1 process (default)": ratio(
            "liedeploy --processes 2: 1 task", "liedeploy: 1 task (ceiling), binary"),
        f"10 tasks uniform, --processes 2 / ceiling (the faster 1-task server: {ceiling.split(':')[0]})": ratio(
            "liedeploy --processes 2: 10 tasks uniform", ceiling),
    }
    # (the Ray runs measure no single server process: they have neither)
    busy = {k: statistics.median(r["server_cores_busy"] for r in v) for k, v in raw.items() if "server_cores_busy" in v[0]}
    rss = {k: max(r["server_peak_rss"] for r in v) for k, v in raw.items() if "server_peak_rss" in v[0]}
    print()
    print(f"competent naive baseline: {nb} (workers x torch threads, best of {[f'{w}x{t}' for w, t in naive_configs]})")
    print(f"{'ratio (median of ' + str(runs) + ' runs; min-max)':62s} {'value':>8s}")
    for k, v in ratios.items():
        print(f"{k:62s} {v['median']:7.2f}x  ({v['min']:.2f}-{v['max']:.2f})")
    print(f"server cores busy, 1000 tasks: {busy['liedeploy: 1000 tasks Zipf, binary']:.2f} of {cores}; naive {nb}: "
          f"{busy[f'naive {nb}: 1000 tasks Zipf, binary']:.2f}")
    print(f"server cores busy, 1000 tasks, --processes 2 (all processes): {busy['liedeploy --processes 2: 1000 tasks Zipf']:.2f}")
    print(f"peak RSS, 1000 tasks, budget {budget / 1e6:.0f} MB: liedeploy {rss['liedeploy: 1000 tasks Zipf, binary'] / 1e6:.0f} MB, "
          f"--processes 2 {rss['liedeploy --processes 2: 1000 tasks Zipf'] / 1e6:.0f} MB (the processes' peaks summed), "
          f"naive {nb} {rss[f'naive {nb}: 1000 tasks Zipf, binary'] / 1e6:.0f} MB")
    print(f"zero errors and zero wrong outputs: {all(r['errors'] == 0 and r['wrong'] == 0 for v in raw.values() for r in v)}")
    out = {"runs": raw, "median_rps": med, "ratios": ratios, "naive_best": nb, "cores_busy": busy, "peak_rss": rss,
           "base_bytes": setup["base_bytes"], "duration": args.duration, "budget_bytes": budget}
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
