"""The demo task: CartPole where memory matters and the action is factored into two heads.

Two changes to gymnasium's ``CartPole-v1`` make it a task for a *recurrent, multi-head* policy:

* **Velocities removed** (:class:`PositionOnly`): the observation is ``(x, theta)`` only, each divided
  by its termination limit (2.4 m, 12 degrees) so both lie in [-1, 1]. Cart and pole velocities are
  not observable; a policy must infer them from successive observations, i.e. remember. A memoryless
  policy that pushes the way the pole leans survives only a few dozen steps.
* **Factored action** (:class:`ForceLevels`): ``MultiDiscrete([2, 3])`` = direction (left, right) x
  force level. The level really changes the physics: before every step the wrapper sets the
  underlying ``CartPole.force_mag`` to ``base_force * levels[level]`` (default 10 N x 0.5 / 1.0 /
  1.5), which is the force the Euler integrator applies that step. Choosing the level well (small
  corrections near upright, hard pushes when falling) is part of the task.

Vector environments come from gymnasium: :func:`make_vector_env` builds a ``SyncVectorEnv`` with
``AutoresetMode.SAME_STEP`` (the observation returned at a terminal step is already the first one of
the next episode, as a PPO rollout buffer expects) wrapped in ``RecordEpisodeStatistics``, which
reports finished episodes' returns and lengths in ``info["episode"]``. On this 2-core CPU a
``SyncVectorEnv`` is faster than an ``AsyncVectorEnv`` for CartPole (``benchmarks/bench_demo_learning.py``
measures both): a CartPole step costs microseconds, far less than inter-process messaging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics

__all__ = [
    "ACTION_HEADS",
    "DEFAULT_FORCE_LEVELS",
    "ENV_ID",
    "ForceLevels",
    "PositionOnly",
    "make_env",
    "make_vector_env",
]

ENV_ID = "CartPole-v1"
DEFAULT_FORCE_LEVELS: tuple[float, ...] = (0.5, 1.0, 1.5)
# Name and size of each action head, in the order of the MultiDiscrete action vector.
ACTION_HEADS: dict[str, int] = {"direction": 2, "force": len(DEFAULT_FORCE_LEVELS)}


class PositionOnly(gym.ObservationWrapper):
    """Keep cart position and pole angle, scaled by their termination limits; drop both velocities."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        cartpole = env.unwrapped
        self._scale = np.array(
            [1.0 / cartpole.x_threshold, 1.0 / cartpole.theta_threshold_radians], dtype=np.float32
        )
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return (np.asarray(observation, dtype=np.float32)[[0, 2]] * self._scale).astype(np.float32)


class ForceLevels(gym.Wrapper):
    """Action ``[direction, level]``: push left/right with ``base_force * levels[level]`` newtons.

    The force is written into the unwrapped CartPole's ``force_mag`` right before each step, which is
    exactly the magnitude its dynamics use (``force = force_mag if action == 1 else -force_mag``).
    """

    def __init__(self, env: gym.Env, levels: Sequence[float] = DEFAULT_FORCE_LEVELS) -> None:
        super().__init__(env)
        if len(levels) < 2 or any(not np.isfinite(v) or v <= 0 for v in levels):
            raise ValueError(f"levels must be >= 2 positive finite force multipliers, got {levels!r}")
        self.levels = tuple(float(v) for v in levels)
        self.base_force = float(env.unwrapped.force_mag)
        self.action_space = gym.spaces.MultiDiscrete([2, len(self.levels)])

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        direction, level = (int(a) for a in np.asarray(action).reshape(-1)[:2])
        if direction not in (0, 1) or not 0 <= level < len(self.levels):
            raise ValueError(f"action must be [direction in 0..1, level in 0..{len(self.levels) - 1}]")
        self.env.unwrapped.force_mag = self.base_force * self.levels[level]
        return self.env.step(direction)


def make_env(levels: Sequence[float] = DEFAULT_FORCE_LEVELS, max_episode_steps: int = 500) -> gym.Env:
    """One demo environment: CartPole-v1, velocities hidden, factored direction x force action."""
    env = gym.make(ENV_ID, max_episode_steps=max_episode_steps)
    return ForceLevels(PositionOnly(env), levels)


def make_vector_env(
    num_envs: int,
    levels: Sequence[float] = DEFAULT_FORCE_LEVELS,
    max_episode_steps: int = 500,
) -> gym.vector.VectorEnv:
    """``num_envs`` demo environments, same-step autoreset, episode statistics recorded.

    Seed them with ``envs.reset(seed=s)`` (environment i gets ``s + i``).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    factories: list[Callable[[], gym.Env]] = [
        lambda: make_env(levels, max_episode_steps) for _ in range(num_envs)
    ]
    envs = SyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP)
    return RecordEpisodeStatistics(envs)
