"""Telemetry overhead on the demo trainer: update time with no hub, OFF, MINIMAL, NORMAL and DEBUG.

Run: ``python benchmarks/bench_overhead.py [--updates 60] [--warmup 5] [--no-network] [--quick]``

One trainer per variant, same seed, all in this process, advanced *interleaved*: each round runs one
update of every variant, in an order that rotates each round, so machine load drifts hit all of them
alike. Training is identical across variants (the hub never touches the model or the random
streams; ``tests/test_demo.py`` checks it), so every variant does the same PPO work and only the
telemetry differs. Auto-escalation is disabled so each hub stays at its level. Each hub streams on
its own loopback ports (port 0) unless ``--no-network``; nobody subscribes.

Two measures, both per update:

* the update time (rollout + optimisation + telemetry, as the loop measures it): median, mean, p90,
  the ratio of medians to the no-hub baseline and to OFF, and the median of the paired per-round
  ratios to OFF (the same update of the same training, run back to back);
* the time spent inside the hub's calls (``observe_*``, ``early_stop``, ``end_update``, timed by
  wrapping the hub's methods), in ms and as a share of that variant's update: the direct cost of
  the telemetry, measured where it happens. On a loaded machine the update times of two variants
  differ by several percent from noise alone; this share does not, so it is the figure to read
  first. (It leaves out indirect effects such as caches the telemetry evicts; the paired ratio
  includes them, with its noise.)

Target (issue 5, E): NORMAL <= 1.03x OFF.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.demo.ppo import DemoConfig, UpdateRecord, iter_train, make_agent, make_hub
from telemetry_core.hub import TelemetryHub

VARIANTS = ("no hub", "OFF", "MINIMAL", "NORMAL", "DEBUG")
HUB_CALLS = (
    "observe_rollout",
    "observe_loss_terms",
    "observe_gradients",
    "observe_minibatch",
    "early_stop",
    "end_update",
)


def time_hub_calls(hub: TelemetryHub) -> list[float]:
    """Wrap the hub's per-update entry points (on this instance) to add their wall time to a counter.

    Returns the one-element list the wrappers add to; the caller reads and resets it per update.
    """
    spent = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return call

    for name in HUB_CALLS:
        setattr(hub, name, timed(getattr(hub, name)))
    return spent


def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]], DemoConfig]:
    """Update seconds and hub seconds per variant, after the warm-up updates."""
    cfg = DemoConfig(seed=args.seed, num_updates=args.updates)
    hubs: list[TelemetryHub] = []
    spent: dict[str, list[float]] = {}
    runs: dict[str, Iterator[UpdateRecord]] = {}
    for name in VARIANTS:
        agent = make_agent(cfg)
        if name == "no hub":
            runs[name] = iter_train(cfg, agent=agent)
            continue
        config = TelemetryConfig(level=TelemetryLevel[name], auto_escalate=False)
        bind = None if args.no_network else "tcp://127.0.0.1:0"
        hub = make_hub(agent, cfg, bind=bind, config=config, run_name=f"bench-{name}")
        hubs.append(hub)
        spent[name] = time_hub_calls(hub)
        runs[name] = iter_train(cfg, hub=hub, agent=agent)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    in_hub: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for update in range(1, args.updates + 1):
            shift = update % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                record = next(runs[name])
                hub_seconds = spent[name][0] if name in spent else 0.0
                if name in spent:
                    spent[name][0] = 0.0
                if update > args.warmup:
                    times[name].append(record.update_seconds)
                    in_hub[name].append(hub_seconds)
    finally:
        for iterator in runs.values():
            iterator.close()  # type: ignore[attr-defined]
        for hub in hubs:
            hub.close()
    return times, in_hub, cfg


def report(
    times: dict[str, list[float]], in_hub: dict[str, list[float]], cfg: DemoConfig, args: argparse.Namespace
) -> None:
    print(
        f"demo update time by telemetry level — {time.strftime('%Y-%m-%d %H:%M')} — "
        f"{platform.processor() or platform.machine()}, torch threads {cfg.torch_threads}, "
        f"{'no network' if args.no_network else 'loopback sockets, no subscriber'}"
    )
    print(
        f"{args.updates - args.warmup} updates per variant (after {args.warmup} warm-up), "
        f"{cfg.num_envs} envs x {cfg.num_steps} steps, {cfg.update_epochs} epochs x {cfg.num_minibatches} minibatches"
    )
    base = statistics.median(times["no hub"])
    off = statistics.median(times["OFF"])
    print(
        f"{'variant':8s} {'median ms':>10s} {'mean ms':>9s} {'p90 ms':>8s} {'vs no hub':>10s} {'vs OFF':>8s}"
        f" {'paired vs OFF':>14s} {'in hub ms':>10s} {'hub share':>10s}"
    )
    for name in VARIANTS:
        values = sorted(times[name])
        median = statistics.median(values)
        p90 = values[int(0.9 * (len(values) - 1))]
        paired = statistics.median(a / b for a, b in zip(times[name], times["OFF"]))
        hub_ms = statistics.median(in_hub[name]) * 1e3
        share = statistics.median(h / t for h, t in zip(in_hub[name], times[name]))
        print(
            f"{name:8s} {median * 1e3:10.1f} {statistics.fmean(values) * 1e3:9.1f} {p90 * 1e3:8.1f} "
            f"{median / base:9.3f}x {median / off:7.3f}x {paired:13.3f}x {hub_ms:10.2f} {share * 100:9.2f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first updates not counted")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-network", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="12 updates, 2 warm-up (a smoke run, about a minute)"
    )
    args = parser.parse_args()
    if args.quick:
        args.updates, args.warmup = 12, 2
    if args.updates <= args.warmup:
        parser.error("--updates must exceed --warmup")
    times, in_hub, cfg = run(args)
    report(times, in_hub, cfg, args)


if __name__ == "__main__":
    main()
