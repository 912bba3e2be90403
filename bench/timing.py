"""Timing helpers shared by the benchmarks: medians, and pairs timed alternately."""

from __future__ import annotations

import os
import statistics
import time

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def median_seconds(fn, repeats=REPEATS, warmup: bool = True) -> float:
    """Median wall time of `fn` over `repeats` calls, after one untimed call unless `warmup=False`."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(fn_a, fn_b, repeats=REPEATS) -> tuple[float, float]:
    """Medians of `fn_a` and `fn_b` timed alternately after one warm-up each, so drift on a busy
    machine hits both alike."""
    a, b = interleaved_median_seconds(fn_a, fn_b, repeats=repeats)
    return a, b


def interleaved_median_seconds(*fns, repeats=REPEATS) -> list[float]:
    """Medians of each of `fns`, timed in turn (a, b, c, a, b, c, ...) after one warm-up each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]
