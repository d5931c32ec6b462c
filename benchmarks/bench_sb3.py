"""SimicCallback overhead on Stable-Baselines3 PPO: update time with no callback vs OFF / MINIMAL /
NORMAL / DEBUG, side by side in one run.

Run: ``python benchmarks/bench_sb3.py [--rounds 6] [--env cartpole|factored|recurrent] [--n-steps 2048]``

SB3's default PPO hyper-parameters (n_steps 2048, batch 64, 10 epochs: 320 minibatches per update,
one environment) on CartPole-v1 (``--env factored``: the demo's MultiDiscrete([2, 3]) CartPole,
adding a NORMAL variant without head ratios to price their extra forward pass; ``--env recurrent``:
sb3-contrib RecurrentPPO, n_steps 128 x 4 envs, batch 128). One model per variant, same seed, each
advanced one update per round by ``learn(n_steps, reset_num_timesteps=False)``, in an order that
rotates each round, so machine load drifts hit all of them alike. Auto-escalation is off; hubs do
not bind a socket. Prints per variant the median update time, the median ``train()`` time (the
optimisation phase, where the callback works; the rollout is the same for all) and the medians of
the paired per-round ratios to the no-callback model.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.integrations.sb3 import SimicCallback, heads_from_action_space, sb3_groups


def build(env: str, n_steps: int, seed: int) -> Any:
    if env == "recurrent":
        from sb3_contrib import RecurrentPPO

        venv = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
        return RecurrentPPO("MlpLstmPolicy", venv, n_steps=n_steps, batch_size=128, seed=seed, device="cpu")
    if env == "factored":
        from telemetry_core.demo.env import make_env

        venv = make_vec_env(make_env, n_envs=1, seed=seed)
    else:
        venv = make_vec_env("CartPole-v1", n_envs=1, seed=seed)
    return PPO("MlpPolicy", venv, n_steps=n_steps, seed=seed, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="first rounds not counted")
    parser.add_argument("--env", choices=["cartpole", "factored", "recurrent"], default="cartpole")
    parser.add_argument("--n-steps", type=int, default=None, help="default: 2048 (recurrent: 128)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_steps = args.n_steps or (128 if args.env == "recurrent" else 2048)

    variants: dict[str, tuple[Any, SimicCallback | None]] = {}
    names = ["no callback", "OFF", "MINIMAL", "NORMAL", "DEBUG"]
    if args.env == "factored":
        names.insert(4, "NORMAL no head ratios")
    hubs = []
    for name in names:
        model = build(args.env, n_steps, args.seed)
        if name == "no callback":
            variants[name] = (model, None)
            continue
        level = name.split()[0]
        hub = TelemetryHub(
            model.policy,
            heads=heads_from_action_space(model.action_space),
            max_grad_norm=model.max_grad_norm,
            config=TelemetryConfig(level=TelemetryLevel[level], auto_escalate=False),
            bind=None,
            groups=sb3_groups(model.policy),
            lstm=getattr(model.policy, "lstm_actor", None),
        )
        hubs.append(hub)
        variants[name] = (model, SimicCallback(hub, head_ratios="no head ratios" not in name))

    train_time: dict[str, float] = {}
    for name, (model, _) in variants.items():
        original = model.train

        def timed(original: Any = original, name: str = name) -> None:
            t0 = time.perf_counter()
            original()
            train_time[name] = time.perf_counter() - t0

        model.train = timed  # type: ignore[method-assign]

    update_s: dict[str, list[float]] = {n: [] for n in names}
    train_s: dict[str, list[float]] = {n: [] for n in names}
    rollout = n_steps * variants["no callback"][0].n_envs
    for r in range(args.rounds + args.warmup):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model, cb = variants[name]
            t0 = time.perf_counter()
            model.learn(rollout, callback=cb, reset_num_timesteps=r == 0)
            if r >= args.warmup:
                update_s[name].append(time.perf_counter() - t0)
                train_s[name].append(train_time[name])
    for hub in hubs:
        hub.close()

    base_u, base_t = update_s["no callback"], train_s["no callback"]
    print(
        f"SB3 {args.env}: n_steps {n_steps}, {args.rounds} rounds, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    )
    print(f"{'variant':24s} {'update s':>9s} {'train s':>8s} {'update/no cb':>13s} {'train/no cb':>12s}")
    for name in names:
        u, t = update_s[name], train_s[name]
        ru = statistics.median(a / b for a, b in zip(u, base_u))
        rt = statistics.median(a / b for a, b in zip(t, base_t))
        print(f"{name:24s} {statistics.median(u):9.3f} {statistics.median(t):8.3f} {ru:13.3f} {rt:12.3f}")


if __name__ == "__main__":
    main()
