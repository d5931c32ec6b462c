"""SimicCallback on real SB3 PPO with a continuous (Box) action space: Pendulum-v1's diagonal
Gaussian head. Ratios, KL, clipping and the differential entropy are checked against SB3's own
logger and a float64 recomputation from the policy's log-std."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("stable_baselines3")

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env

from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.integrations.sb3 import SimicCallback, sb3_log_values
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.schema import Snapshot

# a private runtime directory and one torch thread (tiny MLPs: a second one only contends)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("sb3_runtime")]



class LogStd(BaseCallback):
    """The policy's (state-independent) log-std as it was during each rollout, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.log_stds: list[torch.Tensor] = []
        self.actions: list[torch.Tensor] = []  # the rollout buffer's (pre-clip) actions, float64

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.log_stds.append(self.model.policy.log_std.detach().double().clone())
        self.actions.append(torch.as_tensor(self.model.rollout_buffer.actions).double().clone())


def run(model: Any, updates: int, level: str = "NORMAL") -> tuple[list[Any], LogStd, SimicCallback]:
    published: list[tuple[Snapshot | None, dict[str, float]]] = []
    ref = LogStd()
    cb = SimicCallback(
        bind=None,
        strict=True,
        config=TelemetryConfig(level=TelemetryLevel[level], auto_escalate=False),
        on_update=lambda s, logged: published.append((s, logged)),
    )
    model.learn(model.n_steps * model.n_envs * updates, callback=CallbackList([ref, cb]))
    cb.close()
    return published, ref, cb


def gaussian_entropy(log_std: torch.Tensor) -> float:
    """Differential entropy of a diagonal Gaussian, float64: sum over dims of log std + log(2 pi e)/2."""
    return float(log_std.sum() + log_std.numel() * 0.5 * (1.0 + math.log(2 * math.pi)))


def test_pendulum_frozen_policy_has_unit_ratios_and_the_gaussian_entropy() -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=21)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=0.0, seed=21, device="cpu"
    )
    published, ref, cb = run(model, 2)
    assert len(published) == 2 and cb.mismatches == 0
    for (snap, logged), log_std in zip(published, ref.log_stds):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert snap.run.heads == {"action": 1} and snap.counters.telemetry_errors == 0
        # float32 Gaussian log-probs recomputed in other batch shapes: equal to ~1e-7, not bit for bit
        assert abs(p.ratio_max - 1) < 1e-5 and abs(p.ratio_min - 1) < 1e-5 and p.kl_k3_mean < 1e-11
        assert p.clip_fraction == 0.0
        assert math.isclose(p.entropy["action"], gaussian_entropy(log_std), rel_tol=1e-6)
        assert p.entropy_normalized == {}  # no normalised entropy for a continuous head
        assert math.isclose(-p.entropy["action"], logged["train/entropy_loss"], rel_tol=1e-6)
        # frozen: the log-std after the update is the rollout's
        assert p.log_std_mean == {"action": float(log_std.mean())}
        assert p.log_std_min == {"action": float(log_std.min())} and p.log_std_max == {
            "action": float(log_std.max())
        }
        assert math.isclose(p.entropy_differential["action"], gaussian_entropy(log_std), rel_tol=1e-12)
    # the share of the rollout's sampled actions beyond Pendulum's torque bounds (+-2) before clipping
    for (snap, _), actions in zip(published, ref.actions):
        assert snap is not None and snap.policy is not None
        share = float((actions.abs() > 2.0).double().mean())
        assert math.isclose(snap.policy.action_saturation["action"], share, rel_tol=1e-12, abs_tol=0.0)
        assert snap.policy.action_saturation_max["action"] == snap.policy.action_saturation["action"]


def test_pendulum_learning_matches_sb3s_logger() -> None:
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=22)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=3, learning_rate=3e-3, seed=22, device="cpu"
    )
    published, ref, cb = run(model, 3, level="DEBUG")
    assert cb.mismatches == 0
    # the log-std after update k is the one the rollout of update k + 1 sampled with
    for (snap, _), after in zip(published, ref.log_stds[1:]):
        assert snap is not None and snap.policy is not None
        assert math.isclose(snap.policy.log_std_mean["action"], float(after.mean()), rel_tol=1e-12)
        assert snap.policy.log_std_min["action"] == float(after.min())
        logged_std = sb3_log_values(snap)
        assert logged_std["simic/log_std_mean/action"] == snap.policy.log_std_mean["action"]
        assert logged_std["simic/action_saturation/action"] == snap.policy.action_saturation["action"]
        assert logged_std["simic/action_saturation_max/action"] == snap.policy.action_saturation_max["action"]
    for snap, logged in published:
        assert snap is not None and snap.policy is not None and snap.value is not None
        p = snap.policy
        assert snap.counters.telemetry_errors == 0 and snap.debug is not None
        assert p.kl_k3_mean > 0 and p.epochs == 3 and p.minibatches == 12
        assert math.isclose(p.policy_loss, logged["train/policy_gradient_loss"], rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(snap.value.value_loss, logged["train/value_loss"], rel_tol=1e-5)
        assert math.isclose(p.clip_fraction, logged["train/clip_fraction"], rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(p.kl_k3_per_epoch[-1], logged["train/approx_kl"], rel_tol=1e-3, abs_tol=1e-8)
        assert math.isclose(-p.entropy["action"], logged["train/entropy_loss"], rel_tol=1e-5)
        g = snap.gradients
        assert g is not None and g.calls == 12 and math.isfinite(g.total_norm)


def test_log_std_statistics_against_a_float64_reference() -> None:
    reducer = PolicyReducer({"arm": 1, "grip": 1})
    g = torch.Generator().manual_seed(3)
    calls = [torch.randn(6, generator=g), torch.randn(5, 6, generator=g) - 2.0, torch.randn(1, generator=g)]
    for t in calls:
        reducer.observe_log_std("arm", t.float())
    level = TelemetryLevel.NORMAL
    host = {k: v.double().reshape(-1).tolist() for k, v in reducer.pending(level).items()}
    stats = reducer.build(host, level)
    assert stats is not None
    ref = torch.cat([t.float().double().reshape(-1) for t in calls])
    assert math.isclose(stats.log_std_mean["arm"], float(ref.mean()), rel_tol=1e-12)
    assert stats.log_std_min["arm"] == float(ref.min()) and stats.log_std_max["arm"] == float(ref.max())
    assert "grip" not in stats.log_std_mean  # no log-std observed: nothing reported
    reducer.reset()
    host = {k: v.double().reshape(-1).tolist() for k, v in reducer.pending(level).items()}
    assert reducer.build(host, level).log_std_mean == {}
    with pytest.raises(ValueError, match="unknown head"):
        reducer.observe_log_std("leg", torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        reducer.observe_log_std("arm", torch.zeros(0))


def test_recurrent_ppo_on_pendulum() -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=23)
    model = sb3_contrib.RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        seed=23,
        device="cpu",
        policy_kwargs={"lstm_hidden_size": 16},
    )
    published, ref, cb = run(model, 2)
    assert cb.mismatches == 0 and len(published) == 2
    for (snap, logged), after in zip(published, ref.log_stds[1:]):
        assert snap is not None and snap.policy is not None and snap.lstm is not None
        p = snap.policy
        assert snap.counters.telemetry_errors == 0 and p.samples == 2 * 64
        assert math.isclose(p.clip_fraction, logged["train/clip_fraction"], rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(-p.entropy["action"], logged["train/entropy_loss"], rel_tol=1e-5)
        assert math.isclose(p.log_std_mean["action"], float(after.mean()), rel_tol=1e-12)
