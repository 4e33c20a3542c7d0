"""Where a fold's time goes: torch.profiler over the folds of the serving benchmark's task (a
ResNet-18-like config, r=16 on every conv and the classifier), with the bank as the server runs it.

    python benchmarks/profile_fold.py [--folds 20]

Prints the median wall time of a fold (2 torch threads, every fold into recycled storage, as the
server's cold tasks are), the fused kernel's row split on torch's OpenMP team against Python
threads, and the operators by self CPU time; writes
benchmarks/results/profile_fold_cpu.txt. The script also runs on older commits of the bank
(`git worktree add`), to compare fold times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import statistics
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks._results import write_results
    from benchmarks.serve_models import resnet18
    from liedeploy import AdapterBank
    from tests.conftest import _write_adapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=20)
    ap.add_argument("--timed", type=int, default=200, help="folds timed for the median wall time")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = resnet18().eval()
    with tempfile.TemporaryDirectory() as d:
        paths = {f"t{i}": _write_adapter(base, os.path.join(d, f"a{i}.safetensors"),
                                         r".*(convolution|classifier\.1)\.weight", r=16, alpha=16, std=0.02, seed=i)
                 for i in range(2)}
        bank = AdapterBank(base, adapters=paths, lazy=True, cache_bytes=1)  # every prefetch folds again
        bank.prefetch("t0")
        walls = []
        for i in range(args.timed):
            t0 = time.perf_counter()
            bank.prefetch(f"t{i % 2}")
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls) * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.folds):
                bank.prefetch(f"t{i % 2}")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    split = _thread_split(args.timed)
    text = (f"a fold of a ResNet-18-like task (11M adapted weights, r=16), {torch.get_num_threads()} threads: "
            f"{wall:.2f} ms (median of {args.timed})\n{split}\n"
            f"{args.folds} folds, self CPU time per operator\n{table}")
    write_results("profile_fold_cpu", text)
    return 0


def _thread_split(reps: int) -> str:
    """The fused kernel's row split on torch's own OpenMP team against Python threads, for one
    512x4608 tensor folded right after a parallel torch op (whose OpenMP workers then spin)."""
    import statistics
    import time

    import torch

    from liedeploy.core import native

    if not native.openmp():
        return f"(the fold kernel does not run on OpenMP here: {native.status()})"
    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 4608, generator=g)
    out, B, A = torch.empty_like(W), torch.randn(512, 16, generator=g) * 0.02, torch.randn(16, 4608, generator=g)
    busy = torch.randn(1 << 20, generator=g)
    res = {}
    for how in ("torch's OpenMP team", "Python threads", "torch's OpenMP team", "Python threads"):
        native._state["omp"] = how.startswith("torch")  # the two splits fold_rows knows
        try:
            ts = []
            for _ in range(reps):
                busy.add_(1.0)  # a parallel torch op just before
                t0 = time.perf_counter()
                native.fold_rows(W, out, B, A, True)
                ts.append(time.perf_counter() - t0)
        finally:
            native._state["omp"] = True
        res[how] = statistics.median(ts) * 1e3
    return ("one 512x4608 fold right after a parallel torch op, rows split over: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()) + " (last of two alternating rounds)")


if __name__ == "__main__":
    sys.exit(main())
