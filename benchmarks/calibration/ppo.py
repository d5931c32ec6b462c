"""One CleanRL-style PPO loop for the calibration agents, recurrent or feed-forward, one or several
heads, instrumented with a :class:`~telemetry_core.hub.TelemetryHub`. Read top to bottom.

It follows CleanRL's ``ppo.py`` (feed-forward: minibatches of shuffled samples) and
``ppo_atari_lstm.py`` (recurrent: minibatches of whole environment sequences, the LSTM re-run from
the rollout's initial state): GAE, the clipped surrogate, a clipped value loss, an entropy bonus,
global-norm clipping, an optional target-KL stop. Hyper-parameters live in :class:`PPOConfig`; the
agents of the calibration set are presets of it (``calibration.matrix.AGENTS``).

The hub is fed exactly as the demo feeds it (``telemetry_core/demo/ppo.py``): ``observe_rollout``
once per update, per minibatch ``observe_loss_terms`` / ``observe_gradients`` (after backward,
before clipping) / ``observe_minibatch`` with per-head log-probs, entropies and actions, then
``end_update`` with the LSTM's final state and gate inputs. Pathologies are armed by the demo's own
:class:`~telemetry_core.demo.inject.Injector` (they act on ``agent.heads``, ``agent.critic``,
``agent.lstm``, the learning rate, the entropy coefficient, an observation): the same mechanisms on
networks and tasks they were not tuned on.

Two choices as in the demo: time-limit truncation bootstraps from the final observation's value (as
SB3 does; Acrobot truncates every episode at 500 steps until it learns), and a minibatch whose
pre-clip gradient norm is not finite is not applied (the AMP GradScaler's policy), so one NaN
observation does not destroy every weight and the run goes on for the detector to judge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn, optim

from calibration.agents import MLPAgent, RecurrentAgent
from calibration.envs import ENVS, make_vector_env
from telemetry_core.config import TelemetryLevel
from telemetry_core.demo.inject import Injector

if TYPE_CHECKING:
    from telemetry_core.hub import TelemetryHub

__all__ = ["PPOConfig", "UpdateRecord", "iter_train", "make_agent", "make_hub"]

Agent = MLPAgent | RecurrentAgent


@dataclass
class PPOConfig:
    """Every hyper-parameter of one calibration agent."""

    env: str = "acrobot"  # a key of calibration.envs.ENVS
    recurrent: bool = False
    seed: int = 1
    num_updates: int = 200
    num_envs: int = 8
    num_steps: int = 64  # rollout length per environment and update
    learning_rate: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    reward_scale: float = 1.0  # rewards are multiplied by this in the buffer (episode returns are not)
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None  # CleanRL's default: no early stop
    hidden: tuple[int, ...] = (64, 64)  # feed-forward trunks; the recurrent encoder is hidden[:1]
    lstm_hidden: int = 64
    lstm_telemetry_steps: int = 8

    @property
    def heads(self) -> dict[str, int]:
        return dict(ENVS[self.env][1])


@dataclass
class UpdateRecord:
    """What one update did, measured by the loop (the telemetry's own view is ``snapshot``)."""

    update: int
    seconds: float  # wall time of this update
    episodes: int
    episode_return: float  # mean return of the episodes finished in this rollout (NaN if none)
    minibatches: int
    steps_skipped: int  # optimiser steps skipped for non-finite gradients
    injected: tuple[str, ...]  # pathologies whose mechanism acted in this update
    snapshot: Any = None


def make_agent(cfg: PPOConfig, obs_dim: int) -> Agent:
    torch.manual_seed(cfg.seed)
    if cfg.recurrent:
        return RecurrentAgent(obs_dim, cfg.heads, encoder_sizes=cfg.hidden[:1], lstm_hidden=cfg.lstm_hidden)
    return MLPAgent(obs_dim, cfg.heads, hidden=cfg.hidden)


def make_hub(agent: Agent, cfg: PPOConfig, **kwargs: Any) -> TelemetryHub:
    """The hub for ``agent``: its heads, the clipping cap, the plan, its LSTM; default groups."""
    from telemetry_core.hub import TelemetryHub

    return TelemetryHub(
        agent,
        heads=dict(agent.head_sizes),
        max_grad_norm=cfg.max_grad_norm,
        total_updates=cfg.num_updates,
        lstm=agent.lstm,
        **kwargs,
    )


def obs_dim_of(cfg: PPOConfig) -> int:
    env = ENVS[cfg.env][0]()
    try:
        return int(env.observation_space.shape[0])
    finally:
        env.close()


def iter_train(
    cfg: PPOConfig,
    agent: Agent,
    hub: TelemetryHub | None = None,
    injections: Iterable[str] = (),
) -> Iterator[UpdateRecord]:
    """Train ``agent`` for ``cfg.num_updates`` updates, yielding a record after each."""
    injector = Injector.build(injections, cfg.num_updates, cfg.num_steps)
    device = torch.device("cpu")
    heads = list(agent.head_sizes)
    recurrent = agent.lstm is not None
    rng = np.random.default_rng(cfg.seed)
    sampler = torch.Generator(device=device).manual_seed(cfg.seed)
    optimizer = optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    envs = make_vector_env(cfg.env, cfg.num_envs)
    try:
        T, B, H = cfg.num_steps, cfg.num_envs, len(heads)
        obs_dim = envs.single_observation_space.shape[0]
        obs = torch.zeros((T, B, obs_dim))
        actions = torch.zeros((T, B, H), dtype=torch.long)
        logprobs = torch.zeros((T, B))
        head_logprobs = torch.zeros((T, B, H))
        rewards = torch.zeros((T, B))
        dones = torch.zeros((T, B))
        values = torch.zeros((T, B))
        dones_host = np.zeros((T, B), dtype=bool)

        first_obs, _ = envs.reset(seed=cfg.seed)
        next_obs = torch.as_tensor(first_obs)
        next_done_host = np.zeros(B, dtype=bool)
        next_done = torch.zeros(B)
        state = agent.initial_state(B, device) if recurrent else None
        flat_inds = np.arange(T * B).reshape(T, B)
        env_inds = np.arange(B)

        def act(o: torch.Tensor, st: Any, d: torch.Tensor) -> tuple[Any, Any]:
            if not recurrent:
                return agent.policy(o, generator=sampler), None
            unroll = agent.unroll(o, st, d)
            return agent.policy(unroll.hidden, generator=sampler), unroll.state

        def value_of(o: torch.Tensor, st: Any, d: torch.Tensor) -> torch.Tensor:
            return agent.get_value(o, st, d) if recurrent else agent.get_value(o)

        for update in range(1, cfg.num_updates + 1):
            started = time.perf_counter()
            injected: list[str] = []
            initial_state = (state[0].clone(), state[1].clone()) if recurrent else None
            lr = cfg.learning_rate * (1.0 - (update - 1.0) / cfg.num_updates if cfg.anneal_lr else 1.0)
            lr, fired = injector.learning_rate(update, lr)
            injected += fired
            for group in optimizer.param_groups:
                group["lr"] = lr
            ent_coef, fired = injector.entropy_coef(update, cfg.ent_coef)
            injected += fired
            injected += injector.before_rollout(update, agent)

            # ---- rollout ---------------------------------------------------------------------
            ep_returns: list[float] = []
            ep_lengths: list[float] = []
            for step in range(T):
                next_obs, fired = injector.observation(update, step, next_obs)
                injected += fired
                obs[step] = next_obs
                dones[step] = next_done
                dones_host[step] = next_done_host
                with torch.no_grad():
                    out, state = act(next_obs, state, next_done)
                values[step] = out.value
                actions[step] = out.actions
                logprobs[step] = out.logprob
                head_logprobs[step] = torch.stack([out.head_logprobs[h] for h in heads], dim=-1)
                env_actions = out.actions.numpy() if H > 1 else out.actions[:, 0].numpy()
                obs_np, reward, terminated, truncated, info = envs.step(env_actions)
                next_done_host = np.logical_or(terminated, truncated)
                rewards[step] = torch.as_tensor(reward * cfg.reward_scale, dtype=torch.float32)
                cut = np.flatnonzero(truncated & ~terminated)  # time limit: bootstrap, as SB3 does
                if cut.size:
                    final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]))
                    cut_t = torch.as_tensor(cut)
                    with torch.no_grad():
                        cut_state = (state[0][:, cut_t], state[1][:, cut_t]) if recurrent else None
                        final_value = value_of(final_obs, cut_state, torch.zeros(cut.size))
                    rewards[step, cut_t] += cfg.gamma * final_value
                next_obs = torch.as_tensor(obs_np)
                next_done = torch.as_tensor(next_done_host, dtype=torch.float32)
                if "_episode" in info:
                    finished = info["_episode"]
                    ep_returns.extend(info["episode"]["r"][finished].tolist())
                    ep_lengths.extend(info["episode"]["l"][finished].tolist())

            # ---- GAE -------------------------------------------------------------------------
            with torch.no_grad():
                next_value = value_of(next_obs, state, next_done)
                advantages = torch.zeros_like(rewards)
                lastgaelam = torch.zeros(B)
                for t in reversed(range(T)):
                    if t == T - 1:
                        nextnonterminal, nextvalues = 1.0 - next_done, next_value
                    else:
                        nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
                    delta = rewards[t] + cfg.gamma * nextvalues * nextnonterminal - values[t]
                    lastgaelam = delta + cfg.gamma * cfg.gae_lambda * nextnonterminal * lastgaelam
                    advantages[t] = lastgaelam
                returns = advantages + values
            injected += injector.after_rollout(update, agent)
            logprobs, head_logprobs, fired = injector.old_logprobs(update, logprobs, head_logprobs)
            injected += fired

            b_obs = obs.reshape(-1, obs_dim)
            b_logprobs = logprobs.reshape(-1)
            b_head_logprobs = head_logprobs.reshape(-1, H)
            b_actions = actions.reshape(-1, H)
            b_dones = dones.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            if hub is not None:
                hub.observe_rollout(
                    advantages=b_advantages,
                    returns=b_returns,
                    values=b_values,
                    episode_returns=ep_returns or None,
                    episode_lengths=ep_lengths or None,
                )
            debug_terms = hub is not None and hub.level >= TelemetryLevel.DEBUG

            # ---- optimise ----------------------------------------------------------------------
            minibatches = steps_skipped = 0
            stop = False
            unroll = None
            reset_steps: list[int] = []
            for epoch in range(cfg.update_epochs):
                if recurrent:  # whole environment sequences, so the LSTM can be re-run
                    rng.shuffle(env_inds)
                    per = B // cfg.num_minibatches
                    batches = [
                        (env_inds[s : s + per], flat_inds[:, env_inds[s : s + per]].ravel())
                        for s in range(0, B, per)
                    ]
                else:  # shuffled samples
                    perm = rng.permutation(T * B)
                    per = T * B // cfg.num_minibatches
                    batches = [(None, perm[s : s + per]) for s in range(0, T * B, per)]
                for mb_envs, mb_np in batches:
                    mb_inds = torch.as_tensor(mb_np)
                    if recurrent:
                        reset_steps = (np.flatnonzero(dones_host[1:, mb_envs].any(axis=1)) + 1).tolist()
                        mb_state = (initial_state[0][:, mb_envs], initial_state[1][:, mb_envs])
                        unroll = agent.unroll(b_obs[mb_inds], mb_state, b_dones[mb_inds], reset_steps)
                        out = agent.policy(unroll.hidden, actions=b_actions[mb_inds])
                    else:
                        out = agent.policy(b_obs[mb_inds], actions=b_actions[mb_inds])
                    logratio = out.logprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - logratio).mean()

                    mb_adv = b_advantages[mb_inds]
                    if cfg.norm_adv:
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(
                        -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                    ).mean()
                    newvalue = out.value
                    if cfg.clip_vloss:
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds], -cfg.clip_coef, cfg.clip_coef
                        )
                        v_loss = 0.5 * torch.max(
                            (newvalue - b_returns[mb_inds]) ** 2, (v_clipped - b_returns[mb_inds]) ** 2
                        ).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()
                    loss = pg_loss - ent_coef * out.entropy.mean() + cfg.vf_coef * v_loss

                    mb_head_old = {h: b_head_logprobs[mb_inds, i] for i, h in enumerate(heads)}
                    if hub is not None:
                        head_losses = None
                        if debug_terms and H > 1:  # per-head surrogates: DEBUG head-to-head conflict
                            head_losses = {}
                            for h in heads:
                                r = (out.head_logprobs[h] - mb_head_old[h]).exp()
                                rc = torch.clamp(r, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                                head_losses[h] = torch.max(-mb_adv * r, -mb_adv * rc).mean()
                        hub.observe_loss_terms(policy_loss=pg_loss, value_loss=v_loss, head_losses=head_losses)
                    optimizer.zero_grad()
                    loss.backward()
                    if hub is not None:
                        hub.observe_gradients(loss)
                    grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                    if hub is not None:
                        hub.observe_minibatch(
                            new_logprob=out.logprob.detach(),
                            old_logprob=b_logprobs[mb_inds],
                            advantages=mb_adv.detach(),
                            clip_range=cfg.clip_coef,
                            entropy_coef=ent_coef,
                            epoch=epoch,
                            head_new_logprobs={h: lp.detach() for h, lp in out.head_logprobs.items()},
                            head_old_logprobs=mb_head_old,
                            head_entropies={h: e.detach() for h, e in out.head_entropies.items()},
                            actions={h: b_actions[mb_inds, i] for i, h in enumerate(heads)},
                            indices=mb_inds,
                            policy_loss=pg_loss.detach(),
                            value_loss=v_loss.detach(),
                        )
                    minibatches += 1
                    # The loop's own host read per minibatch (as CleanRL's): early stop and the guard.
                    kl, total_norm = torch.stack([approx_kl, grad_norm]).tolist()
                    if cfg.target_kl is not None and kl > 1.5 * cfg.target_kl:
                        stop = True
                        if hub is not None:
                            hub.early_stop(epoch=epoch, kl=kl)
                        break
                    if not math.isfinite(total_norm):
                        steps_skipped += 1
                        continue
                    optimizer.step()
                if stop:
                    break

            snapshot = None
            if hub is not None:
                if recurrent and unroll is not None:
                    gate_steps = min([cfg.lstm_telemetry_steps, *reset_steps])
                    snapshot = hub.end_update(
                        update,
                        lstm_state=state,
                        lstm_inputs=unroll.lstm_inputs[:gate_steps].detach(),
                        lstm_input_state=(
                            unroll.lstm_input_state[0].detach(),
                            unroll.lstm_input_state[1].detach(),
                        ),
                    )
                else:
                    snapshot = hub.end_update(update)
            yield UpdateRecord(
                update=update,
                seconds=time.perf_counter() - started,
                episodes=len(ep_returns),
                episode_return=float(np.mean(ep_returns)) if ep_returns else math.nan,
                minibatches=minibatches,
                steps_skipped=steps_skipped,
                injected=tuple(dict.fromkeys(injected)),
                snapshot=snapshot,
            )
    finally:
        envs.close()
