"""SimicCallback on real Stable-Baselines3 training: PPO on CartPole and on the demo's factored
(MultiDiscrete) CartPole, sb3-contrib RecurrentPPO, a real socket once.

Every published statistic is compared with what SB3 itself logged for the same update and with a
float64 recomputation from the rollout buffer a separate reference callback copied."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
sb3_contrib = pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402
from stable_baselines3 import A2C, PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from telemetry_core import protocol  # noqa: E402
from telemetry_core.config import TelemetryConfig, TelemetryLevel  # noqa: E402
from telemetry_core.demo.env import make_env  # noqa: E402
from telemetry_core.hub import TelemetryHub  # noqa: E402
from telemetry_core.integrations.sb3 import SimicCallback, heads_from_action_space, sb3_groups  # noqa: E402
from telemetry_core.schema import Ack, Snapshot  # noqa: E402

RecurrentPPO = sb3_contrib.RecurrentPPO

# a private runtime directory and one torch thread (tiny MLPs: a second one only contends)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("sb3_runtime")]



class Reference(BaseCallback):
    """Copies what the rollout really was, independently of SimicCallback: the buffer's arrays
    (float64), the episodes that ended (from ``dones`` and SB3's own ``ep_info_buffer``) and the
    actor LSTM state at each update boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[dict[str, Any]] = []
        self.states: list[tuple[np.ndarray, np.ndarray]] = []
        self._ended = 0

    def _on_step(self) -> bool:
        self._ended += int(np.sum(self.locals["dones"]))
        return True

    def _on_rollout_start(self) -> None:
        self._capture_state()

    def _on_training_end(self) -> None:
        self._capture_state()

    def _capture_state(self) -> None:
        states = getattr(self.model, "_last_lstm_states", None)
        if states is not None and self.rollouts:
            h, c = states.pi
            self.states.append((h.double().numpy().copy(), c.double().numpy().copy()))

    def _on_rollout_end(self) -> None:
        buf = self.model.rollout_buffer
        eps = list(self.model.ep_info_buffer)[-self._ended :] if self._ended else []
        self.rollouts.append(
            {
                "adv": buf.advantages.astype(np.float64).copy(),
                "ret": buf.returns.astype(np.float64).copy(),
                "val": buf.values.astype(np.float64).copy(),
                "episodes": self._ended,
                "ep_returns": [float(e["r"]) for e in eps],
                "ep_lengths": [float(e["l"]) for e in eps],
            }
        )
        self._ended = 0


def run(
    model: Any, updates: int, *, level: str = "NORMAL", **cb_kwargs: Any
) -> tuple[list[tuple[Snapshot | None, dict[str, float]]], Reference, SimicCallback]:
    published: list[tuple[Snapshot | None, dict[str, float]]] = []
    cb_kwargs.setdefault("bind", None)
    cb_kwargs.setdefault("strict", True)
    cb_kwargs.setdefault("config", TelemetryConfig(level=TelemetryLevel[level], auto_escalate=False))
    simic = SimicCallback(on_update=lambda s, logged: published.append((s, logged)), **cb_kwargs)
    ref = Reference()
    model.learn(model.n_steps * model.n_envs * updates, callback=CallbackList([ref, simic]))
    return published, ref, simic


def close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def check_rollout_stats(snap: Snapshot, ref: dict[str, Any]) -> None:
    adv, ret, val = ref["adv"].ravel(), ref["ret"].ravel(), ref["val"].ravel()
    a = snap.advantage
    assert a is not None and a.raw.count == adv.size
    assert close(a.raw.mean, adv.mean(), 1e-9, 1e-9) and close(a.raw.std, adv.std(), 1e-9, 1e-9)
    assert a.raw.min == adv.min() and a.raw.max == adv.max()
    assert close(a.returns.mean, ret.mean(), 1e-9, 1e-9) and a.returns.max == ret.max()
    v = snap.value
    assert v is not None
    assert close(v.value_mean, val.mean(), 1e-9, 1e-9) and close(v.value_std, val.std(), 1e-9, 1e-9)
    assert v.explained_variance is not None
    assert close(v.explained_variance, 1 - np.var(ret - val) / np.var(ret), 1e-9, 1e-9)
    e = snap.episodes
    assert e is not None and e.count == ref["episodes"] == len(ref["ep_returns"])
    if e.count:
        assert close(e.return_mean, float(np.mean(ref["ep_returns"])), 1e-9)
        assert e.return_max == max(ref["ep_returns"]) and e.return_min == min(ref["ep_returns"])
        assert close(e.length_mean, float(np.mean(ref["ep_lengths"])), 1e-9)


def check_against_sb3_log(snap: Snapshot, logged: dict[str, float]) -> None:
    """The callback's numbers equal SB3's own train/* values of the same update."""
    p, v = snap.policy, snap.value
    assert p is not None and v is not None
    assert close(p.policy_loss, logged["train/policy_gradient_loss"])
    assert close(v.value_loss, logged["train/value_loss"])
    assert close(p.clip_fraction, logged["train/clip_fraction"], 1e-6, 1e-9)
    # SB3's approx_kl: mean over the last epoch's minibatches of the float32 k3 mean
    assert close(p.kl_k3_per_epoch[-1], logged["train/approx_kl"], 1e-3, 1e-8)
    assert close(-sum(p.entropy.values()), logged["train/entropy_loss"], 1e-5)
    assert v.explained_variance is not None
    assert close(v.explained_variance, logged["train/explained_variance"], 1e-4, 1e-5)
    assert p.clip_range == logged["train/clip_range"]


# ---------------------------------------------------------------------------------------------


def test_ppo_cartpole_streams_minibatch_statistics_equal_to_sb3_and_the_buffer() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=3, seed=0, device="cpu")
    published, ref, cb = run(model, 3, record=None)
    assert [s.step for s, _ in published if s is not None] == [1, 2, 3]
    assert cb.mismatches == 0 and not model.policy.__dict__.get("evaluate_actions")
    for (snap, logged), rollout in zip(published, ref.rollouts):
        assert snap is not None
        p = snap.policy
        assert p is not None
        assert p.epochs == 3 and p.minibatches == 12 and p.samples == 3 * 128 and p.clip_range == 0.2
        assert len(p.kl_k3_per_epoch) == 3 and p.kl_k3_per_epoch[0] > 0  # the policy moved in epoch 0
        assert 0 < p.entropy_normalized["action"] <= 1
        assert len(p.entropy_normalized_per_epoch["action"]) == 3
        assert p.entropy_coef == model.ent_coef == 0.0  # SB3's default, read from the model
        g = snap.gradients
        assert g is not None and g.calls == 12 and math.isfinite(g.total_norm) and g.total_norm > 0
        assert snap.run.heads == {"action": 2} and snap.run.name == "sb3-PPO"
        assert set(snap.run.groups) == {"actor", "critic"}
        assert snap.counters.telemetry_errors == 0
        check_against_sb3_log(snap, logged)
        check_rollout_stats(snap, rollout)


def test_gradients_are_observed_before_sb3_clips_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine callback sees the norm clip_grad_norm_ returns (pre-clip) for every backward; the
    alternative hook, optimizer.step, only ever sees the clipped gradients."""
    env = make_vec_env("CartPole-v1", n_envs=2, seed=1)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, max_grad_norm=0.05, seed=1, device="cpu"
    )
    returned: list[float] = []
    at_step: list[float] = []
    original_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        norm = original_clip(params, max_norm, *args, **kwargs)
        returned.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    optimizer = model.policy.optimizer
    original_step = optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for p in model.policy.parameters() if p.grad is not None]
        at_step.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return original_step(*args, **kwargs)

    optimizer.step = recording_step  # type: ignore[method-assign]
    published, _, _ = run(model, 2, level="DEBUG")
    seen = [
        n
        for s, _ in published
        if s is not None and s.debug is not None
        for n in s.debug.numerical.pre_clip_norms
    ]
    assert len(seen) == len(returned) == 2 * 2 * 2
    np.testing.assert_allclose(seen, returned, rtol=1e-5)
    assert min(returned) > 0.05  # every backward was clipped ...
    assert max(at_step) <= 0.05 * (1 + 1e-4)  # ... so gradients at optimizer.step are post-clip
    for snap, _ in published:
        assert snap is not None and snap.gradients is not None
        assert snap.gradients.clip_rate == 1.0 and snap.gradients.total_norm_max > 0.05


def test_multidiscrete_heads_are_aligned_with_the_buffer_rows() -> None:
    """With learning rate 0 the policy never moves, so every per-head ratio must be exactly 1 (a
    row misalignment of the recomputed per-head old log-probs would show at once), and each head's
    entropy equals a float64 recomputation over the buffer."""
    env = make_vec_env(make_env, n_envs=2, seed=2)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=0.0, seed=2, device="cpu"
    )
    entropies: list[dict[str, float]] = []

    class HeadEntropy(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buf = self.model.rollout_buffer
            obs = torch.as_tensor(buf.observations.reshape(-1, buf.observations.shape[-1]))
            with torch.no_grad():
                dists = self.model.policy.get_distribution(obs).distribution
                entropies.append(
                    {h: float(d.entropy().double().mean()) for h, d in zip(["direction", "force"], dists)}
                )

    published: list[tuple[Snapshot | None, dict[str, float]]] = []
    simic = SimicCallback(
        head_names=["direction", "force"],
        bind=None,
        strict=True,
        on_update=lambda s, logged: published.append((s, logged)),
    )
    model.learn(64 * 2 * 2, callback=CallbackList([HeadEntropy(), simic]))
    assert len(published) == 2
    for (snap, logged), ent in zip(published, entropies):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert snap.run.heads == {"direction": 2, "force": 3}
        assert p.head_kl_k3 == {"direction": 0.0, "force": 0.0}
        assert p.head_ratio_max == {"direction": 1.0, "force": 1.0} == p.head_ratio_min
        for head, value in ent.items():
            assert close(p.entropy[head], value, 1e-6)
        check_against_sb3_log(snap, logged)


def test_multidiscrete_head_log_ratios_add_up_to_the_joint_one_while_learning() -> None:
    """At DEBUG the ratio outliers carry each head's share of a sample's log ratio: with a moving
    policy the shares must add up to the joint log ratio SB3's loss used."""
    env = make_vec_env(make_env, n_envs=2, seed=3)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=3e-3, seed=3, device="cpu"
    )
    published, ref, cb = run(model, 2, level="DEBUG")
    assert cb.mismatches == 0
    for snap, logged in published:
        assert snap is not None and snap.debug is not None and snap.policy is not None
        joint = next(o for o in snap.debug.outliers if o.head == "joint")
        assert joint.index_kind == "rollout" and len(joint.indices) > 0
        assert all(0 <= i < 128 for i in joint.indices)
        shares = np.sum([joint.head_logp_diff[h] for h in ("head0", "head1")], axis=0)
        np.testing.assert_allclose(shares, joint.logp_diff, rtol=1e-4, atol=1e-6)
        assert max(abs(x) for x in joint.logp_diff) > 0  # the policy really moved
        assert set(snap.policy.head_kl_k3) == {"head0", "head1"}
        conflict = snap.debug.conflict
        assert conflict is not None and "head0|head1" in conflict.head_cosines
        check_against_sb3_log(snap, logged)
    for (snap, _), rollout in zip(published, ref.rollouts):
        assert snap is not None
        check_rollout_stats(snap, rollout)


def test_recurrent_ppo_streams_lstm_state_and_drops_padding() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=4)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        seed=4,
        device="cpu",
        policy_kwargs={"lstm_hidden_size": 16},
    )
    published, ref, cb = run(model, 3)
    assert cb.mismatches == 0 and len(published) == 3 and len(ref.states) == 3
    for (snap, logged), rollout, (h, c) in zip(published, ref.rollouts, ref.states):
        assert snap is not None and snap.policy is not None and snap.lstm is not None
        # every real sample once per epoch: the padded rows of SB3's sequences were dropped
        assert snap.policy.samples == 2 * 64
        lstm = snap.lstm
        assert close(lstm.h_norm, float(np.linalg.norm(h)), 1e-9) and close(
            lstm.c_norm, float(np.linalg.norm(c)), 1e-9
        )
        assert close(lstm.c_mean, float(c.mean()), 1e-9, 1e-12)
        assert lstm.h_nan == lstm.c_nan == 0
        assert 1 <= lstm.gate_steps <= 8 and lstm.gate_rows == 2 and lstm.gate_total > 0
        assert set(lstm.gate_saturation) == {"input", "forget", "output"}
        assert "lstm_actor" in snap.run.groups and "lstm_critic" in snap.run.groups
        check_against_sb3_log(snap, logged)
        check_rollout_stats(snap, rollout)


def test_recurrent_ppo_multidiscrete_head_ratios_survive_sb3_padding() -> None:
    env = make_vec_env(make_env, n_envs=2, seed=5)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        learning_rate=0.0,
        seed=5,
        device="cpu",
        policy_kwargs={"lstm_hidden_size": 16},
    )
    published, _, cb = run(model, 2)
    assert cb.mismatches == 0
    for snap, logged in published:
        assert snap is not None and snap.policy is not None
        assert snap.policy.samples == 2 * 64
        assert snap.policy.head_kl_k3 == {"head0": 0.0, "head1": 0.0}
        assert snap.policy.kl_k3_mean < 1e-12 and abs(snap.policy.ratio_max - 1.0) < 1e-6
        check_against_sb3_log(snap, logged)


def test_target_kl_early_stop_is_reported() -> None:
    """SB3 stops at the first minibatch whose k3 KL exceeds 1.5 x target_kl: the second minibatch
    of epoch 0 (the first one has ratio 1 exactly), before its backward."""
    env = make_vec_env("CartPole-v1", n_envs=2, seed=6)
    model = PPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=4, target_kl=1e-12, seed=6, device="cpu"
    )
    published, _, _ = run(model, 2)
    for snap, _ in published:
        assert snap is not None and snap.policy is not None and snap.gradients is not None
        p = snap.policy
        assert p.early_stopped and p.early_stop_epoch == 0
        assert p.early_stop_kl is not None and p.early_stop_kl > 1.5e-12
        assert p.minibatches == 2 and snap.gradients.calls == 1


def test_real_socket_with_a_hub_built_by_the_user_and_a_debug_lease() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=7)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=7, device="cpu")
    hub = TelemetryHub(
        model.policy,
        heads={"action": 2},
        max_grad_norm=model.max_grad_norm,
        total_updates=3,
        bind="tcp://127.0.0.1:0",
        run_name="sb3-socket",
        groups=sb3_groups(model.policy),
    )
    info = protocol.read_connection_file(hub.publisher.connection_path)
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_SNAPSHOT)
        protocol.client_curve(sub, info)
        sub.connect(info.pub)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        protocol.client_curve(dealer, info)
        dealer.connect(info.cmd)
        time.sleep(0.3)  # let the subscription reach the publisher
        cmd = protocol.new_command(
            "lease_debug", session=info.session, client="test", updates=5, lease_seconds=60
        )
        frame = protocol.encode_envelope("command", cmd, session=info.session, seq=0, step=0)
        dealer.send_multipart([protocol.sign(info.key_bytes, frame), frame])
        time.sleep(0.3)  # the publisher thread queues it for the next update boundary
        model.learn(64 * 2 * 3, callback=SimicCallback(hub))
        assert not hub._closed  # a hub the user built is the user's to close
        received: list[Snapshot] = []
        while sub.poll(2000) and len(received) < 3:
            _topic, data = sub.recv_multipart()
            body = protocol.decode_body(protocol.decode_envelope(data))
            assert isinstance(body, Snapshot)
            received.append(body)
        assert [s.step for s in received] == [1, 2, 3]
        assert all(s.run.name == "sb3-socket" for s in received)
        assert received[0].level.level == "NORMAL"
        assert received[1].level.level == "DEBUG" and received[1].debug is not None
        assert dealer.poll(2000)
        mac, reply = dealer.recv_multipart()
        assert protocol.verify(info.key_bytes, mac, reply)
        ack = protocol.decode_body(protocol.decode_envelope(reply))
        assert isinstance(ack, Ack) and ack.effective_step == 2
    finally:
        hub.close()
        ctx.destroy(linger=0)


def test_recording_and_hub_continue_across_learn_calls(tmp_path: Path) -> None:
    """Chunked training: every learn() appends to the same recording and keeps the hub (and its
    detector baselines); steps keep counting when reset_num_timesteps=True restarts SB3's clock."""
    from telemetry_core.record import read_recording

    env = make_vec_env("CartPole-v1", n_envs=2, seed=8)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=8, device="cpu")
    cb = SimicCallback(bind=None, record=tmp_path / "run.simrec")
    model.learn(128 * 2, callback=cb)
    params = list(model.policy.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in params)  # hooks removed after learn
    assert "evaluate_actions" not in model.policy.__dict__ and "get" not in model.rollout_buffer.__dict__
    first = cb.hub
    assert first is not None and not first.closed
    model.learn(128 * 2, callback=cb, reset_num_timesteps=False)  # continues: updates 3 and 4
    assert cb.hub is first and cb.last_snapshot is not None and cb.last_snapshot.step == 4
    model.learn(128, callback=cb)  # SB3 restarts its timesteps; the hub's steps go on: update 5
    assert cb.hub is first and cb.last_snapshot is not None and cb.last_snapshot.step == 5
    assert first.detector.state_dict()["updates"] == 5  # one detector history over all chunks
    cb.close()
    assert first.closed
    cb.close()  # idempotent
    rec = read_recording(tmp_path / "run.simrec")
    frames = [protocol.decode_envelope(f) for f in rec.frames]
    assert [f.step for f in frames] == [1, 2, 3, 4, 5, 5] and not rec.problems  # 5 again: the closing frame
    with SimicCallback(bind=None) as again:  # after close() a new learn builds a new hub
        model.learn(128, callback=again)
        assert again.hub is not None and not again.hub.closed
    assert again.hub.closed


def test_errors_name_what_is_wrong() -> None:
    assert heads_from_action_space(gym.spaces.MultiBinary(3)) == {"head0": 2, "head1": 2, "head2": 2}
    assert heads_from_action_space(gym.spaces.Box(-1, 1, (2,))) == {"action": 1}
    with pytest.raises(ValueError, match="Box action spaces, not Text"):
        heads_from_action_space(gym.spaces.Text(3))
    with pytest.raises(ValueError, match="head_names"):
        heads_from_action_space(gym.spaces.MultiDiscrete([2, 3]), ["a"])
    with pytest.raises(ValueError, match="either hub= or hub keyword"):
        SimicCallback(
            TelemetryHub(torch.nn.Linear(2, 2), heads={"a": 2}, max_grad_norm=1.0, bind=None), bind=None
        )
    env = make_vec_env("CartPole-v1", n_envs=1, seed=9)
    with pytest.raises(TypeError, match="PPO, sb3-contrib RecurrentPPO and MaskablePPO, not A2C"):
        A2C("MlpPolicy", env, n_steps=8, device="cpu").learn(16, callback=SimicCallback(bind=None))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, device="cpu")
    other = TelemetryHub(torch.nn.Linear(2, 2), heads={"action": 2}, max_grad_norm=0.5, bind=None)
    with pytest.raises(ValueError, match="not built on this model's policy"):
        model.learn(32, callback=SimicCallback(other))
    pendulum = make_vec_env("Pendulum-v1", n_envs=1, seed=9)
    with pytest.raises(TypeError, match="StateDependentNoiseDistribution"):
        PPO("MlpPolicy", pendulum, n_steps=32, batch_size=32, use_sde=True, device="cpu").learn(
            32, callback=SimicCallback(bind=None)
        )


class DictObservation(gym.ObservationWrapper):
    """The demo task's observation as a Dict space (SB3's MultiInputPolicy / DictRolloutBuffer)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Dict(
            {"position": env.observation_space, "bias": gym.spaces.Box(-1.0, 1.0, (1,))}
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        return {"position": observation, "bias": np.ones(1, dtype=np.float32)}


@pytest.mark.parametrize(
    ("cls", "policy"), [(PPO, "MultiInputPolicy"), (RecurrentPPO, "MultiInputLstmPolicy")]
)
def test_dict_observations(cls: Any, policy: str) -> None:
    env = make_vec_env(lambda: DictObservation(make_env()), n_envs=2, seed=10)
    model = cls(policy, env, n_steps=32, batch_size=32, n_epochs=2, learning_rate=0.0, seed=10, device="cpu")
    published, ref, cb = run(model, 2)
    assert cb.mismatches == 0 and len(published) == 2
    for (snap, logged), rollout in zip(published, ref.rollouts):
        assert snap is not None and snap.policy is not None
        assert all(kl < 1e-12 for kl in snap.policy.head_kl_k3.values()) and len(snap.policy.head_kl_k3) == 2
        assert (snap.lstm is not None) == (cls is RecurrentPPO)
        check_against_sb3_log(snap, logged)
        check_rollout_stats(snap, rollout)


def test_off_publishes_nothing_and_hands_the_hub_nothing() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=11)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=2, seed=11, device="cpu")
    hub = TelemetryHub(
        model.policy,
        heads={"action": 2},
        max_grad_norm=0.5,
        bind=None,
        strict=True,
        config=TelemetryConfig(level=TelemetryLevel.OFF, auto_escalate=False),
    )
    calls: list[str] = []
    for name in ("observe_rollout", "observe_gradients", "observe_minibatch", "early_stop"):
        original = getattr(hub, name)
        setattr(hub, name, lambda *a, _n=name, _o=original, **k: (calls.append(_n), _o(*a, **k))[1])
    published: list[Snapshot | None] = []
    model.learn(32 * 2 * 2, callback=SimicCallback(hub, on_update=lambda s, logged: published.append(s)))
    hub.close()
    assert published == [None, None] and calls == [] and hub.counters.telemetry_errors == 0
