"""The decode engine in process, without HTTP: what `serve --hf-model` could give before streaming.

Workload: bench_generate's LLaMA-like config and budget (50 MB of folded tasks), 16 sequences of
64-token prompts and 64 new tokens each (greedy), submitted together with ``Generator.start`` and
awaited with ``Generator.complete`` on one event loop, the model built, folded and decoded on one
compute thread (as the server does). 1 task, and 10 registered tasks with the 16 requests spread
over 9 of them as a Zipf draw would (5, 3, 2, 1, 1, 1, 1, 1, 1). A warm-up round, then ``--rounds``
timed rounds, each setting in a fresh process; median tokens/s. 10 tasks also with
``LIEDEPLOY_ROWS=blas`` (one BLAS call per task in each Linear instead of the row-segment kernel),
in the same run. ``--dtype bfloat16`` runs the model (and so its folded tasks) in bfloat16, as a
bf16 checkpoint loads; results then go to engine_bfloat16_cpu.{txt,json}.

    python benchmarks/bench_engine.py [--rounds 5]

Compare with bench_generate.py's server figures: the difference is the HTTP streaming and the
clients sharing the cores. Writes benchmarks/results/engine_cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPREAD = (0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8)  # the task of each of the 16 requests


def _measure(n_tasks: int, rounds: int, dtype: str = "float32") -> list:
    import asyncio
    import concurrent.futures as cf
    import tempfile
    import time

    import numpy as np
    import torch

    from benchmarks.bench_generate import _build
    from liedeploy import AdapterBank
    from liedeploy.serving.generate import GenerationParams, Generator

    def setup():
        d = tempfile.mkdtemp()
        model, tok, _, tasks, _ = _build(d, 10, getattr(torch, dtype))
        bank = AdapterBank(model, adapters={f"t{i}": os.path.join(tasks, f"t{i}.safetensors") for i in range(10)},
                           cache_bytes=50_000_000)
        return Generator(bank, tok, max_sequences=16, max_new_tokens=64, engine_thread=False)

    compute = cf.ThreadPoolExecutor(1)
    gen = compute.submit(setup).result()
    compute.submit(gen.engine.run)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 500, 64)] for _ in range(16)]
    tasks = ["t0"] * 16 if n_tasks == 1 else [f"t{i}" for i in SPREAD]

    async def run():
        seqs = [gen.start(t, p, GenerationParams(64, 0.0, 1.0, None, [])) for t, p in zip(tasks, prompts)]
        t0 = time.perf_counter()
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - t0)

    asyncio.run(run())  # warm-up: folds, first allocations
    rates = [asyncio.run(run()) for _ in range(rounds)]
    gen.engine.close()
    return rates


def main() -> int:
    from benchmarks._results import write_results

    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        print(json.dumps(_measure(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype (bfloat16: as a bf16 checkpoint loads)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    settings = {"1": (1, "auto"), "10": (10, "auto"), "10, LIEDEPLOY_ROWS=blas": (10, "blas")}
    for name in ("10", "10, LIEDEPLOY_ROWS=blas", "1"):
        n, rows = settings[name]
        proc = subprocess.run([sys.executable, __file__, "--measure", str(n), str(args.rounds), args.dtype],
                              capture_output=True,
                              text=True, env=dict(env, LIEDEPLOY_ROWS=rows), check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [f"decode engine in process (no HTTP), {args.dtype} model, 16 sequences x 64 new tokens, greedy; tokens/s, median of "
             f"{args.rounds} rounds (range)", "| tasks | tokens/s |", "|---|---|"]
    for name in settings:
        lines.append(f"| {name} | {statistics.median(out[name]):.0f} ({min(out[name]):.0f}-{max(out[name]):.0f}) |")
    lines.append(f"10 tasks: row-segment kernel / one BLAS call per task: "
                 f"{statistics.median(out['10']) / statistics.median(out['10, LIEDEPLOY_ROWS=blas']):.2f}x")
    write_results("engine_cpu" if args.dtype == "float32" else f"engine_{args.dtype}_cpu", "\n".join(lines), {"rounds": out, "median": {n: statistics.median(v) for n, v in out.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
