"""The calls a training loop makes during an update: tensors handed to the device reducers.

This is the hot path (per rollout, per backward, per minibatch): nothing here syncs the device or
reads a tensor on the host; the update's one host transfer happens at ``end_update``. A failure is
telemetry's, never training's: counted and logged by the hub's guard.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.debug import DebugDiagnostics
from telemetry_core.hub.epochs import EpochCounter
from telemetry_core.reductions.advantage import AdvantageReducer, as_int
from telemetry_core.reductions.episodes import EpisodeReducer
from telemetry_core.reductions.gradients import GradientReducer
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.value import ValueReducer

__all__ = ["Observations"]


class Observations:
    """:class:`telemetry_core.hub.TelemetryHub`'s observe calls (the hub sets what they read)."""

    heads: dict[str, int]
    clip_range: float | None
    _only_head: str
    _level: TelemetryLevel
    _rollout_at: float | None
    _guard: Callable[[str], contextlib.AbstractContextManager[None]]
    _epochs: EpochCounter
    _grads: GradientReducer
    _policy: PolicyReducer
    _value: ValueReducer
    _adv: AdvantageReducer
    _episodes: EpisodeReducer
    _debug: DebugDiagnostics

    def observe_rollout(
        self,
        *,
        raw_advantages: torch.Tensor | None = None,
        returns: torch.Tensor,
        values: torch.Tensor,
        episode_returns: Sequence[float] | torch.Tensor | None = None,
        episode_lengths: Sequence[float] | torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
    ) -> None:
        """Once per update, on the rollout buffer: the advantages as GAE produced them (before any
        normalisation), the returns and the value predictions, same shape; the episodes that ended.

        ``advantages=`` is the older name of ``raw_advantages=`` (passing both is an error). The
        rollout's size (elements of ``raw_advantages``) is what :meth:`observe_minibatch` counts
        epochs against when the loop does not say its epoch.
        """
        if self._rollout_at is None:  # end of the rollout: the rank-straggler clock (distributed.py)
            self._rollout_at = time.perf_counter()
        if self._level == TelemetryLevel.OFF:
            return
        with self._guard("observe_rollout"):
            if advantages is not None:
                if raw_advantages is not None:
                    raise TypeError("pass raw_advantages= (or its older name advantages=), not both")
                raw_advantages = advantages
            if raw_advantages is None:
                raise TypeError(
                    "observe_rollout() needs raw_advantages= (the advantages as GAE produced them)"
                )
            self._value.observe_rollout(values, returns, level=self._level)
            self._adv.observe_rollout(raw_advantages, returns, level=self._level)
            self._epochs.rollout_samples += raw_advantages.numel()
            if episode_returns is not None:
                self._episodes.observe(episode_returns, episode_lengths, level=self._level)

    def observe_loss_terms(
        self,
        *,
        policy_loss: torch.Tensor | None = None,
        value_loss: torch.Tensor | None = None,
        head_losses: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Before ``backward``: separate loss terms for DEBUG gradient conflict (no-op below DEBUG)."""
        if self._level < TelemetryLevel.DEBUG:
            return
        with self._guard("observe_loss_terms"):
            self._debug.observe_loss_terms(
                policy_loss=policy_loss, value_loss=value_loss, head_losses=head_losses
            )

    def observe_gradients(self, loss: torch.Tensor | None = None) -> None:
        """After ``loss.backward()``, before clipping."""
        level = self._level
        if level == TelemetryLevel.OFF:
            return
        try:  # per backward: a plain try (free) on the hot path, the guard only on failure
            self._grads.observe(level)
            if level >= TelemetryLevel.DEBUG:
                self._debug.observe_gradients(loss)
        except Exception:
            with self._guard("observe_gradients"):
                raise

    def observe_minibatch(
        self,
        *,
        new_logprob: torch.Tensor,
        old_logprob: torch.Tensor,
        advantages: torch.Tensor | None = None,
        clip_range: float | None = None,
        epoch: int | None = None,
        entropy: torch.Tensor | None = None,
        head_new_logprobs: Mapping[str, torch.Tensor] | None = None,
        head_old_logprobs: Mapping[str, torch.Tensor] | None = None,
        head_entropies: Mapping[str, torch.Tensor] | None = None,
        actions: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
        policy_loss: torch.Tensor | None = None,
        value_loss: torch.Tensor | None = None,
        action_masks: Mapping[str, torch.Tensor] | None = None,
        entropy_coef: float | None = None,
    ) -> None:
        """After each minibatch: log-probs (joint and per head), entropies, advantages, losses.

        Args:
            advantages: the minibatch's advantages as fed to the loss (normalised or not, as the
                loop does it); the rollout's raw ones go to :meth:`observe_rollout`.
            clip_range: the PPO clip range (a Python or numpy number); may be omitted when the hub
                was built with ``clip_range=``.
            epoch: the epoch this minibatch belongs to. When omitted the hub counts: a new epoch
                starts at :meth:`next_epoch` once the loop calls it, and until then when this
                minibatch's samples would take the epoch past the rollout's size (one pass over
                the buffer, as CleanRL's, TorchRL's and SB3's loops make, a short last minibatch
                or a dropped remainder included). Without :meth:`observe_rollout` nor
                :meth:`next_epoch` every minibatch counts as epoch 0.
            entropy: a single-head policy's per-sample entropies (``head_entropies={head: ...}``
                for several heads; not both).
            action_masks: head -> bool ``(n, actions)`` tensor (True = valid) of a masked policy:
                that head's normalised entropy divides by log(valid actions) per sample instead
                of log(number of actions), so heavy masking does not read as entropy collapse.
            entropy_coef: the coefficient of the entropy term in the loss (``loss = pg -
                entropy_coef x entropy``; a Python or numpy number): a negative one rewards
                determinism and is told at once (``entropy_collapse``).
        """
        level = self._level
        if level == TelemetryLevel.OFF:
            return
        try:  # per minibatch: a plain try (free) on the hot path, the guard only on failure
            if clip_range is None:
                clip_range = self.clip_range
                if clip_range is None:
                    raise TypeError(
                        "observe_minibatch() needs clip_range= (or build the hub with clip_range=)"
                    )
            if entropy is not None:
                head_entropies = self._single_head_entropy(entropy, head_entropies)
            epoch = self._epochs.of(new_logprob) if epoch is None else as_int("epoch", epoch, minimum=0)
            self._policy.observe(
                new_logprob=new_logprob,
                old_logprob=old_logprob,
                clip_range=clip_range,
                epoch=epoch,
                head_new_logprobs=head_new_logprobs,
                head_old_logprobs=head_old_logprobs,
                head_entropies=head_entropies,
                policy_loss=policy_loss,
                level=level,
                entropy_coef=entropy_coef,
            )
            self._epochs.last = epoch
            if action_masks:
                self._policy.observe_action_masks(head_entropies or {}, action_masks, level)
            if value_loss is not None:
                self._value.observe_minibatch(value_loss, level=level)
            if advantages is not None and level >= TelemetryLevel.NORMAL:
                self._adv.observe_minibatch(advantages)
            if level >= TelemetryLevel.DEBUG:
                self._debug.observe_minibatch(
                    new_logprob,
                    old_logprob,
                    head_new_logprobs=head_new_logprobs,
                    head_old_logprobs=head_old_logprobs,
                    actions=actions,
                    indices=indices,
                    epoch=epoch,
                )
        except Exception:
            with self._guard("observe_minibatch"):
                raise

    def observe_log_std(self, head: str, log_std: torch.Tensor) -> None:
        """A continuous (diagonal Gaussian) head's log standard deviations (per dimension, or per
        sample and dimension), e.g. after each update: reported as their mean, min and max."""
        if self._level == TelemetryLevel.OFF:
            return
        with self._guard("observe_log_std"):
            self._policy.observe_log_std(head, log_std, self._level)

    def observe_actions(
        self,
        head: str,
        actions: torch.Tensor,
        *,
        low: Any = None,
        high: Any = None,
        squashed: bool = False,
    ) -> None:
        """A continuous head's sampled actions *before clipping*, ``(..., dims)`` (e.g. the rollout's,
        once per update), against the action bounds ``low``/``high`` (numbers or per-dimension
        values, such as the action space's): reported as the share beyond the bounds
        (``action_saturation``) and that of the worst dimension. A tanh-squashed head passes its
        pre-tanh values with ``squashed=True`` instead (share with ``|tanh(u)| > 0.99``). No sync."""
        if self._level == TelemetryLevel.OFF:
            return
        with self._guard("observe_actions"):
            self._policy.observe_actions(
                head, actions, low=low, high=high, squashed=squashed, level=self._level
            )

    def next_epoch(self) -> None:
        """Start a new epoch of the update for minibatches observed without ``epoch=``.

        Call it at the start of every epoch (a call before any minibatch of the current epoch was
        observed changes nothing, so the first epoch's call is harmless). From the first call on,
        for the rest of the run, epochs are counted by these calls only, not by samples: what a
        loop needs whose epochs are not one pass over the rollout (minibatches sampled with
        replacement). Called at the end of every epoch instead it counts the same, except in the
        first update when that update's first epoch runs past the rollout's size.
        """
        self._epochs.next_epoch()

    def _single_head_entropy(
        self, entropy: torch.Tensor, head_entropies: Mapping[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        if head_entropies is not None:
            raise TypeError("pass entropy= (one head) or head_entropies= (per head), not both")
        if len(self.heads) != 1:
            raise ValueError(
                f"entropy= is for a single-head policy; this hub has heads {list(self.heads)}: "
                "pass head_entropies={head: entropy, ...}"
            )
        return {self._only_head: entropy}

    def early_stop(self, *, epoch: int | None = None, kl: torch.Tensor | float | None = None) -> None:
        """The loop's target-KL early stop fired at ``epoch`` (default: the epoch of the last
        minibatch observed, given or counted)."""
        if self._level == TelemetryLevel.OFF:
            return
        with self._guard("early_stop"):
            epoch = self._epochs.last if epoch is None else as_int("epoch", epoch, minimum=0)
            self._policy.early_stop(epoch, kl)
