"""Gradient statistics against a bare ``_foreach_norm``, side by side in one run.

LSTM-shaped gradient sets of about 1M, 10M and 40M parameters (an LSTM layer's two weight matrices
and two biases, a square trunk layer, actor/critic heads with biases); columns and method in
benchmarks/README.md, figures in BENCHMARKS.md.

    python benchmarks/bench_gradients.py            # a few minutes on a 2-core CPU
    python benchmarks/bench_gradients.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
from _timing import PairStats, describe, paired
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.debug import DebugDiagnostics
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
    total: int, pairs: int, device: torch.device, dtype: torch.dtype, exact: bool
) -> tuple[dict[str, PairStats], dict[str, float]]:
    named = lstm_like(total, device, dtype)
    grads = [p.grad for _, p in named]
    n = sum(p.numel() for _, p in named)
    th = Thresholds()
    groups = {"lstm": [0, 1, 2, 3], "trunk": [4, 5], "heads": [6, 7, 8, 9], "critic": [10, 11]}
    fast = GradientReducer(named, max_grad_norm=0.5, thresholds=th, groups=groups)
    full = GradientReducer(named, max_grad_norm=0.5, thresholds=th, groups=groups, sample_size=None)
    schedule = DebugDiagnostics(named, thresholds=th, max_grad_norm=0.5).table_every  # the hub's default
    never = DebugDiagnostics(named, thresholds=th, max_grad_norm=0.5, table_every=10**9)
    every = DebugDiagnostics(named, thresholds=th, max_grad_norm=0.5, table_every=1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare() -> None:
        torch.stack(torch._foreach_norm(grads)).tolist()

    def update(
        reducer: GradientReducer, level: TelemetryLevel, calls: int = 1, debug: DebugDiagnostics | None = None
    ) -> Callable[[], None]:
        def go() -> None:
            reducer.reset()
            if debug is not None:
                debug.reset(level)
            for _ in range(calls):
                reducer.observe(level)
                if debug is not None:
                    debug.observe_gradients()
            pending = reducer.pending(level)
            if debug is not None:
                pending.update(debug.pending(level))
            host = transfer(pending)  # one transfer, as in the hub
            reducer.build(host, level)
            if debug is not None:
                debug.build(host, level)

        return go

    debug = TelemetryLevel.DEBUG
    cases: dict[str, Callable[[], None]] = {
        "bare": bare,
        "minimal": update(fast, TelemetryLevel.MINIMAL),
        "normal": update(fast, TelemetryLevel.NORMAL),
        "normal/8": update(fast, TelemetryLevel.NORMAL, 8),
        "debug-": update(fast, debug, 1, never),
        "debug-/8": update(fast, debug, 8, never),
        "table": update(fast, debug, 1, every),
    }
    if exact:
        cases["exact"] = update(full, TelemetryLevel.NORMAL)
    per = {"normal/8": 8, "debug-/8": 8}
    stats = paired(cases, "bare", pairs, sync=sync, per=per)
    syncs = {}
    for name in ("bare", "normal", "debug-/8"):
        with SyncCounter() as counter:
            cases[name]()
        syncs[name] = counter.count
    info = {
        "n": n,
        "bare_ms": statistics.median(s.base_seconds for s in stats.values()) * 1e3,
        "syncs_bare": syncs["bare"],
        "syncs_normal": syncs["normal"],
        "syncs_debug": syncs["debug-/8"],
        "table_every": schedule,
    }
    return stats, info


COLUMNS = ("minimal", "normal", "normal/8", "debug-", "debug-/8", "table", "exact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M and 10M parameters, few pairs (seconds)")
    ap.add_argument("--no-exact", action="store_true", help="skip the every-element reference variant")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated parameter counts, e.g. 1e6,4e7")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per size (default: by size)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sizes:
        sizes = [(int(float(x)), args.pairs or 9) for x in args.sizes.split(",")]
    elif args.quick:
        sizes = [(1_000_000, args.pairs or 9), (10_000_000, args.pairs or 3)]
    else:
        sizes = [(1_000_000, args.pairs or 41), (10_000_000, args.pairs or 15), (40_000_000, args.pairs or 7)]
    runs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [(cuda, torch.float32), (cuda, torch.float16), (cuda, torch.bfloat16)]
    print(describe())
    print(
        "ratios to bare torch.stack(torch._foreach_norm(grads)).tolist(); /8: per backward in an update "
        "of 8 backwards; debug-: DEBUG without the per-layer table's element statistics; table: DEBUG "
        "with them on every backward; DEBUG amortised: the hub's default, the table on every "
        "table_every-th backward; exact: NORMAL, every element binned"
    )
    for device, dtype in runs:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{name} {str(dtype).removeprefix('torch.')}")
        for total, pairs in sizes:
            exact = not args.no_exact and not (args.quick and total > 1_000_000)
            stats, info = run_size(total, pairs, device, dtype, exact)
            print(
                f"{int(info['n']):,} parameters, bare {info['bare_ms']:.3f} ms, {pairs} pairs, "
                f"table_every {info['table_every']}, host syncs per update (bare, normal, debug/8): "
                f"{info['syncs_bare']}, {info['syncs_normal']}, {info['syncs_debug']}"
            )
            for col in COLUMNS:
                if col in stats:
                    st = stats[col]
                    print(f"  {col:>9}: {st.cell()}  ({st.seconds * 1e3:.2f} ms)")
            # DEBUG as the hub runs it: the table on every table_every-th backward of the run, so per
            # backward it adds (table - debug-) / table_every on average to what every backward costs
            k, table = info["table_every"], stats["table"].ratio[1]
            for col, label in (("debug-", "one backward"), ("debug-/8", "per backward in 8")):
                amortised = stats[col].ratio[1] + (table - stats["debug-"].ratio[1]) / k
                print(f"  DEBUG amortised, {label}: {amortised:.2f}x")


if __name__ == "__main__":
    main()
