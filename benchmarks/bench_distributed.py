"""Cost of the cross-rank aggregation per update, against the update's time (gloo, CPU, 2 and 4 ranks).

Run: ``python benchmarks/bench_distributed.py [--ranks 2 4] [--updates 24] [--quick]``

Each configuration starts real processes in a gloo group (torch.multiprocessing, forkserver). Every
rank trains the demo's recurrent PPO data-parallel (its own environments, gradients averaged in one
all_reduce per minibatch) and holds *two* hubs on the same agent: one aggregating across ranks
(``distributed=True``) and one not (``distributed=False``), both at NORMAL without auto-escalation
and without sockets. Updates alternate between them in ABBA blocks, so machine load hits both alike,
and every rank follows the same schedule (the aggregating hub's collective must run on all ranks).

Printed, from rank 0, medians over the measured updates:

* ``update``: the whole update as the loop measures it (rollout, optimisation, telemetry);
* ``end_update`` with and without aggregation, and their difference: what aggregation adds to the
  training thread (the vector built from the pending tensors, the all_gather, RankStats and the
  judge), as a share of the update;
* ``all_gather``: the collective alone (it includes waiting for the slowest rank to arrive);
* a microbenchmark: one all_gather of the L-float vector against L separate scalar all_gathers.

The machine this project runs on has 2 cores shared by several engineers, and 4 ranks oversubscribe
it; numbers taken there are preliminary.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


class _Switch:
    """Forwards the loop's hub calls to whichever of two hubs this update uses, timing end_update."""

    def __init__(self, on: Any, off: Any) -> None:
        self.hubs = {"on": on, "off": off}
        self.current = "off"
        self.end_seconds: dict[str, list[float]] = {"on": [], "off": []}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hubs[self.current], name)

    def end_update(self, step: int, **kwargs: Any) -> Any:
        t = time.perf_counter()
        snap = self.hubs[self.current].end_update(step, **kwargs)
        self.end_seconds[self.current].append(time.perf_counter() - t)
        return snap


def _worker(rank: int, world: int, updates: int, warmup: int, out: str, env_steps: int) -> None:
    import torch.distributed as dist

    from telemetry_core.config import TelemetryConfig
    from telemetry_core.demo.ppo import DemoConfig, iter_train, make_agent, make_hub

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    cfg = DemoConfig(num_updates=updates, num_steps=env_steps, target_kl=None)
    agent = make_agent(cfg)
    quiet = TelemetryConfig(auto_escalate=False)
    on = make_hub(agent, cfg, bind=None, config=quiet, distributed=True, run_name="on")
    off = make_hub(agent, cfg, bind=None, config=TelemetryConfig(auto_escalate=False), distributed=False)
    switch = _Switch(on, off)
    gather_seconds: list[float] = []
    real_launch = on._ranks.launch

    def timed_launch(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        result = real_launch(*args, **kwargs)
        gather_seconds.append(time.perf_counter() - t)
        return result

    on._ranks.launch = timed_launch
    update_seconds: dict[str, list[float]] = {"on": [], "off": []}
    for u, record in enumerate(iter_train(cfg, hub=switch, agent=agent), start=1):  # type: ignore[arg-type]
        if u > warmup:
            update_seconds[switch.current].append(record.update_seconds)
        switch.current = "on" if (u // 2) % 2 == 0 else "off"  # ABBA blocks of 2, same on every rank
    for name in ("on", "off"):
        switch.end_seconds[name] = switch.end_seconds[name][warmup // 2 :]

    # microbenchmark: one vector vs one collective per statistic
    L = len(on._ranks.layout)
    vec = torch.randn(L, dtype=torch.float64)
    buf = torch.empty(world * L, dtype=torch.float64)
    one = torch.empty(world, dtype=torch.float64)
    reps = 200
    single: list[float] = []
    separate: list[float] = []
    for _ in range(5):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_gather_single(buf, vec)
        single.append((time.perf_counter() - t) / reps)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps // 10):
            for i in range(L):
                dist.all_gather_single(one, vec[i : i + 1])
        separate.append((time.perf_counter() - t) / (reps // 10))
    on.close()
    off.close()
    if rank == 0:
        med = statistics.median
        upd = med(update_seconds["on"] + update_seconds["off"])
        end_on, end_off = med(switch.end_seconds["on"]), med(switch.end_seconds["off"])
        gather = med(gather_seconds[warmup // 2 :])
        lines = [
            f"ranks {world}: {len(update_seconds['on'])}+{len(update_seconds['off'])} updates measured "
            f"({cfg.num_envs} envs x {cfg.num_steps} steps per rank, {L} floats per rank per update)",
            f"  update              {upd * 1e3:8.1f} ms  (median of both hubs' updates; their medians "
            f"differ by machine noise, not by the aggregation: see the paired line below)",
            f"  end_update off/on   {end_off * 1e3:8.2f} / {end_on * 1e3:.2f} ms",
            f"  aggregation adds    {(end_on - end_off) * 1e3:8.2f} ms = {(end_on - end_off) / upd:.4f} of the update",
            f"  launch (vector + all_gather, incl. waiting for the slowest rank) {gather * 1e3:.2f} ms = "
            f"{gather / upd:.4f} of the update",
            f"  microbench: one all_gather of {L} floats {med(single) * 1e3:.3f} ms; {L} scalar all_gathers "
            f"{med(separate) * 1e3:.3f} ms ({med(separate) / med(single):.1f}x)",
        ]
        Path(out, "report.txt").write_text("\n".join(lines))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--updates", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=128, help="rollout steps per environment (default 128)")
    parser.add_argument("--quick", action="store_true", help="8 updates of 32 steps: a smoke check")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.warmup, args.steps = 8, 2, 32
    multiprocessing.set_forkserver_preload(
        [
            "torch",
            "torch.distributed",
            "torch._dynamo",  # Adam imports it on first use: 8 s per rank on a loaded machine
            "telemetry_core.hub",
            "telemetry_core.transport",
            "telemetry_core.demo.ppo",
        ]
    )
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo on CPU, one torch thread per rank")
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            torch.multiprocessing.start_processes(
                _worker,
                args=(world, args.updates, args.warmup, out, args.steps),
                nprocs=world,
                start_method="forkserver",
            )
            print(Path(out, "report.txt").read_text(), flush=True)


if __name__ == "__main__":
    main()
