"""How much of bench_serve's 1,000-task workload the bank's task cache can keep, one cache or split.

    python benchmarks/sim_cache_split.py [--requests 60000] [--seeds 5]

A replay of the request stream alone (no timing, no batching): Zipf(1.1) over 1,000 tasks, every
task the size of one slot, through :class:`liedeploy.bank.task_cache.TaskCache` (the server's
default policy: decayed use counts, TinyLFU admission). Compared:

- one cache of 11 tasks (bench_serve's 0.5 GB budget over 45 MB tasks: one server process) and of 10;
- two caches of 5 (``serve --processes 2``: each process has half the budget), a cold task placed
  as the server places it (in the cache holding fewer tasks, either one on a tie);
- the same two caches with cold tasks placed by global popularity when both are full (in the cache
  whose least used task is used least over all requests): a rule considered for the server.

Prints the misses per request (a miss is a fold), medians over ``--seeds`` request streams, and
the static optimum (the most popular tasks kept forever). Writes
benchmarks/results/sim_cache_split.{txt,json}.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS, ZIPF = 1000, 1.1


def _one(reqs, slots: int) -> float:
    from liedeploy.bank.task_cache import TaskCache

    cache, miss = TaskCache(limit=slots), 0
    for t in reqs:
        cache.record(t)
        if t in cache:
            cache.touch(t)
            continue
        miss += 1
        out = cache.victims(t, 1)
        if out is None:  # not admitted: served once
            continue
        for k in out:
            cache.pop(k)
        cache.put(t, 1)
    return miss / len(reqs)


def _split(reqs, slots: int, rule: str, rng: random.Random) -> float:
    from liedeploy.bank.task_cache import TaskCache

    caches, seen, miss = [TaskCache(limit=slots) for _ in range(2)], TaskCache(), 0
    for t in reqs:
        seen.record(t)
        home = [c for c in caches if t in c]
        if home:
            home[0].record(t)
            home[0].touch(t)
            continue
        miss += 1
        fewest = min(len(c) for c in caches)
        pick = [c for c in caches if len(c) == fewest]
        if rule == "global" and len(pick) == len(caches) and fewest > 0:
            cheapest = [min(seen.uses(k) for k in c.keys()) for c in caches]
            pick = [c for c, v in zip(caches, cheapest) if v == min(cheapest)]
        cache = rng.choice(pick)
        cache.record(t)
        out = cache.victims(t, 1)
        if out is None:
            continue
        for k in out:
            cache.pop(k)
        cache.put(t, 1)
    return miss / len(reqs)


def main(argv=None) -> int:
    from benchmarks._results import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60000)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    weights = [i ** -ZIPF for i in range(1, TASKS + 1)]
    total = sum(weights)
    rows = {"one cache of 11 (one process)": [], "one cache of 10": [],
            "two caches of 5, placed by count (serve --processes 2)": [],
            "two caches of 5, placed by global popularity when full": []}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        reqs = rng.choices(range(TASKS), weights=weights, k=args.requests)
        rows["one cache of 11 (one process)"].append(_one(reqs, 11))
        rows["one cache of 10"].append(_one(reqs, 10))
        rows["two caches of 5, placed by count (serve --processes 2)"].append(_split(reqs, 5, "count", rng))
        rows["two caches of 5, placed by global popularity when full"].append(_split(reqs, 5, "global", rng))
    med = {k: statistics.median(v) for k, v in rows.items()}
    static = {n: 1 - sum(weights[:n]) / total for n in (10, 11)}
    lines = [f"Zipf({ZIPF}) over {TASKS} tasks, {args.requests} requests, medians of {args.seeds} streams; "
             "misses (folds) per request",
             f"{'cache':58s} {'misses':>7s} {'min-max':>13s}"]
    for k, v in rows.items():
        lines.append(f"{k:58s} {med[k]:7.3f} {min(v):6.3f}-{max(v):.3f}")
    lines.append(f"{'static optimum, 11 / 10 most popular kept':58s} {static[11]:7.3f} / {static[10]:.3f}")
    write_results("sim_cache_split", "\n".join(lines), {"requests": args.requests, "seeds": args.seeds,
                                                        "runs": rows, "median": med, "static": static})
    return 0


if __name__ == "__main__":
    sys.exit(main())
