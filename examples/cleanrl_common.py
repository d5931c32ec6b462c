"""What CleanRL's ppo.py and ppo_continuous_action.py share, unchanged by telemetry.

The two recipes (``cleanrl_recipe.py``, ``cleanrl_continuous_recipe.py``) keep the loop itself and
every ``# simic`` line; this module holds the parts of CleanRL's loop that the hub never touches and
that are the same in both: the hyperparameters they share, layer initialisation, GAE, the clipped
PPO loss with its KL and clip-fraction statistics, the per-update record and printed line, and the
command line. It is plain CleanRL: nothing here knows about telemetry.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = ["PPOArgs", "PPOLoss", "gae", "layer_init", "parse_args", "ppo_loss", "report", "seed"]


@dataclass
class PPOArgs:
    """CleanRL ppo.py's hyperparameters and defaults (a recipe overrides the defaults that differ)."""

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


def seed(args: PPOArgs) -> torch.device:
    """Threads and seeds as the recipes run them; the device they train on."""
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return torch.device("cpu")


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def gae(
    args: PPOArgs,
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    next_done: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CleanRL's generalised advantage estimation over a ``(num_steps, num_envs)`` rollout, bootstrapped
    from the value of the observation after it: ``(advantages, returns)``."""
    with torch.no_grad():
        advantages = torch.zeros_like(rewards)
        lastgaelam = torch.zeros(args.num_envs, device=rewards.device)
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
    return advantages, returns


class PPOLoss(NamedTuple):
    """One minibatch's loss terms and the statistics CleanRL logs of it."""

    loss: torch.Tensor  # what backward() runs on
    pg_loss: torch.Tensor
    v_loss: torch.Tensor
    entropy_loss: torch.Tensor
    old_approx_kl: torch.Tensor
    approx_kl: torch.Tensor  # CleanRL's target-KL stop reads this one
    clipfrac: float


def ppo_loss(
    args: PPOArgs,
    newlogprob: torch.Tensor,
    oldlogprob: torch.Tensor,
    mb_advantages: torch.Tensor,
    newvalue: torch.Tensor,
    mb_returns: torch.Tensor,
    mb_values: torch.Tensor,
    entropy: torch.Tensor,
) -> PPOLoss:
    """CleanRL's clipped objective, (clipped) value loss and entropy bonus for one minibatch."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()

    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean().item()

    # Policy loss
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb_returns) ** 2
        v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - mb_returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return PPOLoss(loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac)


def report(
    args: PPOArgs,
    *,
    iteration: int,
    global_step: int,
    start_time: float,
    learning_rate: float,
    last: PPOLoss,
    clipfracs: list[float],
    b_values: torch.Tensor,
    b_returns: torch.Tensor,
    episodic_returns: list[float],
    episodic_lengths: list[float],
    snapshot: Any,
    extra: dict[str, Any] | None = None,
    extra_text: str = "",
    return_width: int = 7,
) -> dict[str, Any]:
    """The update's record (CleanRL's TensorBoard scalars, the episodes, the hub's snapshot and
    ``extra``), printed as one line (``extra_text`` before the SPS); ``last``: the last minibatch's
    loss."""
    y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
    var_y = np.var(y_true)
    explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
    record = {
        "iteration": iteration,
        "global_step": global_step,
        "learning_rate": learning_rate,
        "value_loss": last.v_loss.item(),
        "policy_loss": last.pg_loss.item(),
        "entropy": last.entropy_loss.item(),
        "old_approx_kl": last.old_approx_kl.item(),
        "approx_kl": last.approx_kl.item(),
        "clipfrac": float(np.mean(clipfracs)),
        "explained_variance": float(explained_var),
        "episodic_returns": episodic_returns,
        "episodic_lengths": episodic_lengths,
        "sps": int(global_step / (time.time() - start_time)),
        "snapshot": snapshot,
        **(extra or {}),
    }
    mean_return = f"{np.mean(episodic_returns):{return_width}.1f}" if episodic_returns else " " * (return_width - 1) + "-"
    alarms = ", ".join(a.kind for a in snapshot.anomalies) if snapshot is not None else ""
    print(
        f"update {iteration:4d}/{args.num_iterations}  step {global_step:7d}  return {mean_return}  "
        f"kl {last.approx_kl.item():.4f}  clipfrac {record['clipfrac']:.3f}  EV {explained_var:5.2f}  "
        + extra_text
        + f"SPS {record['sps']}"
        + (f"  [{alarms}]" if alarms else "")
    )
    return record


def parse_args(args_type: type[PPOArgs], description: str, argv: list[str] | None = None) -> Any:
    """``--field-name value`` for every field of ``args_type`` (``none`` for an optional one)."""
    parser = argparse.ArgumentParser(description=description)
    defaults = args_type()
    for field in dataclasses.fields(args_type):
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
    return args_type(**vars(parser.parse_args(argv)))
