"""What a batch of n samples costs per sample on bench_serve's model, against a batch of 16.

    python benchmarks/bench_batch_curve.py [--reps 9]

bench_serve.py's 10-task target compares 10 tasks uniform with the 1-task ceiling, whose batches
hold 16 samples. With 32 closed-loop clients over 10 tasks and one batch per task at a time, a
task's queue grows from 0 while the other tasks run, so the served batch averages about twice the
mean queue: 2 x 32 / 10 = 6.4 samples at best (bench_serve measured 5.0). This script gives the
forward's cost per sample at each batch size, in the server's setting (2 torch threads; each batch
on the weights of the next of 10 task replicas, round robin, as a 10-task load meets them, and on
one replica's weights, as the 1-task ceiling does), so the best 10-task ratio a per-task batcher can
reach is read off the table. Medians of ``--reps`` rounds. Packed Conv2d weights and channels-last
inputs by default, as ``liedeploy serve`` runs on CPU; ``--eager`` for torch eager. Writes
benchmarks/results/batch_curve_cpu.{txt,json} (``--eager``: batch_curve_eager_cpu).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCHES = (1, 2, 4, 5, 6, 8, 16)


def main(argv=None) -> int:
    import torch

    from benchmarks._results import write_results
    from benchmarks.serve_models import resnet18

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--eager", action="store_true",
                    help="torch eager convolutions (default: packed weights and channels-last inputs, as the server runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    base = resnet18().eval()
    replicas = [copy.deepcopy(base) for _ in range(10)]
    if not args.eager:
        base = _packed(base)
        replicas = [_packed(m) for m in replicas]
    per_sample: dict = {}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, 64, 64)
            if not args.eager:
                x = x.contiguous(memory_format=torch.channels_last)
            for m in replicas:  # warm
                m(x)
            cold, hot = [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                for m in replicas:
                    m(x)
                cold.append((time.perf_counter() - t) / len(replicas) / b)
                t = time.perf_counter()
                for _ in replicas:
                    base(x)
                hot.append((time.perf_counter() - t) / len(replicas) / b)
            per_sample[b] = {"ten_tasks_ms": 1e3 * statistics.median(cold), "one_task_ms": 1e3 * statistics.median(hot)}
    ceiling = per_sample[16]["one_task_ms"]
    how = "torch eager" if args.eager else "Conv2d weights packed, channels-last inputs (as the server runs)"
    lines = [f"ResNet-18-like at 64x64, {how}, {torch.get_num_threads()} torch threads, ms per sample (median of "
             f"{args.reps} rounds); ratio: the 1-task ceiling at batch 16 / this",
             f"{'batch':>5s} {'10 tasks (cold)':>16s} {'ratio':>7s} {'1 task (warm)':>14s} {'ratio':>7s}"]
    for b in BATCHES:
        c, h = per_sample[b]["ten_tasks_ms"], per_sample[b]["one_task_ms"]
        lines.append(f"{b:5d} {c:16.2f} {ceiling / c:6.2f}x {h:14.2f} {ceiling / h:6.2f}x")
    lines.append("32 closed-loop clients over 10 tasks: about 6.4 samples per batch at best (5.4 measured by bench_serve), "
                 f"so a per-task batcher reaches about {ceiling / per_sample[6]['ten_tasks_ms']:.2f}x of the ceiling at 6 "
                 f"and {ceiling / per_sample[5]['ten_tasks_ms']:.2f}x at 5, before any serving overhead")
    write_results("batch_curve_eager_cpu" if args.eager else "batch_curve_cpu", "\n".join(lines),
                  {"per_sample": per_sample, "reps": args.reps, "packed": not args.eager})
    return 0


def _packed(model):
    """``model`` with every Conv2d weight oneDNN can pack packed (liedeploy.core.conv_pack), as a bank
    that packs gives its tasks."""
    import torch

    from liedeploy.core import conv_pack

    return conv_pack.pack_model(model, conv_pack.plan_convs(model, lambda m: m(torch.zeros(1, 3, 64, 64)), (1, 16)))


if __name__ == "__main__":
    sys.exit(main())
