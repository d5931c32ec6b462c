"""SimicCallback inside SB3's habits: its statistics in SB3's own logger (CSV / TensorBoard at SB3's
timesteps), a recording exported on SB3's timesteps lining up with SB3's own TensorBoard, its hub
state saved and restored beside ``model.save`` / ``PPO.load``, and the update a NaN breaks published
before SB3's exception ends ``learn()``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import gymnasium as gym
import pytest

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

from telemetry_core import protocol
from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.integrations.sb3 import SimicCallback
from telemetry_core.record import read_recording
from telemetry_core.schema import Snapshot

# a private runtime directory and one torch thread (tiny MLPs: a second one only contends)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("sb3_runtime")]


def rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("target_kl", [None, 0.002])
def test_key_statistics_reach_sb3s_logger_at_its_timesteps(tmp_path: Path, target_kl: float | None) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=11)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=32,
        n_epochs=4,
        learning_rate=3e-3,
        target_kl=target_kl,
        seed=11,
        device="cpu",
    )
    model.set_logger(configure(str(tmp_path), ["csv"]))
    published: list[Snapshot] = []
    cb = SimicCallback(
        bind=None,
        config=TelemetryConfig(level=TelemetryLevel.NORMAL, auto_escalate=False),
        on_update=lambda s, _: published.append(s) if s is not None else None,
    )
    model.learn(128 * 4, callback=cb)
    cb.close()
    logged = [r for r in rows(tmp_path / "progress.csv") if "train/approx_kl" in r]
    # SB3 dumps an update's train/* at the next iteration's dump: the last update is never written
    assert len(logged) == 3 and len(published) == 4
    stopped = 0
    for row, snap in zip(logged, published):
        p = snap.policy
        assert p is not None and snap.gradients is not None
        assert row["time/total_timesteps"] == 128 * (snap.step + 1)  # SB3's x-axis, same row as train/*
        # SB3's approx_kl is the k3 of the last epoch that ran, wherever target_kl stopped
        assert math.isclose(row["simic/kl_k3_last_epoch"], row["train/approx_kl"], rel_tol=1e-3, abs_tol=1e-8)
        assert row["simic/kl_k3_last_epoch"] == p.kl_k3_per_epoch[-1]
        assert row["simic/kl_k1_last_epoch"] == p.kl_k1_per_epoch[-1]
        assert math.isclose(
            row["simic/clip_fraction"], row["train/clip_fraction"], rel_tol=1e-6, abs_tol=1e-9
        )
        assert math.isclose(row["simic/entropy/action"], -row["train/entropy_loss"], rel_tol=1e-5)
        assert row["simic/grad_norm_preclip"] == snap.gradients.total_norm
        assert row["simic/anomalies_critical"] == sum(a.severity == "critical" for a in snap.anomalies)
        stopped += p.early_stopped
    if target_kl is not None:
        assert stopped > 0  # the last epoch really moved with the early stop
    else:
        assert stopped == 0


def test_no_logging_when_turned_off(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=12)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=12, device="cpu")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    with SimicCallback(bind=None, log_to_sb3=False) as cb:
        model.learn(64 * 3, callback=cb)
    logged = rows(tmp_path / "progress.csv")
    assert logged and not any(k.startswith("simic/") for r in logged for k in r)


def test_hub_state_is_saved_and_restored_beside_the_model(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=13)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=13, device="cpu")
    cb = SimicCallback(bind=None)
    with pytest.raises(RuntimeError, match="no hub yet"):
        cb.save(tmp_path / "early.json")
    model.learn(128 * 3, callback=cb)
    assert cb.hub is not None
    saved = cb.hub.state_dict()
    assert saved["detector"]["updates"] == 3 and saved["ema"]["main"]["count"] > 0
    model.save(tmp_path / "ppo.zip")
    cb.save(tmp_path / "ppo.simic.json")
    cb.close()

    loaded = PPO.load(tmp_path / "ppo.zip", env=env, device="cpu")
    steps: list[int] = []
    restored: list[dict] = []

    def first_update(snap: Snapshot | None, _: dict[str, float]) -> None:
        assert snap is not None
        steps.append(snap.step)

    cb2 = SimicCallback(bind=None, on_update=first_update)
    cb2.load(tmp_path / "ppo.simic.json")  # no hub yet: applied when learn() builds it
    original_start = cb2._on_training_start

    def capture_start() -> None:
        original_start()
        assert cb2.hub is not None
        restored.append(cb2.hub.state_dict())

    cb2._on_training_start = capture_start  # type: ignore[method-assign]
    loaded.learn(128 * 2, callback=cb2, reset_num_timesteps=False)
    assert restored[0] == saved  # the restored hub starts exactly where the saved one stopped
    assert steps == [4, 5]
    assert cb2.hub is not None and cb2.hub.state_dict()["detector"]["updates"] == 5

    # into an open hub at once; a state of other heads or another file is refused
    cb2.load(tmp_path / "ppo.simic.json")
    assert cb2.hub.state_dict()["detector"]["updates"] == 3
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a SimicCallback state file"):
        cb2.load(tmp_path / "other.json")
    cb2.close()
    multi = make_vec_env("CartPole-v1", n_envs=1, seed=14)
    other = PPO("MlpPolicy", multi, n_steps=32, batch_size=32, n_epochs=1, device="cpu")
    cb3 = SimicCallback(bind=None, head_names=["push"])
    cb3.load(tmp_path / "ppo.simic.json")
    with pytest.raises(ValueError, match="saved state is for heads"):
        other.learn(32, callback=cb3)
    cb3.close()


def test_an_export_on_timesteps_lines_up_with_sb3s_own_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from telemetry_core.integrations.tensorboard import export_recording

    env = make_vec_env("CartPole-v1", n_envs=2, seed=15)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        learning_rate=3e-3,
        seed=15,
        device="cpu",
        tensorboard_log=str(tmp_path / "sb3"),
    )
    cb = SimicCallback(
        bind=None,
        record=tmp_path / "run.simrec",
        config=TelemetryConfig(level=TelemetryLevel.NORMAL, auto_escalate=False),
    )
    model.learn(64 * 4, callback=cb, tb_log_name="ppo")
    cb.close()
    assert export_recording(tmp_path / "run.simrec", tmp_path / "tb", x="timesteps") == 4
    sb3 = EventAccumulator(str(tmp_path / "sb3" / "ppo_1"), size_guidance={"scalars": 0})
    ours = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    sb3.Reload()
    ours.Reload()
    exported = {e.step: e.value for e in ours.Scalars("policy/kl_k3_last_epoch")}
    # update k trains on the rollout ending at 64 k; SB3 writes its train/* at its next dump, 64 (k + 1)
    assert sorted(exported) == [128, 192, 256, 320]
    live = {e.step: e.value for e in sb3.Scalars("simic/kl_k3_last_epoch")}
    approx_kl = {e.step: e.value for e in sb3.Scalars("train/approx_kl")}
    assert sorted(live) == sorted(approx_kl) == [128, 192, 256]  # SB3 never dumps the last update
    for step, value in live.items():
        assert exported[step] == value  # the same update at the same x, both float32 of one float64
        assert math.isclose(exported[step], approx_kl[step], rel_tol=1e-3, abs_tol=1e-8)
    clip = {e.step: e.value for e in sb3.Scalars("train/clip_fraction")}
    ours_clip = {e.step: e.value for e in ours.Scalars("policy/clip_fraction")}
    for step, value in clip.items():
        assert math.isclose(ours_clip[step], value, rel_tol=1e-6, abs_tol=1e-7)


class NanReward(gym.Wrapper):
    """A NaN reward at one environment step (counted over the whole run)."""

    def __init__(self, env: gym.Env, at: int) -> None:
        super().__init__(env)
        self.at, self.t = at, 0

    def step(self, action):  # type: ignore[no-untyped-def]
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        return obs, (math.nan if self.t == self.at else reward), terminated, truncated, info


def test_the_update_a_nan_reward_breaks_is_published_before_sb3_raises(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=3, wrapper_class=NanReward, wrapper_kwargs={"at": 100})
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=3, device="cpu")
    published: list[Snapshot] = []
    cb = SimicCallback(
        bind=None,
        record=tmp_path / "nan.simrec",
        on_update=lambda s, _: published.append(s) if s is not None else None,
    )
    # the NaN reward (rollout 2) makes the first minibatch's loss and gradients NaN, the optimizer
    # step makes the weights NaN, and the second minibatch's Categorical refuses NaN logits
    with pytest.raises(ValueError, match="logits"):
        model.learn(64 * 4, callback=cb)
    assert [s.step for s in published] == [1, 2]
    healthy, onset = published
    assert not any(a.kind == "numerical_instability" for a in healthy.anomalies)
    assert ("numerical_instability", "critical") in {(a.kind, a.severity) for a in onset.anomalies}
    assert onset.gradients is not None and math.isnan(onset.gradients.total_norm)
    assert onset.policy is not None and onset.policy.minibatches == 1  # what train() did before raising
    assert onset.counters.telemetry_errors == 0
    # the callback's wrappers left with learn(): SB3's own methods again
    assert "train" not in model.__dict__ and "evaluate_actions" not in model.policy.__dict__
    cb.close()
    frames = read_recording(tmp_path / "nan.simrec").frames
    assert [protocol.decode_envelope(f).step for f in frames] == [1, 2]
