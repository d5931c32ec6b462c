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
ratio-explosion        each head's action order     the learner rates each stored action by the
                       reversed between rollout     probability the actor gave its mirror image
                       and optimisation (an         (pi_new/pi_old = p_old(mirror)/p_old(a)):
                       actor/learner label          rare actions' ratios explode on the first
                       mismatch)                    minibatch, common ones collapse, KL jumps
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
    """Actor/learner action-order mismatch: the heads' outputs are reversed after the rollout.

    Between collecting the rollout and optimising on it, each head's output rows (weights and bias)
    are put in reverse order, as when the learner maps action indices differently from the actor
    (left/right swapped by a refactor, a checkpoint from an environment with another action order).
    The learner then rates every stored action by the probability the actor gave to its mirror
    image, so pi_new/pi_old = p_old(mirror)/p_old(action): actions that were rare become likely and
    their ratios explode (common ones collapse), and so does the KL. Weights stay reversed (the
    actor is the learner here): the next rollouts act on the swapped policy until PPO relearns.
    """

    kind = "ratio-explosion"

    def after_rollout(self, update: int, agent: RecurrentAgent) -> bool:
        if not self.active(update):
            return False
        with torch.no_grad():
            for head in agent.heads.values():
                head.weight.copy_(head.weight.flip(0))
                head.bias.copy_(head.bias.flip(0))
        return True


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
