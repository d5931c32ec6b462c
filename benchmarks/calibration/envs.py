"""The calibration agents' environments: gymnasium's Acrobot-v1 three ways, and CartPole-v1 for SB3.

Acrobot is unlike the demo's CartPole in the ways that matter to the detector's limits: a reward of
-1 per step until the tip swings above the bar (returns of -500 at first, about -80 once solved,
never positive), episodes that end by time limit until the policy learns, three actions (torque
-1, 0, +1), and unnormalised returns of order 100 that make the critic's gradient large.

* ``acrobot``: the plain task (six observations: cos/sin of both joint angles and both angular
  velocities), for a feed-forward policy.
* ``acrobot-po``: :class:`MaskVelocities` keeps the four cos/sin entries and drops both angular
  velocities, so a policy must infer them from successive observations (a recurrent one).
* ``acrobot-factored``: :class:`FactoredTorque` makes the action two decisions, ``[push, direction]``
  = ``MultiDiscrete([2, 2])``: no torque when ``push`` is 0 (``direction`` then does nothing),
  otherwise -1 or +1 by ``direction``. One head of the policy often does not matter, which the
  per-head entropy and ratio rules have to live with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics

__all__ = ["ENVS", "FactoredTorque", "MaskVelocities", "make_env", "make_vector_env"]


class MaskVelocities(gym.ObservationWrapper):
    """Acrobot without its two angular velocities: ``(cos t1, sin t1, cos t2, sin t2)``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)[:4]


class FactoredTorque(gym.ActionWrapper):
    """``[push, direction]`` -> Acrobot's torque index: 1 (no torque) unless pushing, then 0 or 2."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.MultiDiscrete([2, 2])

    def action(self, action: Any) -> int:
        push, direction = (int(a) for a in np.asarray(action).reshape(-1)[:2])
        return 1 if push == 0 else 2 * direction


# Environment name -> (factory, action heads in the order of the action vector).
ENVS: dict[str, tuple[Callable[[], gym.Env], dict[str, int]]] = {
    "acrobot": (lambda: gym.make("Acrobot-v1"), {"torque": 3}),
    "acrobot-po": (lambda: MaskVelocities(gym.make("Acrobot-v1")), {"torque": 3}),
    "acrobot-factored": (lambda: FactoredTorque(gym.make("Acrobot-v1")), {"push": 2, "direction": 2}),
}


def make_env(name: str) -> gym.Env:
    return ENVS[name][0]()


def make_vector_env(name: str, num_envs: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies, same-step autoreset (as a PPO rollout buffer expects), episode statistics."""
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENVS)}")
    factories = [ENVS[name][0] for _ in range(num_envs)]
    return RecordEpisodeStatistics(SyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP))
