"""Timing helpers shared by the benchmark scripts (run as scripts, so their folder is on sys.path).

The method (every benchmark prints it with :func:`describe`): the candidate and its baseline run as
an adjacent pair, in alternating order from one pair to the next, so a load change from the other
jobs on the machine hits both alike; each run is timed with this thread's CPU time
(``time.thread_time``, the benchmark sets ``torch.set_num_threads(1)``) and with the wall clock
beside it; the figure is the median of the per-pair ratios, with their interquartile range.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["METHOD", "PairStats", "describe", "interleaved", "paired", "quartiles"]

METHOD = (
    "method: adjacent pairs (baseline, candidate) in alternating order; thread CPU time "
    "(time.thread_time, torch intra-op threads 1) with wall time beside it; median and IQR "
    "(25th-75th percentile) of the per-pair ratios"
)


def describe() -> str:
    """Machine, load and software, for the header of a benchmark's output."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')} | {cpu}, {os.cpu_count()} CPUs{mem} | load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | python {platform.python_version()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s)\n{METHOD}"
    )


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


@dataclass
class PairStats:
    """One candidate against its baseline over the pairs."""

    ratio: tuple[float, float, float]  # thread CPU time ratio: q1, median, q3
    mean_ratio: float  # ... mean: what an occasional cost (a schedule) adds on average
    wall_ratio: tuple[float, float, float]  # wall-clock ratio: q1, median, q3
    seconds: float  # median thread CPU seconds of the candidate
    base_seconds: float  # median thread CPU seconds of the baseline (over its pairs with this one)
    pairs: int

    def cell(self) -> str:
        q1, med, q3 = self.ratio
        return f"{med:6.2f}x ({q1:.2f}-{q3:.2f}) mean {self.mean_ratio:.2f}x wall {self.wall_ratio[1]:.2f}x"


def paired(
    cases: dict[str, Callable[[], object]],
    baseline: str,
    pairs: int,
    *,
    sync: Callable[[], object] | None = None,
    warmup: int = 2,
    per: dict[str, int] | None = None,
) -> dict[str, PairStats]:
    """Time every case against ``baseline`` in adjacent pairs of alternating order (see the module
    docstring). Each case's pairs are spread over the whole run, round-robin with the others.
    ``per[name]``: that case does ``n`` units of the baseline's work (e.g. 8 backwards): its times
    and ratios are divided by ``n``."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    done = sync or (lambda: None)

    def run(fn: Callable[[], object]) -> tuple[float, float]:
        done()
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        done()
        return time.thread_time() - c0, time.perf_counter() - w0

    others = [k for k in cases if k != baseline]
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in others}
    wall: dict[str, list[tuple[float, float]]] = {k: [] for k in others}
    for i in range(pairs):
        for j, name in enumerate(others):
            if (i + j) % 2 == 0:
                b, c = run(cases[baseline]), run(cases[name])
            else:
                c, b = run(cases[name]), run(cases[baseline])
            cpu[name].append((b[0], c[0]))
            wall[name].append((b[1], c[1]))
    out = {}
    for name in others:
        n = (per or {}).get(name, 1)
        ratios = [c / n / b for b, c in cpu[name] if b > 0]
        wall_ratios = [c / n / b for b, c in wall[name] if b > 0]
        out[name] = PairStats(
            ratio=quartiles(ratios),
            mean_ratio=statistics.fmean(ratios) if ratios else float("nan"),
            wall_ratio=quartiles(wall_ratios),
            seconds=statistics.median(c / n for _, c in cpu[name]),
            base_seconds=statistics.median(b for b, _ in cpu[name]),
            pairs=len(ratios),
        )
    return out


def interleaved(
    cases: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per case, run round-robin so load drifts hit every case alike (one warm-up
    call each first). For absolute times; ratios come from :func:`paired`."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}
