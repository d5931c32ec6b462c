"""CleanRL's ppo.py (CartPole, feed-forward) with simic-tui telemetry: the lines marked ``# simic``.

Run it and attach the dashboard from another terminal::

    python examples/cleanrl_recipe.py --total-timesteps 200000
    simic-tui attach 127.0.0.1:5555

``--bind none`` runs without the network, ``--record run.simrec`` keeps a recording for
``simic-tui replay`` / ``simic-tui export``. The loop is CleanRL's (vectorised envs, GAE, epochs of
shuffled minibatches, clipped objective, clipped value loss, entropy bonus, global-norm clipping,
optional target-KL stop); its TensorBoard writer is replaced by one printed line per update.
The hub adds the ``# simic`` lines only: it never changes what the loop computes. It takes the
loop's values as they are: the action space's ``n`` (a numpy integer), the advantages before
normalisation in ``observe_rollout`` and as fed to the loss in ``observe_minibatch``, the one head's
entropy, and no epoch (the hub counts epochs as passes over the rollout).

The parts of CleanRL's loop that telemetry never touches and that both recipes share (the
hyperparameters, GAE, the minibatch loss, the per-update line, the command line) are in
``cleanrl_common.py`` beside this file; the loop, with every ``# simic`` line, is here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from cleanrl_common import PPOArgs, gae, layer_init, parse_args, ppo_loss, report, seed
from torch import nn, optim
from torch.distributions.categorical import Categorical

from telemetry_core import TelemetryHub  # simic


@dataclass
class Args(PPOArgs):
    """CleanRL ppo.py's hyperparameters and defaults (all listed in cleanrl_common.PPOArgs)."""

    env_id: str = "CartPole-v1"


def make_envs(args: Args) -> gym.vector.VectorEnv:
    """Same-step autoreset (the observation after a terminal step is the next episode's first, as
    CleanRL's buffer expects) and per-episode returns in ``info["episode"]``."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(args.env_id) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


class Agent(nn.Module):
    def __init__(self, envs: gym.vector.VectorEnv) -> None:
        super().__init__()
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, envs.single_action_space.n), std=0.01),
        )

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


def main(args: Args | None = None) -> list[dict[str, Any]]:
    """Train; return one record per update (the loop's own CleanRL statistics and the snapshot)."""
    args = args or Args()
    device = seed(args)

    envs = make_envs(args)
    agent = Agent(envs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    # fmt: off
    hub = TelemetryHub(agent, heads={"action": envs.single_action_space.n},  # simic
                       max_grad_norm=args.max_grad_norm, clip_range=args.clip_coef,  # simic
                       total_updates=args.num_iterations,  # simic
                       bind=args.bind, record=args.record, run_name="cleanrl-ppo")  # simic
    # fmt: on

    obs = torch.zeros((args.num_steps, args.num_envs, *envs.single_observation_space.shape), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    records: list[dict[str, Any]] = []
    global_step = 0
    start_time = time.time()
    next_obs_np, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs_np, device=device)
    next_done = torch.zeros(args.num_envs, device=device)
    try:
        for iteration in range(1, args.num_iterations + 1):
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
                next_obs = torch.as_tensor(next_obs_np, device=device)
                if "_episode" in infos:
                    episodic_returns += infos["episode"]["r"][infos["_episode"]].tolist()
                    episodic_lengths += infos["episode"]["l"][infos["_episode"]].tolist()  # simic

            # bootstrap value if not done
            with torch.no_grad():
                next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages, returns = gae(args, rewards, values, dones, next_value, next_done)

            b_obs = obs.reshape((-1, *envs.single_observation_space.shape))
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            # fmt: off
            hub.observe_rollout(raw_advantages=b_advantages, returns=b_returns, values=b_values,  # simic
                                episode_returns=episodic_returns, episode_lengths=episodic_lengths)  # simic
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

            # simic: one host transfer, detection, publish; timesteps: CleanRL's TensorBoard x-axis
            snapshot = hub.end_update(iteration, timesteps=global_step)  # simic

            records.append(
                report(args, iteration=iteration, global_step=global_step, start_time=start_time,
                       learning_rate=optimizer.param_groups[0]["lr"], last=mb, clipfracs=clipfracs,
                       b_values=b_values, b_returns=b_returns, episodic_returns=episodic_returns,
                       episodic_lengths=episodic_lengths, snapshot=snapshot)
            )
    finally:
        hub.close()  # simic
        envs.close()
    return records


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
