"""Timing helper shared by the benchmark scripts: medians of repeated runs."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_time"]


def median_time(fn, reps: int, setup=None, warmup: int = 0) -> tuple[float, list]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed (``setup`` untimed before each).

    Returns ``(median seconds, all timings)``.
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times
