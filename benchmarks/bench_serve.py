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

Reports requests/s, p50/p95/p99, errors, wrong outputs, folds, peak RSS of the server, and CPU
seconds of server and client (they share 2 cores). Writes benchmarks/results/serve_cpu.json.
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


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


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


def _load(proc: Proc, spec: str, *, zipf: float, duration: float, json_mode: bool = False, clients: int = 32) -> dict:
    import resource

    c0 = _cpu_seconds(proc.p.pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start_rss = _peak_rss(proc.p.pid)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "_serve_load.py"), "--host", proc.host, "--port",
           str(proc.port), "--spec", spec, "--clients", str(clients), "--duration", str(duration), "--zipf", str(zipf)]
    if json_mode:
        cmd.append("--json")
    t0 = time.monotonic()
    lp = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out, _ = lp.communicate(timeout=duration + 300)
    wall = time.monotonic() - t0
    res = json.loads(out)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["server_cpu_s"] = _cpu_seconds(proc.p.pid) - c0
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


def _serve(setup, n: int, budget: int, *, max_batch: int = 16, threads: int = 2) -> Proc:
    return Proc([sys.executable, "-m", "liedeploy.cli", "serve", "--model", "benchmarks.serve_models:resnet18",
                 "--weights", setup["base"], "--adapters", setup["sizes"][n]["dir"], "--input-shape", "1,3,64,64",
                 "--port", "0", "--max-batch", str(max_batch), "--max-delay-ms", "4", "--cache-bytes", str(budget),
                 "--max-queue", "4096", "--threads", str(threads)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per configuration")
    ap.add_argument("--quick", action="store_true", help="fewer configurations (1,000 tasks and the baselines only)")
    ap.add_argument("--ray", action="store_true", help="also the Ray Serve application with 2 replicas")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "results", "serve_cpu.json"))
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        t0 = time.monotonic()
        setup = _setup(work, 1000)
        print(f"setup: base {setup['base_bytes'] / 1e6:.0f} MB, {DISTINCT} distinct adapters, "
              f"{time.monotonic() - t0:.0f} s", flush=True)

        def run(label, proc_fn, spec, zipf, json_mode=False, naive=False):
            proc = proc_fn()
            try:
                res = _load(proc, spec, zipf=zipf, duration=args.duration, json_mode=json_mode)
                if naive:
                    res["folds"] = json.loads(urllib.request.urlopen(proc.url + "/loads").read())["loads"]
                else:
                    res["folds"] = _metric(proc.url, "liedeploy_folds_total")
                    res["mean_batch"] = _metric(proc.url, "liedeploy_batch_size_sum") / max(
                        _metric(proc.url, "liedeploy_batch_size_count"), 1)
            finally:
                proc.stop()
            results[label] = res
            print(f"{label:40s} {res['rps']:8.1f} req/s  p50 {res.get('p50_ms', 0):7.1f}  p95 {res.get('p95_ms', 0):7.1f}  "
                  f"p99 {res.get('p99_ms', 0):7.1f} ms  err {res['errors']}  wrong {res['wrong']}  folds {res['folds']:.0f}  "
                  f"batch {res.get('mean_batch', 1):.1f}  rss {res['server_peak_rss'] / 1e6:.0f} MB  cpu srv {res['server_cpu_s']:.1f} s cli {res['client_cpu_s']:.1f} s", flush=True)
            return res

        s = setup["sizes"]
        run("ceiling: 1 task, 2 GB", lambda: _serve(setup, 1, 2 * GB), setup["spec_one"], 0)
        run("ceiling, JSON tensors", lambda: _serve(setup, 1, 2 * GB), setup["spec_one"], 0, json_mode=True)
        run("--max-batch 1: 1 task", lambda: _serve(setup, 1, 2 * GB, max_batch=1), setup["spec_one"], 0)
        run("10 tasks uniform, 2 GB", lambda: _serve(setup, 10, 2 * GB), s[10]["spec"], 0)
        if not args.quick:
            run("10 tasks uniform, 0.5 GB", lambda: _serve(setup, 10, GB // 2), s[10]["spec"], 0)
            for n in (1, 10, 100):
                for budget, bl in ((GB // 2, "0.5 GB"), (2 * GB, "2 GB")):
                    run(f"{n} tasks Zipf(1.1), {bl}", lambda n=n, budget=budget: _serve(setup, n, budget), s[n]["spec"], 1.1)
        for budget, bl in ((GB // 2, "0.5 GB"), (2 * GB, "2 GB")):
            run(f"1000 tasks Zipf(1.1), {bl}", lambda budget=budget: _serve(setup, 1000, budget), s[1000]["spec"], 1.1)
            run(f"naive: 1000 tasks Zipf(1.1), {bl}",
                lambda budget=budget: Proc([sys.executable, os.path.join(ROOT, "benchmarks", "naive_server.py"), "--merged",
                                            s[1000]["merged"], "--budget-bytes", str(budget)]),
                s[1000]["spec"], 1.1, naive=True)
        if args.ray:
            from benchmarks.bench_serve_ray import run_ray

            results.update(run_ray(setup, s, args.duration, _load))
    ceiling = results["ceiling: 1 task, 2 GB"]["rps"]
    ratios = {
        "10 tasks uniform / ceiling": results["10 tasks uniform, 2 GB"]["rps"] / ceiling,
        "batching (max-batch 16) / --max-batch 1, 1 task": ceiling / results["--max-batch 1: 1 task"]["rps"],
        "JSON / binary tensors, 1 task": results["ceiling, JSON tensors"]["rps"] / ceiling,
    }
    for bl in ("0.5 GB", "2 GB"):
        z = results[f"1000 tasks Zipf(1.1), {bl}"]["rps"]
        ratios[f"1000 tasks Zipf, {bl}: liedeploy / naive"] = z / max(results[f"naive: 1000 tasks Zipf(1.1), {bl}"]["rps"], 1e-9)
        ratios[f"1000 tasks Zipf, {bl}: liedeploy / ceiling"] = z / ceiling
    if args.ray:
        single = results["10 tasks uniform, 2 GB"]["rps"]
        ratios["ray 2 replicas / single process, 10 tasks uniform"] = results["ray 2 replicas: 10 tasks uniform"]["rps"] / single
        ratios["ray 2 replicas / single process, 1000 tasks Zipf"] = (
            results["ray 2 replicas: 1000 tasks Zipf(1.1), affinity"]["rps"] / results["1000 tasks Zipf(1.1), 0.5 GB"]["rps"])
    budget_ok = {k: {"peak_rss": v["server_peak_rss"], "rss_after_start": v["server_start_rss"],
                     "limit_base_budget_300MB": setup["base_bytes"] + (GB // 2 if "0.5 GB" in k else 2 * GB) + 300e6,
                     "within": v["server_peak_rss"] <= setup["base_bytes"] + (GB // 2 if "0.5 GB" in k else 2 * GB) + 300e6}
                 for k, v in results.items() if "GB" in k and not k.startswith("naive")}
    print()
    print(f"{'ratio':60s} {'value':>8s}")
    for k, v in ratios.items():
        print(f"{k:60s} {v:8.2f}x")
    for k, v in budget_ok.items():
        print(f"peak RSS {k:44s} {v['peak_rss'] / 1e6:6.0f} MB (after start {v['rss_after_start'] / 1e6:5.0f} MB; "
              f"limit base+budget+300 MB {v['limit_base_budget_300MB'] / 1e6:5.0f} MB: {'within' if v['within'] else 'OVER'})")
    print(f"zero errors and zero wrong outputs: {all(r['errors'] == 0 and r['wrong'] == 0 for r in results.values())}")
    out = {"results": results, "ratios": ratios, "base_bytes": setup["base_bytes"], "duration": args.duration,
           "peak_rss_vs_base_budget_300MB": budget_ok}
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
