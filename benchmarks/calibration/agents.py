"""The calibration agents' networks.

* :class:`MLPAgent`: CleanRL ``ppo.py``'s actor-critic (separate 64-64 tanh trunks for actor and
  critic, orthogonal init, 0.01 gain on the policy output, 1.0 on the value output), with one
  categorical output layer per action head.
* The recurrent agent is :class:`telemetry_core.demo.agent.RecurrentAgent` (encoder MLP -> LSTM ->
  heads and critic, CleanRL ``ppo_atari_lstm.py``'s init), built here on another environment, with
  another action count and other hyper-parameters than the demo's.

Both expose what the loop and the injected pathologies act on under the same names: ``heads``
(a ``ModuleDict`` of the output layers), ``critic`` (the value output layer), ``lstm`` (or None),
``head_sizes``. Actions are drawn by Gumbel-max with an explicit generator, as the demo does, so a
NaN that reaches the logits does not stop the rollout (the NaN injection must be seen, not crash).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributions import Categorical

from telemetry_core.demo.agent import PolicyOutput, RecurrentAgent, layer_init

__all__ = ["MLPAgent", "RecurrentAgent", "gumbel_max"]


def gumbel_max(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical sample per row: ``argmax(logits + Gumbel noise)`` (no host sync, NaN-tolerant)."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
    return torch.argmax(logits + gumbel, dim=-1)


class MLPAgent(nn.Module):
    """Feed-forward actor-critic with one categorical head per action dimension."""

    lstm: nn.LSTM | None = None

    def __init__(self, obs_dim: int, heads: Mapping[str, int], hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()

        def trunk() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = obs_dim
            for size in hidden:
                layers += [layer_init(nn.Linear(width, size)), nn.Tanh()]
                width = size
            return nn.Sequential(*layers)

        self.actor_body = trunk()
        self.heads = nn.ModuleDict(
            {name: layer_init(nn.Linear(hidden[-1], n), std=0.01) for name, n in heads.items()}
        )
        self.critic_body = trunk()
        self.critic = layer_init(nn.Linear(hidden[-1], 1), std=1.0)
        self.head_sizes = dict(heads)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.critic_body(obs)).squeeze(-1)

    def policy(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PolicyOutput:
        """Per-head distributions on ``obs`` (N, obs_dim); sample ``actions`` when not given."""
        features = self.actor_body(obs)
        dists = {
            name: Categorical(logits=head(features), validate_args=False) for name, head in self.heads.items()
        }
        if actions is None:
            actions = torch.stack([gumbel_max(d.logits, generator) for d in dists.values()], dim=-1)
        head_logprobs = {name: d.log_prob(actions[:, i]) for i, (name, d) in enumerate(dists.items())}
        head_entropies = {name: d.entropy() for name, d in dists.items()}
        return PolicyOutput(
            actions=actions,
            logprob=torch.stack(list(head_logprobs.values())).sum(0),
            entropy=torch.stack(list(head_entropies.values())).sum(0),
            head_logprobs=head_logprobs,
            head_entropies=head_entropies,
            value=self.get_value(obs),
        )
