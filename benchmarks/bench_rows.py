"""Decode steps of several tasks on CPU: the row-segment kernel against one BLAS call per task.

    python benchmarks/bench_rows.py [--reps 7]

Part 1, one Linear (float32, then bfloat16 weights and inputs): rows of 4-6 tasks (decode-sized segments: 1-5 rows each), each task with its
own float32 weight, through ``liedeploy.core.native.rows_linear`` (one call) against what
``MixedView`` did before it (torch's ``F.linear`` per task on its rows, then ``torch.cat``), the
baseline a user writing the mixed step in torch would get. The weights are cold: each timed call
walks the next of enough weight sets to fill 128 MB (more than this machine's 32 MB L3), as a
decode step meets them after the other layers ran. Shapes: the bench_generate model's projections
(256x256, 512x256, 256x512) and a 1024x4096 slice of a 7B-class layer; two tasks of 8 and of 12
rows (where ``native.rows_max`` draws the line: 16 rows in float32, 8 in bfloat16); also one task
of 16 rows (where MixedView keeps BLAS). Median of ``--reps`` timings, each over every weight set.

Part 2, a whole decode step: bench_generate's LLaMA-like model (4 layers, hidden 256, r=16 Lie
adapters on every projection), 16 rows over 6 tasks (5/3/2/2/2/2) in one ``MixedView`` with a
96-token KV cache, with the kernel and with ``LIEDEPLOY_ROWS=blas``, in the same process.

Ratios are BLAS time / kernel time (above 1: the kernel is faster). Writes
benchmarks/results/rows_cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [(256, 256), (512, 256), (256, 512), (1024, 4096)]
SEGMENTS = [[1] * 6, [5, 3, 2, 2, 2, 2], [4] * 4, [8, 8], [12, 12], [16]]


def _linear(reps: int) -> list:
    import torch
    import torch.nn.functional as F

    from liedeploy.core import native

    rows = []
    for dtype, n_out, k in [(dt, n, k) for dt in (torch.float32, torch.bfloat16) for n, k in SHAPES]:
        size = torch.finfo(dtype).bits // 8
        for segs in SEGMENTS:
            g = torch.Generator().manual_seed(0)
            n_sets = max(4, int(128e6 / (n_out * k * size * len(segs))))
            sets = [[torch.randn(n_out, k, generator=g).to(dtype) for _ in segs] for _ in range(n_sets)]
            biases = [None] * len(segs)
            x = torch.randn(sum(segs), k, generator=g).to(dtype)
            starts = torch.tensor([0] + torch.tensor(segs).cumsum(0).tolist(), dtype=torch.int64)
            bounds = list(zip(starts[:-1].tolist(), starts[1:].tolist()))

            def blas(ws):
                return torch.cat([F.linear(x[a:b], w) for (a, b), w in zip(bounds, ws)])

            def kernel(ws):
                return native.rows_linear(x, starts, ws, biases)

            err = float((kernel(sets[0]).float() - blas(sets[0]).float()).abs().max())
            times = {}
            for name, fn in (("blas", blas), ("kernel", kernel)):
                per = []
                for _ in range(reps):
                    t = time.perf_counter()
                    for ws in sets:
                        fn(ws)
                    per.append((time.perf_counter() - t) / n_sets)
                times[name] = statistics.median(per)
            rows.append({"dtype": str(dtype).split(".")[-1], "out": n_out, "in": k, "segments": segs,
                         "blas_us": 1e6 * times["blas"], "kernel_us": 1e6 * times["kernel"],
                         "ratio": times["blas"] / times["kernel"],
                         "kernel_gb_s": n_out * k * size * len(segs) / times["kernel"] / 1e9, "max_abs_diff": err})
    return rows


def _step(reps: int) -> dict:
    import torch

    from benchmarks.bench_generate import _build
    from liedeploy import AdapterBank
    from liedeploy.bank.row_dispatch import MixedView
    from liedeploy.serving.kv_cache import cache_kwarg, cache_of

    with tempfile.TemporaryDirectory() as d:
        model, _, _, tasks, _ = _build(d, 6)
        bank = AdapterBank(model)
        for i in range(6):
            bank.add(f"t{i}", os.path.join(tasks, f"t{i}.safetensors"))
        reps_by_task = {f"t{i}": bank.model_for(f"t{i}") for i in range(6)}
    rows = [f"t{i}" for i, n in enumerate([5, 3, 2, 2, 2, 2]) for _ in range(n)]
    out = {}
    for mode in ("blas", "auto"):
        os.environ["LIEDEPLOY_ROWS"] = mode
        view = MixedView(model, reps_by_task)
        view.set_rows(rows)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 100, (16, 96), generator=g)
        mask = torch.ones(16, 96, dtype=torch.long)
        times = []
        with torch.inference_mode():
            res = view(input_ids=ids, attention_mask=mask, use_cache=True)
            key = cache_kwarg(model.model)
            cache, last = cache_of(res), res.logits[:, -1].argmax(-1)
            for i in range(10 + 3 * reps):
                mask = torch.cat([mask, torch.ones(16, 1, dtype=torch.long)], 1)
                t = time.perf_counter()
                res = view(input_ids=last[:, None], attention_mask=mask, use_cache=True, **{key: cache})
                if i >= 10:
                    times.append(time.perf_counter() - t)
                cache, last = res.past_key_values, res.logits[:, -1].argmax(-1)
        out[mode] = 1e3 * statistics.median(times)
    os.environ.pop("LIEDEPLOY_ROWS", None)
    return {"blas_ms": out["blas"], "kernel_ms": out["auto"], "ratio": out["blas"] / out["auto"]}


def main(argv=None) -> int:
    import torch

    from benchmarks._results import write_results
    from liedeploy.core import native

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    if not native.available():
        print(f"bench_rows.py needs the CPU kernels: {native.status()}", file=sys.stderr)
        return 1
    lines = [f"row-segment kernel vs one F.linear per task (+ cat), cold weights, {torch.get_num_threads()} "
             f"torch threads, medians of {args.reps}",
             f"{'dtype':9s} {'weight (out x in)':18s} {'rows per task':22s} {'BLAS us':>9s} {'kernel us':>10s} "
             f"{'ratio':>7s} {'kernel GB/s':>12s}"]
    linear = _linear(args.reps)
    for r in linear:
        lines.append(f"{r['dtype']:9s} {r['out']:>7d} x {r['in']:<8d} {str(r['segments']):22s} {r['blas_us']:9.1f} "
                     f"{r['kernel_us']:10.1f} {r['ratio']:6.2f}x {r['kernel_gb_s']:12.1f}")
    step = _step(args.reps)
    lines.append(f"decode step, bench_generate's model, 16 rows over 6 tasks: BLAS per task {step['blas_ms']:.2f} ms, "
                 f"kernel {step['kernel_ms']:.2f} ms: {step['ratio']:.2f}x")
    for dt in ("float32", "bfloat16"):
        cap = native.rows_max(getattr(torch, dt))
        multi = [r["ratio"] for r in linear if len(r["segments"]) > 1 and r["dtype"] == dt and max(r["segments"]) <= cap]
        beyond = [r["ratio"] for r in linear if len(r["segments"]) > 1 and r["dtype"] == dt and max(r["segments"]) > cap]
        lines.append(f"{dt}, several tasks of at most {cap} rows (MixedView takes the kernel): "
                     f"{min(multi):.2f}x-{max(multi):.2f}x"
                     + (f"; beyond {cap} rows (kept on BLAS): {min(beyond):.2f}x-{max(beyond):.2f}x" if beyond else "")
                     + "; "
                     f"one task of 16 rows (kept on BLAS): "
                     + ", ".join(f"{r['ratio']:.2f}x" for r in linear if len(r["segments"]) == 1 and r["dtype"] == dt))
    write_results("rows_cpu", "\n".join(lines), {"linear": linear, "step": step, "reps": args.reps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
