"""Gradient statistics against a bare ``_foreach_norm``, side by side in one run (issue 2, F).

For LSTM-shaped gradient sets of about 1M, 10M and 40M parameters (an LSTM layer's two weight
matrices and two biases, a square trunk layer, actor/critic heads with biases) it times, interleaved
and repeated (medians):

* ``bare``      ``torch.stack(torch._foreach_norm(grads)).tolist()``
* ``minimal``   GradientReducer at MINIMAL: observe + pending + transfer + build
* ``normal``    the same at NORMAL (every statistic the snapshot carries)
* ``normal/8``  an update of 8 backwards at NORMAL, per backward (the per-update reduction and the
                transfer are shared by every backward of a PPO update; ``bare`` syncs every time)
* ``exact``     NORMAL with ``sample_size=None`` (every element binned; reference, not the default)

and counts host materialisations per update (``item``/``tolist``/``cpu``/``numpy``/``__bool__``/
``__float__``/``__int__``/``__index__``) with a TorchFunctionMode. On CUDA, when there is one, it
repeats the table for float16 and bfloat16 gradients.

    python benchmarks/bench_gradients.py            # about 1-2 minutes on a 2-core CPU
    python benchmarks/bench_gradients.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.gradients import GradientReducer
from telemetry_core.reductions.transfer import transfer

MATERIALISING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in MATERIALISING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def lstm_like(total: int, device: torch.device, dtype: torch.dtype) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters (with random gradients) of an LSTM policy of about ``total`` parameters."""
    h = max(8, int(math.sqrt(total / 9)))  # 2 x 4h*h (LSTM) + h*h (trunk) ~ 9 h^2
    shapes = {
        "lstm.weight_ih_l0": (4 * h, h),
        "lstm.weight_hh_l0": (4 * h, h),
        "lstm.bias_ih_l0": (4 * h,),
        "lstm.bias_hh_l0": (4 * h,),
        "trunk.weight": (h, h),
        "trunk.bias": (h,),
        "heads.direction.weight": (2, h),
        "heads.direction.bias": (2,),
        "heads.force.weight": (3, h),
        "heads.force.bias": (3,),
        "critic.weight": (1, h),
        "critic.bias": (1,),
    }
    gen = torch.Generator(device="cpu").manual_seed(total)
    named = []
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        g = torch.randn(shape, generator=gen) * 1e-3
        g[torch.rand(shape, generator=gen) < 0.05] = 0.0  # some exact zeros, like dead units
        p.grad = g.to(device=device, dtype=dtype)
        named.append((name, p))
    return named


def run_size(
    total: int, reps: int, device: torch.device, dtype: torch.dtype, exact: bool, clock: Callable[[], float]
) -> dict[str, float]:
    named = lstm_like(total, device, dtype)
    grads = [p.grad for _, p in named]
    n = sum(p.numel() for _, p in named)
    th = Thresholds()
    groups = {"lstm": [0, 1, 2, 3], "trunk": [4, 5], "heads": [6, 7, 8, 9], "critic": [10, 11]}
    fast = GradientReducer(named, max_grad_norm=0.5, thresholds=th, groups=groups)
    full = GradientReducer(named, max_grad_norm=0.5, thresholds=th, groups=groups, sample_size=None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare() -> None:
        torch.stack(torch._foreach_norm(grads)).tolist()

    def update(reducer: GradientReducer, level: TelemetryLevel, calls: int = 1) -> Callable[[], None]:
        def go() -> None:
            reducer.reset()
            for _ in range(calls):
                reducer.observe(level)
            reducer.build(transfer(reducer.pending(level)), level)

        return go

    cases: dict[str, Callable[[], None]] = {
        "bare": bare,
        "minimal": update(fast, TelemetryLevel.MINIMAL),
        "normal": update(fast, TelemetryLevel.NORMAL),
        "normal/8": update(fast, TelemetryLevel.NORMAL, 8),
    }
    if exact:
        cases["exact"] = update(full, TelemetryLevel.NORMAL)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: plans, allocator, kernels
        fn()
        fn()
    for r in range(reps):
        for name, fn in cases.items():
            if name == "exact" and r >= max(3, reps // 4):
                continue
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["normal/8"] /= 8
    syncs = {}
    for name in ("bare", "normal"):
        with SyncCounter() as counter:
            cases[name]()
        syncs[name] = counter.count
    med["_n"] = n
    med["_syncs_bare"] = syncs["bare"]
    med["_syncs_normal"] = syncs["normal"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M and 10M parameters, few repeats (seconds)")
    ap.add_argument("--no-exact", action="store_true", help="skip the every-element reference variant")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time (use with --threads 1 on a loaded machine; CPU only)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    sizes = (
        [(1_000_000, 9), (10_000_000, 3)]
        if args.quick
        else [(1_000_000, 61), (10_000_000, 21), (40_000_000, 9)]
    )
    runs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [(cuda, torch.float32), (cuda, torch.float16), (cuda, torch.bfloat16)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load:.2f}, clock {'thread CPU time' if args.cpu_time else 'wall'}"
    )
    for device, dtype in runs:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{name} {str(dtype).removeprefix('torch.')}")
        print(
            f"{'params':>11} {'bare ms':>9} {'minimal':>16} {'normal':>16} {'normal/8':>16} {'exact':>16}"
            "  syncs/update (bare, normal)"
        )
        for total, reps in sizes:
            exact = not args.no_exact and not (args.quick and total > 1_000_000)
            m = run_size(total, reps, device, dtype, exact, clock)
            b = m["bare"]

            def cell(key: str, m: dict[str, float] = m, b: float = b) -> str:
                return f"{m[key] * 1e3:8.2f} {m[key] / b:5.2f}x" if key in m else f"{'-':>15}"

            print(
                f"{int(m['_n']):>11,} {b * 1e3:9.3f} {cell('minimal'):>16} {cell('normal'):>16}"
                f" {cell('normal/8'):>16} {cell('exact'):>16}"
                f"  {int(m['_syncs_bare'])}, {int(m['_syncs_normal'])}"
            )


if __name__ == "__main__":
    main()
