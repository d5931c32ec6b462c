"""Telemetry overhead on the demo trainer: update time with no hub, OFF, MINIMAL, NORMAL and DEBUG.

Run: ``python benchmarks/bench_overhead.py [--updates 60] [--warmup 5] [--no-network]``

One trainer per variant, same seed, all in this process, advanced *interleaved*: each round runs one
update of every variant, in an order that rotates each round, so machine load drifts hit all of them
alike. Training is identical across variants (the hub never touches the model or the random
streams; ``tests/test_demo.py`` checks it), so every variant does the same PPO work and only the
telemetry differs. Auto-escalation is disabled so each hub stays at its level. Each hub streams on
its own loopback ports (port 0) unless ``--no-network``; nobody subscribes.

Prints per variant the median and mean update time (rollout + optimisation + telemetry, as the loop
measures it), the ratio of medians to the no-hub baseline and to OFF, and the median of the paired
per-round ratios to OFF (the same update of the same training, run back to back: the most robust
figure on a loaded machine). Target: NORMAL <= 1.03x OFF.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.demo.ppo import DemoConfig, UpdateRecord, iter_train, make_agent, make_hub

VARIANTS = ("no hub", "OFF", "MINIMAL", "NORMAL", "DEBUG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first updates not counted")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-network", action="store_true")
    args = parser.parse_args()

    cfg = DemoConfig(seed=args.seed, num_updates=args.updates)
    hubs = []
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
        runs[name] = iter_train(cfg, hub=hub, agent=agent)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for update in range(1, args.updates + 1):
            shift = update % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]
            for name in order:
                record = next(runs[name])
                if update > args.warmup:
                    times[name].append(record.update_seconds)
    finally:
        for run in runs.values():
            run.close()
        for hub in hubs:
            hub.close()

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
    )
    for name in VARIANTS:
        values = sorted(times[name])
        median = statistics.median(values)
        p90 = values[int(0.9 * (len(values) - 1))]
        paired = statistics.median(a / b for a, b in zip(times[name], times["OFF"]))
        print(
            f"{name:8s} {median * 1e3:10.1f} {statistics.fmean(values) * 1e3:9.1f} {p90 * 1e3:8.1f} "
            f"{median / base:9.3f}x {median / off:7.3f}x {paired:13.3f}x"
        )


if __name__ == "__main__":
    main()
