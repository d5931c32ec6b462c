"""Stable-Baselines3's PPO with its default hyper-parameters on CartPole-v1, streamed through
:class:`telemetry_core.integrations.sb3.SimicCallback`, with the injections done by SB3's own knobs.

``PPO("MlpPolicy", "CartPole-v1")``: one environment, ``n_steps`` 2048, ``batch_size`` 64, 10 epochs
(320 minibatches per update), learning rate 3e-4, ``ent_coef`` 0, ``max_grad_norm`` 0.5, no
``target_kl``, unnormalised returns (CartPole's +1 per step: values of order 50 and pre-clip
gradient norms of 17-36 from the first update). Only the seed and ``device="cpu"`` are set.

:class:`SB3Injection` is a callback that acts where SB3 lets a real slip happen:

=====================  ======================================================================
injection              mechanism (at update ``onset``; one-shot unless said)
=====================  ======================================================================
entropy-collapse       ``model.ent_coef`` = -0.5 from onset on (read by ``train()``)
kl-spike               ``model.lr_schedule`` returns 40x for that update's ``train()``
ratio-explosion        the rollout buffer's stored ``log_probs`` x 8 between rollout and ``train()``
                       (the demo's mechanism: old log-probs that do not belong to the acting policy)
value-collapse         ``policy.value_net`` zeroed before the rollout
nan-gradients          one environment's *reward* becomes NaN half-way through the rollout
exploding-gradients    ``policy.value_net`` weights x100 before the rollout
=====================  ======================================================================

NaN: SB3 samples with ``torch.distributions.Categorical``, which raises on a NaN observation's NaN
logits inside the rollout, before any update reaches the telemetry; a NaN reward (a sensor glitch
in the reward channel) passes the rollout and makes the update's advantages, loss and gradients
NaN. SB3 has no guard against non-finite gradients, so the NaN weights then stop the next rollout
with an exception: the harness records it (the onset update was published before it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from stable_baselines3.common.callbacks import BaseCallback

from telemetry_core.demo.inject import RatioExplosion

__all__ = ["SB3_INJECTIONS", "SB3Injection", "run_sb3"]

SB3_INJECTIONS = (
    "entropy-collapse",
    "kl-spike",
    "ratio-explosion",
    "value-collapse",
    "nan-gradients",
    "exploding-gradients",
)


class SB3Injection(BaseCallback):
    """Arms one pathology at update ``onset`` (1-based, as the hub's steps); ``fired`` lists the
    updates at which its mechanism acted."""

    def __init__(self, kind: str, onset: int) -> None:
        super().__init__()
        if kind not in SB3_INJECTIONS:
            raise ValueError(f"unknown SB3 injection {kind!r}; choose one of {', '.join(SB3_INJECTIONS)}")
        self.kind = kind
        self.onset = onset
        self.update = 0
        self.fired: list[int] = []
        self._lr_factor = 1.0

    def _on_training_start(self) -> None:
        base: Callable[[float], float] = self.model.lr_schedule
        self.model.lr_schedule = lambda progress: base(progress) * self._lr_factor

    def _on_rollout_start(self) -> None:
        self._lr_factor = 1.0
        self.update = self.model.num_timesteps // (self.model.n_steps * self.model.n_envs) + 1
        if self.update != self.onset:
            return
        value_net = self.model.policy.value_net
        with torch.no_grad():
            if self.kind == "value-collapse":
                value_net.weight.zero_()
                value_net.bias.zero_()
                self.fired.append(self.update)
            elif self.kind == "exploding-gradients":
                value_net.weight.mul_(100.0)
                value_net.bias.mul_(100.0)
                self.fired.append(self.update)

    def _on_step(self) -> bool:
        if self.kind == "nan-gradients" and self.update == self.onset:
            done = self.model.num_timesteps % (self.model.n_steps * self.model.n_envs)
            if done == self.model.n_steps // 2 * self.model.n_envs:
                self.locals["rewards"][0] = math.nan  # the array SB3 adds to its buffer next
                self.fired.append(self.update)
        return True

    def _on_rollout_end(self) -> None:
        if self.kind == "entropy-collapse" and self.update >= self.onset:
            self.model.ent_coef = -0.5
            self.fired.append(self.update)
        if self.update != self.onset:
            return
        if self.kind == "kl-spike":
            self._lr_factor = 40.0
            self.fired.append(self.update)
        elif self.kind == "ratio-explosion":
            # read by train() through the buffer's get(); the weights are untouched
            self.model.rollout_buffer.log_probs *= RatioExplosion.repeat
            self.fired.append(self.update)


def run_sb3(
    seed: int,
    updates: int,
    *,
    injection: str | None = None,
    onset: int | None = None,
    record: str | None = None,
    run_name: str = "sb3-ppo-default",
    on_update: Callable[[Any, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train SB3's default PPO for ``updates`` updates (x 2048 steps); return what happened.

    Returns ``fired`` (updates at which the injection acted), ``crashed`` (the exception that
    stopped training, or None) and ``seconds``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList

    from telemetry_core.integrations.sb3 import SimicCallback

    model = PPO("MlpPolicy", "CartPole-v1", seed=seed, device="cpu")
    simic = SimicCallback(bind=None, record=record, run_name=run_name, on_update=on_update)
    callbacks: list[BaseCallback] = [simic]
    inject = None
    if injection is not None:
        inject = SB3Injection(injection, onset if onset is not None else 1)
        callbacks.insert(0, inject)  # acts before the telemetry sees the rollout
    started = time.perf_counter()
    crashed = None
    try:
        model.learn(updates * model.n_steps * model.n_envs, callback=CallbackList(callbacks))
    except Exception as exc:  # SB3 has no NaN guard: the run dies after a NaN update
        crashed = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    finally:
        simic.close()  # the callback's hub outlives learn() (chunked training): end it here
    return {
        "fired": list(dict.fromkeys(inject.fired)) if inject is not None else [],
        "crashed": crashed,
        "seconds": time.perf_counter() - started,
    }
