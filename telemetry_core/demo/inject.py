"""Pathology injection: break the demo's training the way real runs break, never by writing a statistic.

``--inject KIND[@UPDATE]`` arms one :class:`Pathology`. Each acts on the *training* (a coefficient,
the learning rate, weights, an observation) at a hook of the update loop, and the telemetry then has
to notice the consequences by itself. ``UPDATE`` counts from 1 like the loop's ``update`` (the step of
the snapshots); without it the pathology starts at 30% of the planned updates.

=====================  ==========================  =============================================
kind                   mechanism                   why it produces the pathology
=====================  ==========================  =============================================
entropy-collapse       entropy coefficient flipped  the loss now *rewards* low entropy, so every
                       to -0.5 from UPDATE on       step sharpens every head until it is
                                                    deterministic (a sign error in a config)
kl-spike               learning rate x 40 for one   the first minibatch's step moves the policy
                       update                       far outside the trust region: the next
                                                    minibatches' KL is large (the loop's target-KL
                                                    early stop then fires)
ratio-explosion        the rollout's stored old     every stored pi_old(a) is raised to the 8th
                       log-probs x 8 (an actor      power: ratio = pi_old(a)^-7 on every sample
                       that sums an action's        (above 10x wherever pi_old(a) < 0.72), on a
                       log-prob over the 8 frames   near-uniform policy or a decided one; KL
                       an action repeat holds it)   jumps. Only old log-probs that do not belong
                                                    to the acting policy put a large share of
                                                    ratios past 10x (see RatioExplosion)
value-collapse         critic head re-initialised   the critic predicts one constant for every
                       to zero before the rollout   state (a checkpoint loaded without its value
                                                    head): std(values) = 0, value loss jumps
nan-gradients          one observation of one       the NaN flows through encoder, LSTM and GAE
                       environment becomes NaN      into that minibatch's loss: its gradients are
                       mid-rollout (sensor glitch)  NaN (the loop skips such steps, see ppo.py)
exploding-gradients    critic head weights x 100    the value error grows ~100x and its gradient
                       (a mis-scaled checkpoint)    reaches the shared trunk multiplied by the
                                                    scaled weights again: pre-clip norm ~1e3-1e4
                                                    x max_grad_norm; clipping hides it from the
                                                    optimiser, not from the telemetry
lstm-explosion         both LSTM bias vectors       every gate's pre-activation gains +10: gates
                       filled with 5 (an init slip  pinned at 1 (saturated, no gradient), g ~ +1,
                       meant for the forget slice)  so the cell adds ~1 per step and never
                                                    forgets: |c| grows with episode length
=====================  ==========================  =============================================

Weight changes are made under ``torch.no_grad()`` and leave the optimiser's state alone, as a real
checkpoint mix-up would. All mechanisms act once except entropy-collapse, whose wrong coefficient stays
(as a wrong config value would); one-shot damage to weights persists until training repairs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from telemetry_core.demo.cli import DEFAULT_INJECT_FRACTION, INJECTION_KINDS, Injection, parse_injection

if TYPE_CHECKING:
    from telemetry_core.demo.agent import RecurrentAgent

__all__ = [
    "DEFAULT_INJECT_FRACTION",
    "INJECTION_KINDS",
    "Injection",
    "Injector",
    "Pathology",
    "parse_injection",
]


class Pathology:
    """One injected failure. Subclasses override the hooks they act through; all default to no-ops.

    Hooks are called by the trainer with ``update`` (1-based). ``start`` is the first update affected.
    """

    kind: ClassVar[str] = ""

    def __init__(self, start: int, rollout_steps: int) -> None:
        self.start = start
        self.rollout_steps = rollout_steps

    def active(self, update: int) -> bool:
        """One-shot by default: acts at ``start`` only."""
        return update == self.start

    def before_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        """Change weights before the update's rollout. Return True if it acted."""
        return False

    def observation(self, update: int, step: int, obs: torch.Tensor) -> torch.Tensor | None:
        """Return a corrupted copy of the rollout observation ``obs`` at ``step``, or None."""
        return None

    def after_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        """Change weights between the rollout and the optimisation epochs. Return True if it acted."""
        return False

    def old_logprobs(self, update: int, logprobs: torch.Tensor) -> torch.Tensor | None:
        """Return corrupted stored old log-probs (joint or per head, any shape), or None."""
        return None

    def learning_rate(self, update: int, lr: float) -> float:
        return lr

    def entropy_coef(self, update: int, coef: float) -> float:
        return coef


class EntropyCollapse(Pathology):
    """Entropy coefficient with the wrong sign (and large): the loss rewards determinism.

    The magnitude sets which term leads, not the pace: Adam and global-norm clipping fix the step
    size and the loop's target-KL early stop caps how far each update moves, so -0.5 and -2 collapse
    a head alike (about 10-50% of its entropy per update, every update cut short by the stop), while
    the sign error alone (-0.01 for +0.01) leaves the policy gradient in charge: the entropy barely
    moves in 8 updates (measured on seeds 2 and 3, injected at update 90 of 300).
    """

    kind = "entropy-collapse"
    coef = -0.5

    def active(self, update: int) -> bool:
        return update >= self.start

    def entropy_coef(self, update: int, coef: float) -> float:
        return self.coef if self.active(update) else coef


class KLSpike(Pathology):
    """A one-update learning-rate spike (a bad schedule or a restart with the wrong LR)."""

    kind = "kl-spike"
    factor = 40.0

    def learning_rate(self, update: int, lr: float) -> float:
        return lr * self.factor if self.active(update) else lr


class RatioExplosion(Pathology):
    """Old log-probs that do not belong to the policy that acted: each stored log-prob is 8x too large.

    The actor repeats each action for 8 frames and adds its log-prob once per frame, so the rollout
    stores ``8 log pi_old(a)`` for a decision the learner rates once: ``pi_new/pi_old`` starts at
    ``pi_old(a)^-7`` on every sample of the first minibatch (above 10 wherever ``pi_old(a) < 0.72``,
    above 20 below 0.65), whatever the policy. Acts on one rollout's stored log-probs (joint and
    per head) only; the weights are untouched.

    Why not a behaviour policy that merely differs from the learner's (a mirrored action order,
    stale weights, an actor at another temperature): when the stored log-probs are those of the
    policy that sampled the actions, ``E[ratio] = 1`` under that policy, so at most ``1/c`` of the
    samples can have a ratio above ``c`` (Markov's inequality) and none can where it gives every
    action more than ``1/c`` of the new probability: on the near-uniform policies of early training
    (3 actions at normalised entropy 0.97, every probability above 0.25) such a mismatch moves the
    KL, never a ratio past 5. A large ratio tail needs stored log-probs that are wrong.
    """

    kind = "ratio-explosion"
    repeat = 8

    def old_logprobs(self, update: int, logprobs: torch.Tensor) -> torch.Tensor | None:
        return logprobs * self.repeat if self.active(update) else None


class ValueCollapse(Pathology):
    """Critic head reset to zero: the value function predicts one constant."""

    kind = "value-collapse"

    def before_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        if not self.active(update):
            return False
        with torch.no_grad():
            agent.critic.weight.zero_()
            agent.critic.bias.zero_()
        return True


class NaNGradients(Pathology):
    """A NaN observation from one environment half-way through the rollout (a sensor glitch)."""

    kind = "nan-gradients"
    env_index = 0

    def observation(self, update: int, step: int, obs: torch.Tensor) -> torch.Tensor | None:
        if not self.active(update) or step != self.rollout_steps // 2:
            return None
        corrupted = obs.clone()
        corrupted[self.env_index] = float("nan")
        return corrupted


class ExplodingGradients(Pathology):
    """Critic head weights scaled x100 (a checkpoint saved in other units, a wrong init gain)."""

    kind = "exploding-gradients"
    scale = 100.0

    def before_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        if not self.active(update):
            return False
        with torch.no_grad():
            agent.critic.weight.mul_(self.scale)
            agent.critic.bias.mul_(self.scale)
        return True


class LSTMExplosion(Pathology):
    """LSTM biases filled with a large constant: every gate pinned open, the cell an integrator.

    The classic initialisation slip: ``bias.data.fill_(5.0)`` meant for the forget-gate slice, applied
    to the whole stacked bias (input, forget, cell, output) of both bias vectors. Each gate's
    pre-activation gains +10: input, forget and output gates sit at sigmoid(10) ~ 0.99995
    (saturated: no gradient flows through them), the candidate ``g = tanh(10 + ...)`` ~ +1, so the
    cell adds ~1 per step and never forgets (``c_t ~ t``: its norm grows with episode length) and
    ``h = o * tanh(c)`` is pinned near 1 whatever the input (the memory stops carrying information).
    """

    kind = "lstm-explosion"
    bias = 5.0

    def before_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        if not self.active(update):
            return False
        with torch.no_grad():
            agent.lstm.bias_ih_l0.fill_(self.bias)
            agent.lstm.bias_hh_l0.fill_(self.bias)
        return True


_KINDS: dict[str, type[Pathology]] = {
    cls.kind: cls
    for cls in (
        EntropyCollapse,
        KLSpike,
        RatioExplosion,
        ValueCollapse,
        NaNGradients,
        ExplodingGradients,
        LSTMExplosion,
    )
}
if set(_KINDS) != set(INJECTION_KINDS):  # the torch-free CLI lists the same kinds
    raise ImportError(f"inject.py implements {sorted(_KINDS)} but cli.py lists {sorted(INJECTION_KINDS)}")


@dataclass
class Injector:
    """The armed pathologies of one run; the trainer calls its hooks every update."""

    pathologies: list[Pathology] = field(default_factory=list)

    @classmethod
    def build(cls, injections: Iterable[Injection | str], num_updates: int, rollout_steps: int) -> Injector:
        default = max(1, round(DEFAULT_INJECT_FRACTION * num_updates))
        out: list[Pathology] = []
        for item in injections:
            inj = parse_injection(item) if isinstance(item, str) else item
            if inj.kind not in _KINDS:
                raise ValueError(
                    f"unknown injection {inj.kind!r}; choose one of {', '.join(INJECTION_KINDS)}"
                )
            start = default if inj.update is None else inj.update
            if start > num_updates:
                raise ValueError(f"injection {inj} starts after the last planned update ({num_updates})")
            out.append(_KINDS[inj.kind](start, rollout_steps))
        return cls(out)

    def before_rollout(self, update: int, agent: RecurrentAgent) -> list[str]:
        return [p.kind for p in self.pathologies if p.before_rollout(update, agent)]

    def observation(self, update: int, step: int, obs: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        fired: list[str] = []
        for p in self.pathologies:
            corrupted = p.observation(update, step, obs)
            if corrupted is not None:
                obs = corrupted
                fired.append(p.kind)
        return obs, fired

    def after_rollout(self, update: int, agent: RecurrentAgent) -> list[str]:
        return [p.kind for p in self.pathologies if p.after_rollout(update, agent)]

    def old_logprobs(
        self, update: int, logprobs: torch.Tensor, head_logprobs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The rollout's stored log-probs (joint and per head), corrupted by any armed pathology."""
        fired: list[str] = []
        for p in self.pathologies:
            joint, per_head = p.old_logprobs(update, logprobs), p.old_logprobs(update, head_logprobs)
            if joint is not None and per_head is not None:
                logprobs, head_logprobs = joint, per_head
                fired.append(p.kind)
        return logprobs, head_logprobs, fired

    def learning_rate(self, update: int, lr: float) -> tuple[float, list[str]]:
        fired: list[str] = []
        for p in self.pathologies:
            new = p.learning_rate(update, lr)
            if new != lr:
                fired.append(p.kind)
            lr = new
        return lr, fired

    def entropy_coef(self, update: int, coef: float) -> tuple[float, list[str]]:
        fired: list[str] = []
        for p in self.pathologies:
            new = p.entropy_coef(update, coef)
            if new != coef:
                fired.append(p.kind)
            coef = new
        return coef, fired

    def kinds(self) -> Sequence[str]:
        return [p.kind for p in self.pathologies]
