"""Detection quality from real training: every anomaly kind fires from statistics that the real
TelemetryHub reduced from real tensors of a real PPO update, and a healthy run raises no critical.

Two loops, both real PPO on real gymnasium CartPole environments, both observed by the real hub
(``bind=None``: no sockets; everything else as in a user's run, including automatic DEBUG
escalation on onsets):

* the recurrent demo trainer (``telemetry_core.demo``) in a short configuration, with each of its
  ``--inject`` pathologies at update ``ONSET`` (after every rolling baseline of the detector is
  known): each must be flagged as its own kind within 2
  updates of onset, as the full-size runs are (``benchmarks/detection_matrix.py`` runs that matrix:
  300-update runs, onset 90);
* a small feed-forward PPO (``MiniPPO`` below, ~80 lines read top to bottom) on gymnasium's own
  CartPole-v1, driven into the conditions the demo's injections do not produce - a learning rate
  far too large, a critic that is never trained, a reward lost on its way to the buffer, a reward
  scale changed mid-run, an environment whose physics changed mid-run - each by its mechanism, never
  by writing a statistic.

``DETECTED_KINDS`` (every kind but ``rank_divergence``, which the multi-rank aggregator judges) is
covered case by case; a test checks that the cases cover it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from torch import nn

from telemetry_core.anomaly import CRITICAL, DETECTED_KINDS
from telemetry_core.demo.ppo import DemoConfig, iter_train, make_agent, make_hub
from telemetry_core.hub import TelemetryHub
from telemetry_core.schema import Snapshot

# ------------------------------------------------------------------------------------------------
# The demo trainer, short: 8 environments x 64 steps, 4 environment-wise minibatches x 4 epochs
# (the full demo's minibatch structure on half the rollout), 40 planned updates.
# ------------------------------------------------------------------------------------------------
ONSET = 10  # > baseline_min_updates (5) healthy updates before it, past the warm-up phase (4)
WINDOW = 2  # flagged as its own kind within 2 updates of onset
SHORT = DemoConfig(num_envs=8, num_steps=64, num_minibatches=4, num_updates=40, seed=1)

# injection -> (the kind it must be flagged as, its onset). Every case runs the demo as it ships,
# target-KL stop on: the ratio-explosion injection's old log-probs make the first minibatch's ratios
# explode before any step, so even an update the stop cuts to one minibatch shows them.
DEMO_CASES: dict[str, tuple[str, int]] = {
    "entropy-collapse": ("entropy_collapse", ONSET),
    "kl-spike": ("kl_spike", ONSET),
    "ratio-explosion": ("ratio_explosion", ONSET),
    "value-collapse": ("value_collapse", ONSET),
    "nan-gradients": ("numerical_instability", ONSET),
    "exploding-gradients": ("gradient_exploding", ONSET),
    "lstm-explosion": ("lstm_unhealthy", ONSET),
}


def demo_run(
    injection: str | None, stop: int, onset: int = ONSET, cfg: DemoConfig = SHORT
) -> dict[int, Snapshot]:
    """Snapshots by update of a real demo run under the real hub, stopped after update ``stop``."""
    agent = make_agent(cfg)
    injections = [f"{injection}@{onset}"] if injection else []
    snaps: dict[int, Snapshot] = {}
    with make_hub(agent, cfg, bind=None, strict=True) as hub:
        gen = iter_train(cfg, hub=hub, injections=injections, agent=agent)
        for record in gen:
            if injection is not None and record.update == onset:
                assert injection in record.injected  # the mechanism acted at onset
            assert record.snapshot is not None
            snaps[record.update] = record.snapshot
            if record.update >= stop:
                gen.close()
    return snaps


def first_flagged(snaps: dict[int, Snapshot], kind: str, *, severity: str | None = None) -> int | None:
    for step in sorted(snaps):
        if any(
            a.kind == kind and (severity is None or a.severity == severity) for a in snaps[step].anomalies
        ):
            return step
    return None


@pytest.mark.parametrize("injection", sorted(DEMO_CASES))
def test_each_demo_injection_is_flagged_as_its_own_kind_within_two_updates(injection: str) -> None:
    kind, onset = DEMO_CASES[injection]
    snaps = demo_run(injection, stop=onset + WINDOW, onset=onset, cfg=SHORT)
    before = [a for step, s in snaps.items() if step < onset for a in s.anomalies]
    assert not [a for a in before if a.severity == CRITICAL], before
    at = first_flagged({s: v for s, v in snaps.items() if s >= onset}, kind)
    assert at is not None, f"{injection} not flagged as {kind}: " + repr(
        {s: [(a.kind, a.severity) for a in v.anomalies] for s, v in snaps.items() if s >= onset}
    )
    assert at - onset <= WINDOW


def test_a_short_healthy_demo_run_raises_no_critical_and_mostly_nothing() -> None:
    snaps = demo_run(None, stop=24)
    found = [(s, a.kind, a.severity) for s, v in snaps.items() for a in v.anomalies]
    assert not [f for f in found if f[2] == CRITICAL], found
    quiet = [s for s, v in snaps.items() if not v.anomalies]
    assert len(quiet) >= 0.8 * len(snaps), found
    # A healthy update with every baseline known fires nothing at all.
    assert any(s > 10 for s in quiet), found


# ------------------------------------------------------------------------------------------------
# A small feed-forward PPO on gymnasium's CartPole-v1, for the kinds no demo injection produces
# ------------------------------------------------------------------------------------------------
@dataclass
class MiniPPO:
    """Hyper-parameters of the small PPO, and the knobs that break it (each documented at its case)."""

    seed: int = 0
    updates: int = 30  # planned updates (training phase); ``run`` may stop earlier
    num_envs: int = 4
    num_steps: int = 32
    epochs: int = 4
    minibatches: int = 2
    lr: float = 3e-4
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    clip: float = 0.2
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    critic_init_std: float = 1.0  # gain of the critic's output layer at initialisation
    reward_scale: Callable[[int], float] = lambda update: 0.1  # factor on the rewards stored (as the demo)
    before_rollout: Callable[[int, list[gym.Env]], None] | None = None  # may change the environments


class ActorCritic(nn.Module):
    def __init__(self, cfg: MiniPPO, obs_dim: int = 4, n_actions: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.actor = nn.Linear(hidden, n_actions)
        self.critic = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.actor.weight, 0.01)
        nn.init.zeros_(self.actor.bias)
        if cfg.critic_init_std > 0:
            nn.init.orthogonal_(self.critic.weight, cfg.critic_init_std)
        else:
            nn.init.zeros_(self.critic.weight)
        nn.init.zeros_(self.critic.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.distributions.Categorical, torch.Tensor]:
        z = self.body(obs)
        dist = torch.distributions.Categorical(logits=self.actor(z), validate_args=False)
        return dist, self.critic(z).squeeze(-1)


def mini_run(cfg: MiniPPO, stop: int | None = None) -> dict[int, Snapshot]:
    """Train ``cfg`` under the real hub; return the snapshots by update (1-based)."""
    torch.set_num_threads(1)  # as the demo trainer: tiny networks run fastest on one thread
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    raw: list[gym.Env] = []

    def make() -> gym.Env:
        env = gym.make("CartPole-v1")
        raw.append(env.unwrapped)
        return env

    envs = RecordEpisodeStatistics(
        SyncVectorEnv([make for _ in range(cfg.num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)
    )
    agent = ActorCritic(cfg)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    T, B = cfg.num_steps, cfg.num_envs
    snaps: dict[int, Snapshot] = {}
    hub = TelemetryHub(
        agent, heads={"action": 2}, max_grad_norm=cfg.max_grad_norm, total_updates=cfg.updates,
        bind=None, strict=True, run_name="mini-ppo",
    )  # fmt: skip
    with hub:
        obs_np, _ = envs.reset(seed=cfg.seed)
        next_obs, next_done = torch.as_tensor(obs_np), torch.zeros(B)
        for update in range(1, (stop or cfg.updates) + 1):
            if cfg.before_rollout is not None:
                cfg.before_rollout(update, raw)
            obs, actions, logprobs = (
                torch.zeros(T, B, 4),
                torch.zeros(T, B, dtype=torch.long),
                torch.zeros(T, B),
            )
            rewards, dones, values = torch.zeros(T, B), torch.zeros(T, B), torch.zeros(T, B)
            ep_returns: list[float] = []
            for t in range(T):
                obs[t], dones[t] = next_obs, next_done
                with torch.no_grad():
                    dist, value = agent(next_obs)
                    action = dist.sample()
                actions[t], logprobs[t], values[t] = action, dist.log_prob(action), value
                obs_np, reward, term, trunc, info = envs.step(action.numpy())
                rewards[t] = torch.as_tensor(reward, dtype=torch.float32) * cfg.reward_scale(update)
                next_obs = torch.as_tensor(obs_np, dtype=torch.float32)
                next_done = torch.as_tensor(np.logical_or(term, trunc), dtype=torch.float32)
                if "_episode" in info:
                    ep_returns.extend(info["episode"]["r"][info["_episode"]].tolist())
            with torch.no_grad():  # GAE
                next_value = agent(next_obs)[1]
                adv, last = torch.zeros(T, B), torch.zeros(B)
                for t in reversed(range(T)):
                    nonterminal = 1.0 - (next_done if t == T - 1 else dones[t + 1])
                    nxt = next_value if t == T - 1 else values[t + 1]
                    delta = rewards[t] + cfg.gamma * nxt * nonterminal - values[t]
                    last = delta + cfg.gamma * cfg.gae_lambda * nonterminal * last
                    adv[t] = last
                returns = adv + values
            b_obs, b_act, b_logp = obs.reshape(-1, 4), actions.reshape(-1), logprobs.reshape(-1)
            b_adv, b_ret, b_val = adv.reshape(-1), returns.reshape(-1), values.reshape(-1)
            hub.observe_rollout(
                advantages=b_adv, returns=b_ret, values=b_val,
                episode_returns=ep_returns or None, episode_lengths=None,
            )  # fmt: skip
            mb_size = T * B // cfg.minibatches
            for epoch in range(cfg.epochs):
                order = torch.as_tensor(rng.permutation(T * B))
                for start in range(0, T * B, mb_size):
                    mb = order[start : start + mb_size]
                    dist, new_value = agent(b_obs[mb])
                    new_logp = dist.log_prob(b_act[mb])
                    logratio = new_logp - b_logp[mb]
                    ratio = logratio.exp()
                    mb_adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                    pg_loss = torch.max(
                        -mb_adv * ratio, -mb_adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
                    ).mean()
                    v_loss = 0.5 * ((new_value - b_ret[mb]) ** 2).mean()
                    entropy = dist.entropy()
                    loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
                    optimizer.zero_grad()
                    loss.backward()
                    hub.observe_gradients(loss)
                    nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    hub.observe_minibatch(
                        new_logprob=new_logp.detach(), old_logprob=b_logp[mb], advantages=mb_adv,
                        clip_range=cfg.clip, epoch=epoch, head_entropies={"action": entropy.detach()},
                        policy_loss=pg_loss.detach(), value_loss=v_loss.detach(),
                    )  # fmt: skip
            snap = hub.end_update(update)
            assert snap is not None
            snaps[update] = snap
    envs.close()
    return snaps


def _fired(snaps: dict[int, Snapshot]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for step in sorted(snaps):
        for a in snaps[step].anomalies:
            out.setdefault(a.kind, []).append(step)
    return out


def _longer_control_step(at: int, factor: float) -> Callable[[int, list[gym.Env]], None]:
    """From update ``at`` on, CartPole integrates ``factor`` x longer per action (a frame skip)."""

    def act(update: int, envs: list[gym.Env]) -> None:
        if update == at:
            for env in envs:
                env.tau *= factor

    return act


@dataclass
class MiniCase:
    cfg: MiniPPO
    onset: int  # first update the mechanism acts on
    stop: int  # last update run
    why: str


MINI_CASES: dict[str, MiniCase] = {
    "ratio_collapse": MiniCase(
        MiniPPO(lr=0.3, epochs=10),
        1,
        3,
        "a learning rate of 0.3 where 3e-4 was meant, 10 epochs and no target-KL stop: within one "
        "update some sampled actions lose all of their probability (at 0.1 the smallest ratio stays "
        "at 0.02-0.04, which healthy recurrent PPO also reaches now and then: a KL spike, not this)",
    ),
    "ev_low": MiniCase(
        MiniPPO(vf_coef=0.0, critic_init_std=10.0),
        1,
        8,
        "the value loss is left out of the total loss (vf_coef 0) and the critic starts with a large "
        "gain: its predictions vary but never learn the returns, so it explains less than a constant",
    ),
    "gradient_vanishing": MiniCase(
        MiniPPO(reward_scale=lambda update: 0.0, critic_init_std=0.0, ent_coef=0.0),
        1,
        3,
        "the reward is lost on its way to the buffer (every stored reward 0) with a zero-initialised "
        "critic and no entropy bonus (SB3's default): returns, values and advantages are all zero, "
        "so no loss term reaches the weights",
    ),
    "gradient_drift": MiniCase(
        MiniPPO(reward_scale=lambda update: 0.1 if update < 14 else 3.0),
        14,
        20,
        "the reward scale changes 30x at update 14 (a reward wrapper removed mid-run): the critic's "
        "gradient, and with it the pre-clip norm, stays far above its long-run average",
    ),
    "performance_degradation": MiniCase(
        MiniPPO(before_rollout=_longer_control_step(12, 5.0)),
        12,
        22,
        "the environment changes under the agent at update 12 (a frame skip of 5: 0.1 s of physics "
        "per action): the pole falls within a few actions whatever the policy, episodes get 4x "
        "shorter and the rolling mean return falls far below its best",
    ),
}


@pytest.mark.parametrize("kind", sorted(MINI_CASES))
def test_kinds_no_injection_produces_fire_from_a_real_small_ppo(kind: str) -> None:
    case = MINI_CASES[kind]
    snaps = mini_run(case.cfg, stop=case.stop)
    fired = _fired(snaps)
    assert kind in fired, fired
    assert min(fired[kind]) >= case.onset, fired
    before = [a for s, v in snaps.items() if s < case.onset for a in v.anomalies]
    assert not [a for a in before if a.severity == CRITICAL], before


def test_the_cases_cover_every_detected_kind() -> None:
    # the continuous-head kinds are judged on a continuous-action run (test_detection_continuous.py)
    from test_detection_continuous import CASES as CONTINUOUS_CASES

    covered = {kind for kind, _ in DEMO_CASES.values()} | set(MINI_CASES) | set(CONTINUOUS_CASES)
    assert covered == set(DETECTED_KINDS)
    assert "rank_divergence" not in DETECTED_KINDS


def test_the_healthy_small_ppo_raises_no_anomaly() -> None:
    snaps = mini_run(MiniPPO(), stop=24)
    assert _fired(snaps) == {}
