"""SimicCallback on real sb3-contrib MaskablePPO: Discrete and MultiDiscrete action spaces with
state-dependent masks on the demo's factored CartPole.

The per-head log-probs and entropies are those of the masked distributions MaskablePPO's loss used,
checked against SB3's own logger and a float64 recomputation over the rollout buffer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
sb3_contrib = pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from sb3_contrib.common.wrappers import ActionMasker  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from telemetry_core.config import TelemetryConfig, TelemetryLevel  # noqa: E402
from telemetry_core.demo.env import make_env  # noqa: E402
from telemetry_core.integrations.sb3 import SimicCallback  # noqa: E402
from telemetry_core.reductions.policy import PolicyReducer  # noqa: E402
from telemetry_core.schema import Snapshot  # noqa: E402

MaskablePPO = sb3_contrib.MaskablePPO

# a private runtime directory and one torch thread (tiny MLPs: a second one only contends)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("sb3_runtime")]



def factored_masks(env: gym.Env) -> np.ndarray:
    """Masks of the factored CartPole (direction x 3 force levels): the strongest force is allowed
    only while the cart is left of the centre, the weakest only while the pole leans right — so how
    many levels are valid changes from step to step."""
    x, theta = env.unwrapped.state[0], env.unwrapped.state[2]
    return np.array([True, True, theta > 0, True, x < 0])


def one_hot_levels(env: gym.Env) -> np.ndarray:
    """Masks of a flat Discrete(6) CartPole: actions 0, 1 always valid, 2..5 by the cart's side."""
    x = env.unwrapped.state[0]
    return np.array([True, True, x < 0, x < 0, x >= 0, True])


class FlatForce(gym.Wrapper):
    """CartPole with ``Discrete(6)``: action ``a`` pushes in direction ``a % 2``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Discrete(6)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.env.step(int(action) % 2)


class BinaryPush(gym.Wrapper):
    """CartPole with ``MultiBinary(2)``: bit 0 is the direction, bit 1 a second switch the masks
    constrain (it does not change the dynamics)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.MultiBinary(2)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.env.step(int(np.asarray(action).reshape(-1)[0]))


def binary_masks(env: gym.Env) -> np.ndarray:
    """The second switch may be on only while the cart is left of the centre."""
    return np.array([True, True, True, env.unwrapped.state[0] < 0])


def masked_binary() -> gym.Env:
    return ActionMasker(BinaryPush(gym.make("CartPole-v1")), binary_masks)


def masked_factored() -> gym.Env:
    return ActionMasker(make_env(), factored_masks)


def masked_flat() -> gym.Env:
    return ActionMasker(FlatForce(gym.make("CartPole-v1")), one_hot_levels)


class BufferEntropy(BaseCallback):
    """Float64 reference: each head's masked entropy over the rollout buffer and its mean
    normalised by log(valid actions) per sample, from the buffer's observations and masks."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.rows: list[dict[str, tuple[float, float]]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buf = self.model.rollout_buffer
        obs = torch.as_tensor(buf.observations.reshape(-1, buf.observations.shape[-1]))
        masks = torch.as_tensor(buf.action_masks.reshape(-1, sum(self.sizes))).bool()
        with torch.no_grad():
            features = self.model.policy.extract_features(obs)
            latent = self.model.policy.mlp_extractor.forward_actor(features)
            logits = self.model.policy.action_net(latent).double()
        row: dict[str, tuple[float, float]] = {}
        for i, (lg, m) in enumerate(
            zip(torch.split(logits, self.sizes, 1), torch.split(masks, self.sizes, 1))
        ):
            lp = torch.log_softmax(lg.masked_fill(~m, -math.inf), 1)
            ent = -(lp.exp() * lp.masked_fill(~m, 0.0)).sum(1)
            valid = m.sum(1).double()
            keep = valid > 1
            row[f"head{i}"] = (float(ent.mean()), float((ent[keep] / valid[keep].log()).mean()))
        self.rows.append(row)


def run(
    model: Any, updates: int, sizes: list[int], **kwargs: Any
) -> tuple[list[Any], BufferEntropy, SimicCallback]:
    published: list[tuple[Snapshot | None, dict[str, float]]] = []
    ref = BufferEntropy(sizes)
    cb = SimicCallback(
        bind=None,
        strict=True,
        config=TelemetryConfig(level=TelemetryLevel.NORMAL, auto_escalate=False),
        on_update=lambda s, logged: published.append((s, logged)),
        **kwargs,
    )
    model.learn(model.n_steps * model.n_envs * updates, callback=CallbackList([ref, cb]))
    return published, ref, cb


def test_maskable_multidiscrete_streams_per_head_statistics_of_the_masked_distribution() -> None:
    env = make_vec_env(masked_factored, n_envs=2, seed=4)
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=4, device="cpu")
    published, ref, cb = run(model, 3, [2, 3])
    assert len(published) == 3 and cb.mismatches == 0
    for (snap, logged), row in zip(published, ref.rows):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert snap.counters.telemetry_errors == 0
        assert set(p.head_kl_k3) == {"head0", "head1"}
        assert all(math.isfinite(v) for v in p.head_kl_k3.values())
        assert all(math.isfinite(v) for v in p.entropy.values())
        # SB3's entropy loss: minus the joint (summed) masked entropy, mean over the update
        assert math.isclose(-sum(p.entropy.values()), logged["train/entropy_loss"], rel_tol=1e-5)
        assert math.isclose(p.clip_fraction, logged["train/clip_fraction"], rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(p.policy_loss, logged["train/policy_gradient_loss"], rel_tol=1e-5, abs_tol=1e-7)
        assert row["head1"][0] < 0.9 * math.log(3)  # the masks really removed force levels


def test_maskable_multidiscrete_heads_are_aligned_with_the_buffer_rows() -> None:
    """Learning rate 0: every per-head ratio is exactly 1 only if the per-head old log-probs were
    recomputed under the rollout's masks; each head's masked entropy equals the float64 reference."""
    env = make_vec_env(masked_factored, n_envs=2, seed=5)
    model = MaskablePPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=0.0, seed=5, device="cpu"
    )
    published, ref, _ = run(model, 2, [2, 3])
    for (snap, _), row in zip(published, ref.rows):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert p.head_kl_k3 == {"head0": 0.0, "head1": 0.0}
        assert p.head_ratio_max == {"head0": 1.0, "head1": 1.0} == p.head_ratio_min
        for head, (ent, normalized) in row.items():
            assert math.isclose(p.entropy[head], ent, rel_tol=1e-6)
            # divided by log(valid actions) per sample, not by log(actions)
            assert math.isclose(p.entropy_normalized[head], normalized, rel_tol=1e-6)
        assert not math.isclose(p.entropy_normalized["head1"], p.entropy["head1"] / math.log(3), rel_tol=1e-3)


def test_maskable_multibinary() -> None:
    env = make_vec_env(masked_binary, n_envs=2, seed=8)
    model = MaskablePPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=0.0, seed=8, device="cpu"
    )
    published, ref, cb = run(model, 2, [2, 2])
    assert cb.mismatches == 0
    for (snap, logged), row in zip(published, ref.rows):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert snap.counters.telemetry_errors == 0
        assert p.head_kl_k3 == {"head0": 0.0, "head1": 0.0}
        for head, (ent, normalized) in row.items():
            assert math.isclose(p.entropy[head], ent, rel_tol=1e-6)
            assert math.isclose(p.entropy_normalized[head], normalized, rel_tol=1e-6)
        assert math.isclose(-sum(p.entropy.values()), logged["train/entropy_loss"], rel_tol=1e-5)


def test_maskable_discrete() -> None:
    env = make_vec_env(masked_flat, n_envs=2, seed=6)
    model = MaskablePPO(
        "MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=0.0, seed=6, device="cpu"
    )
    published, ref, cb = run(model, 2, [6])
    assert cb.mismatches == 0
    for (snap, logged), row in zip(published, ref.rows):
        assert snap is not None and snap.policy is not None
        p = snap.policy
        assert snap.counters.telemetry_errors == 0
        assert math.isclose(p.entropy["action"], row["head0"][0], rel_tol=1e-6)
        assert math.isclose(p.entropy_normalized["action"], row["head0"][1], rel_tol=1e-6)
        assert math.isclose(-p.entropy["action"], logged["train/entropy_loss"], rel_tol=1e-5)


def test_an_unreadable_action_distribution_is_refused_before_the_first_rollout() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.distributions import CategoricalDistribution

    class OtherCategorical(CategoricalDistribution):
        """A distribution class the callback does not know (e.g. a user's own)."""

    env = make_vec_env("CartPole-v1", n_envs=1, seed=7)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, device="cpu")
    model.policy.action_dist = object()
    cb = SimicCallback(bind=None)
    with pytest.raises(TypeError, match="cannot read the action distribution object"):
        model.learn(32, callback=cb)
    assert cb.hub is None  # refused before anything was built
    model.policy.action_dist = OtherCategorical(2)  # a subclass of a supported one is accepted
    model.learn(32, callback=SimicCallback(bind=None))


def reduce(reducer: PolicyReducer, level: TelemetryLevel = TelemetryLevel.NORMAL) -> Any:
    host = {k: v.detach().double().cpu().reshape(-1).tolist() for k, v in reducer.pending(level).items()}
    return reducer.build(host, level)


@pytest.mark.parametrize("fold_elements", [None, 50])
def test_masked_entropy_normalisation_against_a_float64_reference(
    fold_elements: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fold_elements is not None:  # the early fold that bounds the memory of huge updates
        import telemetry_core.reductions.policy as policy_module

        monkeypatch.setattr(policy_module, "FOLD_ELEMENTS", fold_elements)
    reducer = PolicyReducer({"a": 20, "b": 4, "c": 3})
    # a uniform policy over 10 valid of 20 actions reads 1.0
    n = 8
    mask_a = torch.zeros(n, 20, dtype=torch.bool)
    mask_a[:, :10] = True
    ent_a = torch.full((n,), math.log(10), dtype=torch.float32)
    lp = torch.zeros(n)
    reducer.observe(new_logprob=lp, old_logprob=lp, clip_range=0.2, epoch=0, head_entropies={"a": ent_a})
    reducer.observe_action_masks({"a": ent_a}, {"a": mask_a})
    stats = reduce(reducer)
    assert math.isclose(stats.entropy_normalized["a"], 1.0, rel_tol=1e-7)
    assert math.isclose(stats.entropy["a"], math.log(10), rel_tol=1e-7)

    # random masked policies over several minibatches, float64 reference
    g = torch.Generator().manual_seed(0)
    reducer.reset()
    ref_sum, ref_count, ent_all = 0.0, 0, []
    for epoch in range(3):
        m = 37
        mask = torch.rand(m, 4, generator=g) < 0.6
        mask[:, 3] = True  # at least one valid action per sample, as MaskablePPO requires
        mask[:5] = False
        mask[:5, 1] = True  # one valid action: no normalised entropy, left out of the mean
        logits = torch.randn(m, 4, generator=g, dtype=torch.float64).masked_fill(~mask, -math.inf)
        logp = torch.log_softmax(logits, 1)
        ent = -(logp.exp() * logp.masked_fill(~mask, 0.0)).sum(1)
        valid = mask.sum(1)
        keep = valid > 1
        ref_sum += float((ent[keep] / valid[keep].double().log()).sum())
        ref_count += int(keep.sum())
        ent_all.append(ent)
        e32 = ent.float()
        c_ent = torch.full((m,), 0.5)  # head c has no mask: log(3) as before
        lp = torch.zeros(m)
        reducer.observe(
            new_logprob=lp, old_logprob=lp, clip_range=0.2, epoch=epoch, head_entropies={"b": e32, "c": c_ent}
        )
        reducer.observe_action_masks({"b": e32, "c": c_ent}, {"b": mask})
    stats = reduce(reducer)
    assert math.isclose(stats.entropy_normalized["b"], ref_sum / ref_count, rel_tol=1e-6)
    assert math.isclose(stats.entropy["b"], float(torch.cat(ent_all).mean()), rel_tol=1e-6)
    assert math.isclose(stats.entropy_normalized["c"], 0.5 / math.log(3), rel_tol=1e-7)

    # every sample with one valid action: no normalised entropy at all
    reducer.reset()
    only = torch.zeros(4, 4, dtype=torch.bool)
    only[:, 2] = True
    zero = torch.zeros(4)
    reducer.observe(new_logprob=zero, old_logprob=zero, clip_range=0.2, epoch=0, head_entropies={"b": zero})
    reducer.observe_action_masks({"b": zero}, {"b": only})
    stats = reduce(reducer)
    assert stats.entropy["b"] == 0.0 and "b" not in stats.entropy_normalized

    with pytest.raises(ValueError, match="shape"):
        reducer.observe_action_masks({"b": zero}, {"b": only[:, :3]})
    with pytest.raises(TypeError, match="bool tensor"):
        reducer.observe_action_masks({"b": zero}, {"b": only.float()})
    with pytest.raises(ValueError, match="needs head_entropies"):
        reducer.observe_action_masks({}, {"b": only})
