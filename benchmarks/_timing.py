"""Shared by the micro-benchmarks in this folder."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """fn() once to warm up, then the median wall time of `repeats` more calls, in seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)
