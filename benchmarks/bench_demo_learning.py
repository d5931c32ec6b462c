"""Learning curve of the demo trainer: what return it reaches after how many updates and seconds.

Run: ``python benchmarks/bench_demo_learning.py [--seeds 1 2 3] [--updates 300]``

Prints, per seed, a row every ``--every`` updates (wall time, environment steps, rolling mean of the
finished episodes' returns over 10 updates) and, at the end, the updates and seconds each seed took
to first reach a rolling mean of 100, 200 and 400 (CartPole-v1's ceiling is 500). Random play
scores about 22. Telemetry is off (``hub=None``): this measures the trainer alone.

It also measures, side by side, the environment step rate of gymnasium's ``SyncVectorEnv`` and
``AsyncVectorEnv`` for the demo task (8 environments, random actions), which is why the trainer uses
the synchronous one on this 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry_core.demo.env import make_env, make_vector_env
from telemetry_core.demo.ppo import DemoConfig, iter_train

MILESTONES = (100.0, 200.0, 400.0)


def env_rates(num_envs: int = 8, steps: int = 2000) -> dict[str, float]:
    """Environment steps per second (all envs counted) for Sync and Async vector envs."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    rates: dict[str, float] = {}
    actions = np.zeros((num_envs, 2), dtype=np.int64)
    for name in ("sync", "async"):
        if name == "sync":
            envs = make_vector_env(num_envs)
        else:
            envs = gym.vector.AsyncVectorEnv(
                [make_env for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP
            )
        envs.reset(seed=0)
        for _ in range(50):
            envs.step(actions)
        start = time.perf_counter()
        for _ in range(steps):
            envs.step(actions)
        rates[name] = steps * num_envs / (time.perf_counter() - start)
        envs.close()
    return rates


def run_seed(seed: int, updates: int, every: int) -> list[tuple[int, float, int, float]]:
    rows: list[tuple[int, float, int, float]] = []
    returns: list[float] = []
    for record in iter_train(DemoConfig(seed=seed, num_updates=updates)):
        returns.append(record.episode_return)
        recent = [r for r in returns[-10:] if math.isfinite(r)]
        rolling = float(np.mean(recent)) if recent else math.nan
        rows.append((record.update, record.seconds, record.global_step, rolling))
        if record.update % every == 0 or record.update == updates:
            print(
                f"  seed {seed}  update {record.update:4d}  {record.seconds:7.1f} s  "
                f"{record.global_step:7d} steps  rolling return {rolling:6.1f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--skip-env-rates", action="store_true")
    args = parser.parse_args()

    print(
        f"demo learning curve — {time.strftime('%Y-%m-%d %H:%M')} — {platform.processor() or platform.machine()}"
    )
    print(f"config: {DemoConfig(num_updates=args.updates)}")
    if not args.skip_env_rates:
        rates = env_rates()
        print(
            f"env steps/s (8 envs, random actions): SyncVectorEnv {rates['sync']:,.0f}  "
            f"AsyncVectorEnv {rates['async']:,.0f}  (sync/async = {rates['sync'] / rates['async']:.2f}x)"
        )
    table = []
    for seed in args.seeds:
        rows = run_seed(seed, args.updates, args.every)
        reached = []
        for milestone in MILESTONES:
            hit = next((r for r in rows if math.isfinite(r[3]) and r[3] >= milestone), None)
            reached.append(f"{hit[0]:4d} upd / {hit[1]:6.1f} s" if hit else "   not reached   ")
        first = rows[min(9, len(rows) - 1)][3]
        final = rows[-1]
        table.append((seed, first, final, reached))
    print()
    header = "  ".join(f"return >= {m:.0f}".ljust(17) for m in MILESTONES)
    print(f"seed  rolling@10  final rolling  updates  seconds   {header}")
    for seed, first, final, reached in table:
        print(
            f"{seed:4d}  {first:10.1f}  {final[3]:13.1f}  {final[0]:7d}  {final[1]:7.1f}   "
            + "  ".join(reached)
        )


if __name__ == "__main__":
    main()
