"""One compute thread against torch work on two threads: the decode engine of `serve --hf-model`.

torch on CPU runs its parallel regions on an OpenMP team per calling thread; GNU OpenMP stops
spin-waiting once its pooled threads outnumber the cores. This measures what that costs the decode
engine, each layout in a fresh process (OpenMP teams live as long as their thread):

- one thread: the model is built, folded and decoded on one thread (what ``liedeploy serve`` does);
- two threads: the model is built on the main thread and decoded on the engine's own thread.

Workload: bench_generate's LLaMA-like config, 1 task, 16 sequences of 64-token prompts and 64 new
tokens (greedy), in process (no HTTP); 3 timed rounds after a warm-up, median tokens/s.

    python benchmarks/bench_threads.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _measure(layout: str) -> list:
    import asyncio
    import concurrent.futures as cf
    import tempfile
    import time

    import numpy as np

    from benchmarks.bench_generate import _build
    from liedeploy import AdapterBank
    from liedeploy.serving.generate import GenerationParams, Generator

    def setup(engine_thread):
        d = tempfile.mkdtemp()
        model, tok, _, tasks, _ = _build(d, 1)
        bank = AdapterBank(model, adapters={"t0": os.path.join(tasks, "t0.safetensors")})
        return Generator(bank, tok, max_sequences=16, max_new_tokens=64, engine_thread=engine_thread)

    if layout == "one":
        compute = cf.ThreadPoolExecutor(1)
        gen = compute.submit(setup, False).result()
        compute.submit(gen.engine.run)
    else:
        gen = setup(True)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 500, 64)] for _ in range(16)]

    async def run():
        seqs = [gen.start("t0", p, GenerationParams(64, 0.0, 1.0, None, [])) for p in prompts]
        t0 = time.perf_counter()
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - t0)

    asyncio.run(run())  # warm-up
    rates = [asyncio.run(run()) for _ in range(3)]
    gen.engine.close()
    return rates


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--layout":
        print(json.dumps(_measure(sys.argv[2])))
        return 0
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    for layout in ("one", "two", "one", "two"):  # interleaved, each in a fresh process
        proc = subprocess.run([sys.executable, __file__, "--layout", layout], capture_output=True, text=True, env=env,
                              check=True)
        out.setdefault(layout, []).extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(v) for k, v in out.items()}
    lines = ["decode engine, 1 task, 16 sequences x 64 tokens, in process; tokens/s, medians of 6 rounds (range)",
             "| layout | tokens/s |", "|---|---|"]
    names = {"one": "model built, folded and decoded on one thread", "two": "model built on the main thread, decoded on another"}
    for k in ("one", "two"):
        lines.append(f"| {names[k]} | {med[k]:.0f} ({min(out[k]):.0f}-{max(out[k]):.0f}) |")
    lines.append(f"one thread / two threads: {med['one'] / med['two']:.2f}x")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", "threads_cpu.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "threads_cpu.json"), "w") as f:
        json.dump({"rounds": out, "median": med, "ratio": med["one"] / med["two"]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
