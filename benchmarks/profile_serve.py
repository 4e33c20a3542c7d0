"""Where a serving process's time goes: py-spy on `liedeploy serve` under bench_serve's load.

    pip install py-spy
    python benchmarks/profile_serve.py [--tasks 1000] [--duration 12] [--rate 50]
    python benchmarks/profile_serve.py --tasks 10 --workers 2 --threads 1 --gil

The workload is bench_serve.py's (a ResNet-18-like config at 64x64, r=16 on every conv and the
classifier, 32 clients, Zipf(1.1) over the tasks, or uniform at 10 tasks, a 0.5 GB cache budget).
py-spy samples every thread of the server (native frames included); each sample of the compute
thread is put in one bucket by the innermost frame that names one: the fold of a cold task (read
of its file, the fold itself, the replica), the model's forward, or the rest. The event-loop
thread's samples are split into waiting (epoll) and work (HTTP, encoding). Sampling pauses the
process, so throughput under the profiler is lower than bench_serve's; the shares are what this
measures. ``--gil`` also samples threads that are off the CPU (py-spy ``--idle``) and puts a
compute-thread sample whose innermost native frames take the GIL back (after a torch operation
released it, or to drop a tensor's Python object) in its own bucket, "waiting for the GIL": what
several batch workers (``--workers``) lose to one another and to the event loop. Writes
benchmarks/results/profile_serve_cpu.txt (``--gil``: profile_serve_gil_WxT_cpu.txt).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (bucket, a substring of a frame that puts a compute-thread sample in it), innermost match wins
BUCKETS = (
    ("fold: read the task's file", "TaskEntry.adapter"),
    ("fold: fold_sum (product, map, multiply)", "fold_sum"),
    ("fold: packed fold (product, map, multiply)", "fold_packed"),
    ("fold: replica (module tree)", "build_replica"),
    ("fold: replica (module tree)", "refill_replica"),
    ("fold: other", "AdapterBank._fold"),
    ("forward: the model", "TorchBackend._call"),
    ("batching, answers", "Batcher._run"),
)


COMPUTE = ("fold", "forward", "batching", "compute")  # the buckets of the compute thread's samples
# native frames of a thread blocked on taking the GIL (CPython's and pybind11's names)
GIL_FRAMES = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure", "gil_scoped_acquire",
              "~gil_scoped_release")


def _gil_wait(frames: list) -> bool:
    inner = frames[-6:]
    return any(g in f for f in inner for g in GIL_FRAMES) and any("pthread_cond" in f or "futex" in f for f in inner)


def _bucket(frames: list, gil: bool = False) -> str:
    if gil and _gil_wait(frames):
        return "compute thread: waiting for the GIL"
    for frame in reversed(frames):
        for name, needle in BUCKETS:
            if needle in frame:
                return name
    return "compute thread: waiting for work" if any("Condition.wait" in f or "pthread_cond" in f for f in frames) \
        else "compute thread: other"


def summarize(raw_path: str, gil: bool = False) -> tuple[dict, int]:
    """``({bucket: samples}, total samples)`` from py-spy's raw (collapsed) output with --threads
    (``gil``: a GIL-wait bucket for the compute threads)."""
    counts: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            n = int(n)
            total += n
            thread = frames[0]
            if "liedeploy-compute" in thread or "liedeploy-batcher" in thread:
                counts[_bucket(frames, gil)] += n
            elif "MainThread" in thread:
                counts["event loop: waiting (epoll)" if "epoll" in frames[-1] else "event loop: HTTP, decode, encode"] += n
            else:
                counts["other threads"] += n
    return dict(counts), total


def main(argv=None) -> int:
    from benchmarks._results import write_results
    from benchmarks.bench_serve import _load, _serve, _setup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000, choices=(1, 10, 100, 1000))
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--workers", type=int, default=1, help="serve --workers")
    ap.add_argument("--threads", type=int, default=2, help="serve --threads")
    ap.add_argument("--gil", action="store_true", help="also sample off-CPU threads; a GIL-wait bucket")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("profile_serve.py needs py-spy: pip install py-spy", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        setup = _setup(work, args.tasks)
        proc = _serve(setup, args.tasks, 500_000_000, workers=args.workers, threads=args.threads)
        raw = os.path.join(work, "profile.txt")
        try:
            rec = subprocess.Popen([spy, "record", "-p", str(proc.p.pid), "-o", raw, "-f", "raw", "-d",
                                    str(int(args.duration)), "-r", str(args.rate), "--threads", "--native"]
                                   + (["--idle"] if args.gil else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            spec = setup["sizes"][args.tasks]["spec"] if args.tasks != 1 else setup["spec_one"]
            res = _load(proc, spec, zipf=0.0 if args.tasks == 10 else 1.1, duration=args.duration)
            err = rec.communicate(timeout=args.duration + 120)[1]
        finally:
            proc.stop()
        if not os.path.exists(raw):
            print(f"py-spy wrote nothing: {err.strip().splitlines()[-1] if err.strip() else 'no message'}", file=sys.stderr)
            return 1
        counts, total = summarize(raw, args.gil)
    compute = sum(v for k, v in counts.items() if k.startswith(COMPUTE))
    lines = [f"liedeploy serve under py-spy ({args.rate} Hz, native frames), {args.tasks} task(s) "
             f"{'uniform' if args.tasks == 10 else 'Zipf(1.1)'}, 32 clients, {args.workers} worker(s) x "
             f"{args.threads} torch thread(s){', off-CPU samples too' if args.gil else ''}, {args.duration:g} s: "
             f"{res['rps']:.1f} req/s under the profiler, {res['errors']} errors, {res['wrong']} wrong",
             f"{'bucket':45s} {'share of all samples':>22s} {'share of the compute thread':>28s}"]
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        share = f"{n / compute:.3f}" if name.startswith(COMPUTE) else "-"
        lines.append(f"{name:45s} {n / max(total, 1):22.3f} {share:>28s}")
    fold = sum(v for k, v in counts.items() if k.startswith("fold"))
    lines.append(f"compute thread: folds {fold / max(compute, 1):.2f}, forwards "
                 f"{counts.get('forward: the model', 0) / max(compute, 1):.2f} of its samples")
    write_results(f"profile_serve_gil_{args.workers}x{args.threads}_cpu" if args.gil else "profile_serve_cpu", "\n".join(lines),
                  {"tasks": args.tasks, "workers": args.workers, "threads": args.threads, "gil": args.gil,
                   "samples": total, "buckets": counts, "load": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
