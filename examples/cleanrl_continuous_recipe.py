"""CleanRL's ppo_continuous_action.py (a diagonal Gaussian policy) with simic-tui telemetry: the
lines marked ``# simic``.

Run it and attach the dashboard from another terminal::

    python examples/cleanrl_continuous_recipe.py --env-id Pendulum-v1 --total-timesteps 200000
    simic-tui attach 127.0.0.1:5555

The loop is CleanRL's: a state-independent log-std parameter, actions sampled from
``Normal(mean, exp(log_std))`` and clipped by the environment wrapper (``ClipAction``) only, so the
rollout buffer holds the actions *before clipping*; observation and reward normalisation; GAE; epochs
of shuffled minibatches; clipped objective and value loss; global-norm clipping; optional target-KL
stop. Its TensorBoard writer is replaced by one printed line per update. The Gaussian head is
registered as one head of size 1 (a continuous head has no number of actions; its entropy is the
differential one, summed over dimensions, as CleanRL computes it). Besides CleanRL's values the hub
gets the log-std parameter after each update (``observe_log_std``) and the rollout's pre-clip
actions with the action space's bounds (``observe_actions``, for the saturation share).

``main(args, before_update=...)`` calls ``before_update(iteration, agent, args)`` at the start of
each iteration: experiments (the calibration of the continuous-head rules) change the loop there,
e.g. the entropy coefficient or the log-std, without another copy of the loop.

What this loop shares with CleanRL's ppo.py and telemetry never touches (the hyperparameters, GAE,
the minibatch loss, the per-update line, the command line) is in ``cleanrl_common.py`` beside this
file, shared with ``cleanrl_recipe.py``; the loop, with every ``# simic`` line, is here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from cleanrl_common import PPOArgs, gae, layer_init, parse_args, ppo_loss, report, seed
from torch import nn, optim
from torch.distributions.normal import Normal

from telemetry_core import TelemetryHub  # simic


@dataclass
class Args(PPOArgs):
    """CleanRL ppo_continuous_action.py's defaults where they differ from ppo.py's (the rest:
    cleanrl_common.PPOArgs)."""

    env_id: str = "Pendulum-v1"
    learning_rate: float = 3e-4
    num_envs: int = 1
    num_steps: int = 2048  # rollout length per environment
    num_minibatches: int = 32
    update_epochs: int = 10
    ent_coef: float = 0.0


def make_env(env_id: str, gamma: float) -> Callable[[], gym.Env]:
    def thunk() -> gym.Env:
        env = gym.make(env_id)
        env = gym.wrappers.FlattenObservation(env)  # deal with dm_control's Dict observation space
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
        env = gym.wrappers.TransformReward(env, lambda reward: np.clip(reward, -10, 10))
        return env

    return thunk


def make_envs(args: Args) -> gym.vector.VectorEnv:
    """Same-step autoreset: the observation after a terminal step is the next episode's first, as
    CleanRL's buffer expects; episode statistics arrive in ``info["episode"]``."""
    return gym.vector.SyncVectorEnv(
        [make_env(args.env_id, args.gamma) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


class Agent(nn.Module):
    def __init__(self, envs: gym.vector.VectorEnv) -> None:
        super().__init__()
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        act_dim = int(np.prod(envs.single_action_space.shape))
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, act_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        action_mean = self.actor_mean(x)
        action_logstd = self.actor_logstd.expand_as(action_mean)
        probs = Normal(action_mean, torch.exp(action_logstd))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


BeforeUpdate = Callable[[int, Agent, Args], None]


def main(args: Args | None = None, before_update: BeforeUpdate | None = None) -> list[dict[str, Any]]:
    """Train; return one record per update (the loop's own CleanRL statistics and the snapshot)."""
    args = args or Args()
    device = seed(args)

    envs = make_envs(args)
    assert isinstance(envs.single_action_space, gym.spaces.Box), "only continuous action space is supported"
    agent = Agent(envs).to(device)
    bounds = envs.envs[0].unwrapped.action_space  # simic: the task's bounds (ClipAction widens the wrapper's)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    # fmt: off
    hub = TelemetryHub(agent, heads={"action": 1},  # simic: one Gaussian head
                       max_grad_norm=args.max_grad_norm, clip_range=args.clip_coef,  # simic
                       total_updates=args.num_iterations,  # simic
                       bind=args.bind, record=args.record, run_name="cleanrl-ppo-continuous")  # simic
    # fmt: on

    obs = torch.zeros((args.num_steps, args.num_envs, *envs.single_observation_space.shape), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs, *envs.single_action_space.shape), device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    records: list[dict[str, Any]] = []
    global_step = 0
    start_time = time.time()
    next_obs_np, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
    next_done = torch.zeros(args.num_envs, device=device)
    try:
        for iteration in range(1, args.num_iterations + 1):
            if before_update is not None:
                before_update(iteration, agent, args)
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            episodic_returns: list[float] = []
            episodic_lengths: list[float] = []  # simic
            for step in range(args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                dones[step] = next_done
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs)
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                next_obs_np, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
                next_done = torch.as_tensor(np.logical_or(terminations, truncations), dtype=torch.float32)
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
                final = infos.get("final_info", {})  # same-step autoreset: the ended episodes' info
                if "_episode" in final:
                    episodic_returns += final["episode"]["r"][final["_episode"]].tolist()
                    episodic_lengths += final["episode"]["l"][final["_episode"]].tolist()  # simic

            # bootstrap value if not done
            with torch.no_grad():
                next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages, returns = gae(args, rewards, values, dones, next_value, next_done)

            b_obs = obs.reshape((-1, *envs.single_observation_space.shape))
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape((-1, *envs.single_action_space.shape))
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            # fmt: off
            hub.observe_rollout(raw_advantages=b_advantages, returns=b_returns, values=b_values,  # simic
                                episode_returns=episodic_returns, episode_lengths=episodic_lengths)  # simic
            hub.observe_actions("action", b_actions, low=bounds.low, high=bounds.high)  # simic: pre-clip
            # fmt: on

            # Optimizing the policy and value network
            b_inds = np.arange(args.batch_size)
            clipfracs = []
            for epoch in range(args.update_epochs):  # noqa: B007 - CleanRL's own loop; the hub counts epochs
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb_inds = b_inds[start : start + args.minibatch_size]

                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        b_obs[mb_inds], b_actions[mb_inds]
                    )
                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                    # CleanRL's clipped objective, clipped value loss and entropy bonus
                    mb = ppo_loss(args, newlogprob, b_logprobs[mb_inds], mb_advantages, newvalue,
                                  b_returns[mb_inds], b_values[mb_inds], entropy)
                    clipfracs.append(mb.clipfrac)

                    optimizer.zero_grad()
                    mb.loss.backward()
                    hub.observe_gradients(mb.loss)  # simic: after backward, before clipping
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()
                    # fmt: off
                    hub.observe_minibatch(new_logprob=newlogprob.detach(), old_logprob=b_logprobs[mb_inds],  # simic
                                          advantages=mb_advantages, entropy=entropy.detach(),  # simic
                                          policy_loss=mb.pg_loss.detach(), value_loss=mb.v_loss.detach(),  # simic
                                          entropy_coef=args.ent_coef)  # simic: a negative one is told at once
                    # fmt: on

                if args.target_kl is not None and mb.approx_kl > args.target_kl:
                    hub.early_stop(kl=mb.approx_kl)  # simic: at the epoch the hub counted
                    break

            hub.observe_log_std("action", agent.actor_logstd.detach())  # simic: what the next rollout uses
            # simic: one host transfer, detection, publish; timesteps: CleanRL's TensorBoard x-axis
            snapshot = hub.end_update(iteration, timesteps=global_step)  # simic

            records.append(
                report(args, iteration=iteration, global_step=global_step, start_time=start_time,
                       learning_rate=optimizer.param_groups[0]["lr"], last=mb, clipfracs=clipfracs,
                       b_values=b_values, b_returns=b_returns, episodic_returns=episodic_returns,
                       episodic_lengths=episodic_lengths, snapshot=snapshot, return_width=8,
                       # the Gaussian head's own: what the continuous-head tests check
                       extra={"log_std": agent.actor_logstd.detach().double().clone(),
                              "actions": b_actions.detach().double().clone()},
                       extra_text=f"log-std {agent.actor_logstd.mean().item():6.3f}  ")
            )
    finally:
        hub.close()  # simic
        envs.close()
    return records


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
