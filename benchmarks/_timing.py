"""Timing helper shared by the benchmark scripts (run as scripts, so their folder is on sys.path)."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved(
    cases: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per case, run round-robin so load drifts hit every case alike (one warm-up
    call each first)."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}
