"""Telemetry overhead on the demo trainer: the whole update at NORMAL and DEBUG against OFF.

Run: ``python benchmarks/bench_overhead.py [--updates 40] [--warmup 5] [--no-network] [--all]``

Method, columns and figures: benchmarks/README.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _timing import describe, quartiles

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
    """Wrap the hub's per-update entry points (on this instance) to add their thread CPU time to a counter.

    Returns the one-element list the wrappers add to; the caller reads and resets it per update.
    """
    spent = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - start

        return call

    for name in HUB_CALLS:
        setattr(hub, name, timed(getattr(hub, name)))
    return spent


ORDERS = (("NORMAL", "OFF", "DEBUG"), ("DEBUG", "OFF", "NORMAL"))  # OFF adjacent to both, sides alternate


def run(args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float, float]]], DemoConfig, bool]:
    """Per variant and update (after the warm-up): (thread CPU s, wall s, thread CPU s in the hub)."""
    cfg = DemoConfig(seed=args.seed, num_updates=args.updates)
    hubs: list[TelemetryHub] = []
    spent: dict[str, list[float]] = {}
    runs: dict[str, Iterator[UpdateRecord]] = {}
    agents = {}
    variants = [v for v in VARIANTS if v in ORDERS[0]] + (["no hub", "MINIMAL"] if args.all else [])
    for name in variants:
        agent = agents[name] = make_agent(cfg)
        if name == "no hub":
            runs[name] = iter_train(cfg, agent=agent)
            continue
        config = TelemetryConfig(level=TelemetryLevel[name], auto_escalate=False)
        bind = None if args.no_network else "tcp://127.0.0.1:0"
        hub = make_hub(agent, cfg, bind=bind, config=config, run_name=f"bench-{name}")
        hubs.append(hub)
        spent[name] = time_hub_calls(hub)
        runs[name] = iter_train(cfg, hub=hub, agent=agent)

    out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    try:
        for update in range(1, args.updates + 1):
            order = list(ORDERS[update % 2]) + [v for v in variants if v not in ORDERS[0]]
            for name in order:
                c0, w0 = time.thread_time(), time.perf_counter()
                next(runs[name])
                cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
                hub_seconds = spent[name][0] if name in spent else 0.0
                if name in spent:
                    spent[name][0] = 0.0
                if update > args.warmup:
                    out[name].append((cpu, wall, hub_seconds))
    finally:
        for iterator in runs.values():
            iterator.close()  # type: ignore[attr-defined]
        for hub in hubs:
            hub.close()
    ref = [p.detach() for p in agents["OFF"].parameters()]
    identical = all(
        all(torch.equal(a, b.detach()) for a, b in zip(ref, agent.parameters())) for agent in agents.values()
    )
    return out, cfg, identical


def report(
    out: dict[str, list[tuple[float, float, float]]],
    cfg: DemoConfig,
    identical: bool,
    args: argparse.Namespace,
) -> None:
    print(f"bench_overhead | {describe()}")
    print(
        f"demo trainer, torch threads {cfg.torch_threads}, "
        f"{'no network' if args.no_network else 'loopback sockets, no subscriber'}; "
        f"{args.updates - args.warmup} updates per variant (after {args.warmup} warm-up), "
        f"{cfg.num_envs} envs x {cfg.num_steps} steps, {cfg.update_epochs} epochs x {cfg.num_minibatches} "
        f"minibatches; the pair of a round is OFF's update and the other variant's same update, run back "
        f"to back, the other first in one round and second in the next"
    )
    print(f"training bit-identical across variants (final parameters equal): {'yes' if identical else 'NO'}")
    off = out["OFF"]
    print(
        f"{'variant':8s} {'update ms (CPU)':>16s} {'ratio to OFF, CPU: median (IQR)':>34s} "
        f"{'wall':>7s} {'in hub ms (CPU)':>16s} {'hub share':>10s}"
    )
    for name, rows in out.items():
        cpu = [r[0] for r in rows]
        hub = [r[2] for r in rows]
        line = f"{name:8s} {statistics.median(cpu) * 1e3:16.1f} "
        if name == "OFF":
            line += f"{'-':>34s} {'-':>7s} "
        else:
            q1, med, q3 = quartiles([a[0] / b[0] for a, b in zip(rows, off)])
            wall = statistics.median(a[1] / b[1] for a, b in zip(rows, off))
            line += f"{med:17.3f}x ({q1:.3f}-{q3:.3f}) {wall:6.3f}x "
        share = (
            statistics.median(h / c for h, c in zip(hub, cpu))
            if name in ("OFF", "NORMAL", "DEBUG", "MINIMAL")
            else 0
        )
        line += f"{statistics.median(hub) * 1e3:16.2f} {share * 100:9.2f}%"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first updates not counted")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-network", action="store_true")
    parser.add_argument("--all", action="store_true", help="also time no hub and MINIMAL (after the pairs)")
    parser.add_argument(
        "--quick", action="store_true", help="12 updates, 2 warm-up (a smoke run, about a minute)"
    )
    args = parser.parse_args()
    if args.quick:
        args.updates, args.warmup = 12, 2
    if args.updates <= args.warmup:
        parser.error("--updates must exceed --warmup")
    out, cfg, identical = run(args)
    report(out, cfg, identical, args)


if __name__ == "__main__":
    main()
