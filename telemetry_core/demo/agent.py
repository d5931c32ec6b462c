"""Recurrent actor-critic with one categorical head per action dimension (CleanRL LSTM-PPO style).

``obs -> encoder MLP -> nn.LSTM -> {one linear head per action dimension, critic}``, orthogonal
initialisation (gain sqrt(2) in the trunk, 0.01 on the policy heads so the initial policy is nearly
uniform, 1 on the critic), LSTM biases zero and weights orthogonal, as in CleanRL's
``ppo_atari_lstm.py``.

What the trainer and the telemetry need from it:

* per-head log-probabilities and entropies (:class:`PolicyOutput`); the joint log-prob is their sum
  because the heads are conditionally independent given the LSTM output;
* the LSTM's input features and the state they started from (``lstm_inputs`` / ``lstm_input_state``
  of :meth:`RecurrentAgent.unroll`), from which the telemetry recomputes gate activations with the
  ``nn.LSTM``'s own weights.

Two choices differ from CleanRL, both for the same reason (the hot path must not sync with the
host, and a poisoned network must not crash the loop):

* Actions are drawn by Gumbel-max (``argmax(logits + Gumbel noise)``), which samples exactly the
  categorical distribution, takes an explicit ``torch.Generator`` (so telemetry that draws random
  numbers cannot shift the training's random stream) and, unlike ``torch.multinomial``, does not
  raise when a NaN has reached the logits (the NaN-injection scenario): the loop carries on and the
  telemetry reports the non-finite values.
* ``Categorical(validate_args=False)``: argument validation is a host sync per call.

States are reset where an episode ended with ``torch.where`` rather than CleanRL's multiplication by
``1 - done``, so a NaN state is cleared too (``NaN * 0`` is NaN).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

__all__ = ["LSTMState", "PolicyOutput", "RecurrentAgent", "Unroll", "layer_init"]

LSTMState = tuple[torch.Tensor, torch.Tensor]


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std``, constant bias (CleanRL)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


@dataclass
class PolicyOutput:
    """Everything one forward pass yields, per head and joint. Shapes: (N,) unless noted."""

    actions: torch.Tensor  # (N, n_heads) int64
    logprob: torch.Tensor  # joint log-prob, sum over heads
    entropy: torch.Tensor  # joint entropy, sum over heads
    head_logprobs: dict[str, torch.Tensor]
    head_entropies: dict[str, torch.Tensor]
    value: torch.Tensor


@dataclass
class Unroll:
    """The LSTM pass over a (T, B) sequence: outputs, final state and what the telemetry reads."""

    hidden: torch.Tensor  # (T * B, hidden) LSTM outputs, time-major flattened
    state: LSTMState  # final (h, c), each (1, B, hidden)
    lstm_inputs: torch.Tensor  # (T, B, lstm input) the encoder features fed to the LSTM
    lstm_input_state: LSTMState  # the (h, c) the unroll started from, after the done-reset


class RecurrentAgent(nn.Module):
    """Encoder MLP -> single-layer ``nn.LSTM`` -> per-head categorical policy + scalar critic."""

    def __init__(
        self,
        obs_dim: int,
        heads: Mapping[str, int],
        *,
        encoder_sizes: Sequence[int] = (64,),
        lstm_hidden: int = 64,
    ) -> None:
        super().__init__()
        if obs_dim < 1 or not heads or any(n < 2 for n in heads.values()):
            raise ValueError(f"need obs_dim >= 1 and heads of >= 2 actions, got {obs_dim}, {dict(heads)}")
        layers: list[nn.Module] = []
        width = obs_dim
        for size in encoder_sizes:
            layers += [layer_init(nn.Linear(width, size)), nn.Tanh()]
            width = size
        self.encoder = nn.Sequential(*layers)
        self.lstm = nn.LSTM(width, lstm_hidden)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            elif "weight" in name:
                nn.init.orthogonal_(param, 1.0)
        self.heads = nn.ModuleDict(
            {name: layer_init(nn.Linear(lstm_hidden, n), std=0.01) for name, n in heads.items()}
        )
        self.critic = layer_init(nn.Linear(lstm_hidden, 1), std=1.0)
        self.head_sizes = dict(heads)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> LSTMState:
        """Zero (h, c) for ``batch`` environments, shaped as ``nn.LSTM`` wants: (1, batch, hidden)."""
        shape = (self.lstm.num_layers, batch, self.lstm.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def unroll(
        self,
        obs: torch.Tensor,
        state: LSTMState,
        done: torch.Tensor,
        reset_steps: Sequence[int] = (),
    ) -> Unroll:
        """Run the LSTM over ``obs`` ((T * B, obs_dim), time-major), resetting where episodes began.

        ``done[t, b]`` (flattened like ``obs``) marks that ``obs[t, b]`` is the first observation of an
        episode, so the state entering step t is zeroed for that environment (CleanRL's convention).
        ``reset_steps`` lists the t > 0 where any ``done[t]`` is set; the caller knows them from the
        environments' own (host) flags, so no device value is read here. Between two reset steps
        the LSTM runs as one fused ``nn.LSTM`` call instead of CleanRL's call per time step: the
        result is identical and the number of calls drops from T to (number of reset steps + 1).
        """
        batch = state[0].shape[1]
        if obs.ndim != 2 or obs.shape[0] == 0 or obs.shape[0] % batch:
            raise ValueError(f"obs must be (T * {batch}, obs_dim) with T >= 1, got {tuple(obs.shape)}")
        features = self.encoder(obs)
        seq = features.reshape(-1, batch, features.shape[-1])
        starts = done.reshape(-1, batch).bool()
        bounds = [0, *sorted(t for t in set(reset_steps) if 0 < t < seq.shape[0]), seq.shape[0]]
        outputs: list[torch.Tensor] = []
        input_state = state
        for t0, t1 in itertools.pairwise(bounds):
            reset = starts[t0].view(1, -1, 1)
            state = (
                torch.where(reset, torch.zeros_like(state[0]), state[0]),
                torch.where(reset, torch.zeros_like(state[1]), state[1]),
            )
            if t0 == 0:
                input_state = state
            out, state = self.lstm(seq[t0:t1], state)
            outputs.append(out)
        hidden = torch.cat(outputs).reshape(-1, self.lstm.hidden_size)
        return Unroll(hidden=hidden, state=state, lstm_inputs=seq, lstm_input_state=input_state)

    def get_value(self, obs: torch.Tensor, state: LSTMState, done: torch.Tensor) -> torch.Tensor:
        """Critic output (N,) for one time step."""
        return self.critic(self.unroll(obs, state, done).hidden).squeeze(-1)

    def policy(
        self,
        hidden: torch.Tensor,
        actions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PolicyOutput:
        """Per-head distributions on LSTM outputs; sample ``actions`` (Gumbel-max) when not given."""
        dists = {
            name: Categorical(logits=head(hidden), validate_args=False) for name, head in self.heads.items()
        }
        if actions is None:
            picked = []
            for dist in dists.values():
                logits = dist.logits
                uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
                gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
                picked.append(torch.argmax(logits + gumbel, dim=-1))
            actions = torch.stack(picked, dim=-1)
        head_logprobs = {name: d.log_prob(actions[:, i]) for i, (name, d) in enumerate(dists.items())}
        head_entropies = {name: d.entropy() for name, d in dists.items()}
        return PolicyOutput(
            actions=actions,
            logprob=torch.stack(list(head_logprobs.values())).sum(0),
            entropy=torch.stack(list(head_entropies.values())).sum(0),
            head_logprobs=head_logprobs,
            head_entropies=head_entropies,
            value=self.critic(hidden).squeeze(-1),
        )
