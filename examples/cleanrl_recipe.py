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
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn, optim
from torch.distributions.categorical import Categorical

from telemetry_core import TelemetryHub  # simic


@dataclass
class Args:
    seed: int = 1
    env_id: str = "CartPole-v1"
    total_timesteps: int = 200_000
    learning_rate: float = 2.5e-4
    num_envs: int = 4
    num_steps: int = 128  # rollout length per environment
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    torch_threads: int | None = 1  # tiny networks run fastest on one thread
    bind: str | None = "tcp://127.0.0.1:5555"  # simic: where `simic-tui attach` connects (None: no network)
    record: str | None = None  # simic: a recording file for replay / export

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size


def make_envs(args: Args) -> gym.vector.VectorEnv:
    """Same-step autoreset (the observation after a terminal step is the next episode's first, as
    CleanRL's buffer expects) and per-episode returns in ``info["episode"]``."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(args.env_id) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


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
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")

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
                advantages = torch.zeros_like(rewards)
                lastgaelam = torch.zeros(args.num_envs, device=device)
                for t in reversed(range(args.num_steps)):
                    if t == args.num_steps - 1:
                        nextnonterminal = 1.0 - next_done
                        nextvalues = next_value
                    else:
                        nextnonterminal = 1.0 - dones[t + 1]
                        nextvalues = values[t + 1]
                    delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                    lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                    advantages[t] = lastgaelam
                returns = advantages + values

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
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()

                    with torch.no_grad():
                        # calculate approx_kl http://joschu.net/blog/kl-approx.html
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                    # Policy loss
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    # Value loss
                    newvalue = newvalue.view(-1)
                    if args.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                        )
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    optimizer.zero_grad()
                    loss.backward()
                    hub.observe_gradients(loss)  # simic: after backward, before clipping
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()
                    # fmt: off
                    hub.observe_minibatch(new_logprob=newlogprob.detach(), old_logprob=b_logprobs[mb_inds],  # simic
                                          advantages=mb_advantages, entropy=entropy.detach(),  # simic
                                          policy_loss=pg_loss.detach(), value_loss=v_loss.detach())  # simic
                    # fmt: on

                if args.target_kl is not None and approx_kl > args.target_kl:
                    hub.early_stop(kl=approx_kl)  # simic: at the epoch the hub counted
                    break

            # simic: one host transfer, detection, publish; timesteps: CleanRL's TensorBoard x-axis
            snapshot = hub.end_update(iteration, timesteps=global_step)  # simic

            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            record = {
                "iteration": iteration,
                "global_step": global_step,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "value_loss": v_loss.item(),
                "policy_loss": pg_loss.item(),
                "entropy": entropy_loss.item(),
                "old_approx_kl": old_approx_kl.item(),
                "approx_kl": approx_kl.item(),
                "clipfrac": float(np.mean(clipfracs)),
                "explained_variance": float(explained_var),
                "episodic_returns": episodic_returns,
                "episodic_lengths": episodic_lengths,
                "sps": int(global_step / (time.time() - start_time)),
                "snapshot": snapshot,
            }
            records.append(record)
            mean_return = f"{np.mean(episodic_returns):7.1f}" if episodic_returns else "      -"
            alarms = ", ".join(a.kind for a in snapshot.anomalies) if snapshot is not None else ""
            print(
                f"update {iteration:4d}/{args.num_iterations}  step {global_step:7d}  return {mean_return}  "
                f"kl {approx_kl.item():.4f}  clipfrac {record['clipfrac']:.3f}  EV {explained_var:5.2f}  "
                f"SPS {record['sps']}" + (f"  [{alarms}]" if alarms else "")
            )
    finally:
        hub.close()  # simic
        envs.close()
    return records


def parse_args(argv: list[str] | None = None) -> Args:
    """``--field-name value`` for every field of :class:`Args` (``none`` for an optional one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Args()
    for field in dataclasses.fields(Args):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        kind = {"int": int, "float": float, "str": str}[str(field.type).split(" ")[0]]
        optional = "None" in str(field.type)

        def convert(text: str, kind: Any = kind, optional: bool = optional) -> Any:
            return None if optional and text.lower() == "none" else kind(text)

        parser.add_argument(flag, type=convert, default=default, help=f"default: {default}")
    return Args(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
