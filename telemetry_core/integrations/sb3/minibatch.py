"""One minibatch of ``train()``: the hub's per-minibatch statistics from SB3's own tensors (new and
old log-probs, advantages, masks), SB3's loss terms replicated with its formulas, per-head terms, and
the grad-carrying loss replicas DEBUG's gradient conflict needs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.integrations.sb3.distributions import head_distribution_terms, head_masks

__all__: list[str] = []


class _MinibatchReader:
    """The callback's minibatch side (a mixin of :class:`SimicCallback`, sharing its state)."""

    model: Any
    hub: TelemetryHub | None
    heads: dict[str, int]
    recurrent: bool
    _multi: bool
    _bernoulli: bool
    _continuous: bool
    _current: tuple[Any, int, np.ndarray | None, Any] | None
    _dist: Any
    _loss: torch.Tensor | None
    _last_kl: torch.Tensor | None
    _last_epoch: int
    _head_old: Any
    _columns: np.ndarray | None
    _clip_range: float
    _clip_range_vf: float | None

    def _observe_minibatch(
        self, values: torch.Tensor, log_prob: torch.Tensor, entropy: torch.Tensor | None
    ) -> None:
        hub = self.hub
        level = hub.level
        if level == TelemetryLevel.OFF:
            return
        model = self.model
        sample, epoch, batch_inds, pad = self._current
        clip = self._clip_range
        # RecurrentPPO pads its sequences: the real rows, as indices (one host sync per minibatch,
        # where SB3's own masked means make several), so every selection below is sync-free
        mask = torch.nonzero(sample.mask > 1e-8).squeeze(1) if self.recurrent else None

        def masked_mean(t: torch.Tensor) -> torch.Tensor:
            return t.mean() if mask is None else t[mask].mean()

        with torch.no_grad():
            new = log_prob.detach()
            old = sample.old_log_prob
            adv = self._normalized_advantages(sample.advantages, mask)
            values_d = values.detach().flatten()
            policy_loss, value_loss = self._losses(new, old, adv, values_d, sample, mask, clip)
            if level >= TelemetryLevel.DEBUG:  # SB3's total loss, for the DEBUG loss-finiteness check
                ent_loss = -masked_mean(entropy.detach()) if entropy is not None else -masked_mean(-new)
                self._loss = policy_loss + model.ent_coef * ent_loss + model.vf_coef * value_loss
            if model.target_kl is not None:  # SB3's early-stop KL, computed as SB3 does (float32)
                log_ratio = new - old
                self._last_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio)
            self._last_epoch = epoch

            head_new, head_ent, actions = self._head_terms(sample, entropy)
            action_masks = head_masks(self._dist, list(self.heads)) if head_ent is not None else None
            head_old = positions = None
            if batch_inds is not None and (self._head_old is not None or level >= TelemetryLevel.DEBUG):
                head_old, positions = self._rollout_columns(batch_inds, pad, new.device)
            head_new_logprobs = head_new if head_old is not None else None
            if mask is not None:
                new, old, adv = new[mask], old[mask], adv[mask]
                head_new_logprobs = _select(head_new_logprobs, mask)
                head_old = _select(head_old, mask)
                head_ent = _select(head_ent, mask)
                action_masks = _select(action_masks, mask)
                actions = _select(actions, mask)
                positions = positions[mask] if positions is not None else None
        if level >= TelemetryLevel.DEBUG:
            self._debug_loss_terms(log_prob, values, sample, mask)
        hub.observe_minibatch(
            new_logprob=new,
            old_logprob=old,
            advantages=adv,
            clip_range=clip,
            epoch=epoch,
            head_new_logprobs=head_new_logprobs,
            head_old_logprobs=head_old,
            head_entropies=head_ent,
            actions=actions if level >= TelemetryLevel.DEBUG else None,
            indices=positions if level >= TelemetryLevel.DEBUG else None,
            policy_loss=policy_loss,
            value_loss=value_loss,
            # SB3's loss is pg + ent_coef x (-entropy) + vf_coef x value loss: the same sign convention
            entropy_coef=ent_coef if isinstance(ent_coef := model.ent_coef, (int, float)) else None,
            # MaskablePPO: the normalised entropy divides by log(valid actions) per sample
            action_masks=action_masks or None,
        )

    def _normalized_advantages(self, adv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SB3's advantage normalisation (PPO: only when the minibatch has more than one sample);
        ``mask``: indices of the real rows of a RecurrentPPO minibatch."""
        if not self.model.normalize_advantage:
            return adv
        if mask is None:
            return (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv
        return (adv - adv[mask].mean()) / (adv[mask].std() + 1e-8)

    def _losses(
        self,
        new: torch.Tensor,
        old: torch.Tensor,
        adv: torch.Tensor,
        values: torch.Tensor,
        sample: Any,
        mask: torch.Tensor | None,
        clip: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SB3's clipped surrogate and value loss, exactly as ``PPO.train`` / ``RecurrentPPO.train``."""
        ratio = torch.exp(new - old)
        surrogate = torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip, 1 + clip))
        if self._clip_range_vf is None:
            values_pred = values
        else:
            values_pred = sample.old_values + torch.clamp(
                values - sample.old_values, -self._clip_range_vf, self._clip_range_vf
            )
        sq = (sample.returns - values_pred) ** 2
        if mask is None:
            return -surrogate.mean(), sq.mean()
        return -surrogate[mask].mean(), sq[mask].mean()

    def _head_terms(
        self, sample: Any, entropy: torch.Tensor | None
    ) -> tuple[
        dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None
    ]:
        """Per-head new log-probs, entropies and actions from the distribution SB3's loss used."""
        names = list(self.heads)
        acts = sample.actions.reshape(sample.actions.shape[0], -1)
        actions = None if self._continuous else {h: acts[:, i].long() for i, h in enumerate(names)}
        if not self._multi:
            ent = None if entropy is None else {names[0]: entropy.detach()}
            return None, ent, actions
        dist = self._dist
        if dist is None:  # a custom policy that builds its distribution elsewhere: no per-head terms
            return None, None, actions
        lp, ent = head_distribution_terms(dist, acts, self._bernoulli)
        head_new = {h: lp[:, i] for i, h in enumerate(names)}
        head_ent = {h: ent[:, i] for i, h in enumerate(names)}
        return head_new, head_ent, actions

    def _rollout_columns(
        self, batch_inds: np.ndarray, pad: Callable[..., torch.Tensor] | None, device: torch.device
    ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """Per-head old log-probs (when on) and rollout positions of this minibatch, in its layout."""
        names = list(self.heads)
        if self.recurrent:
            if pad is None or self._columns is None:
                return None, None
            cols = pad(self._columns[batch_inds])  # (n_seq, max_len, k): SB3's own padding
            cols = cols.reshape(-1, cols.shape[-1])
            heads = {h: cols[:, i] for i, h in enumerate(names)} if self._head_old is not None else None
            return heads, cols[:, -1].long()
        index = torch.as_tensor(batch_inds, device=device)
        stored = self._head_old
        head_old = None if stored is None else {h: stored[index, i] for i, h in enumerate(names)}
        return head_old, index

    def _debug_loss_terms(
        self, log_prob: torch.Tensor, values: torch.Tensor, sample: Any, mask: torch.Tensor | None
    ) -> None:
        """Grad-carrying replicas of SB3's policy and value losses (and per-head surrogates) for the
        hub's DEBUG gradient conflict, before SB3's backward."""
        adv = self._normalized_advantages(sample.advantages, mask).detach()
        clip = self._clip_range
        policy_loss, value_loss = self._losses(
            log_prob, sample.old_log_prob, adv, values.flatten(), sample, mask, clip
        )
        head_losses = None
        if (
            self._multi
            and self._head_old is not None
            and self._dist is not None
            and self._current[2] is not None
        ):
            acts = sample.actions.reshape(sample.actions.shape[0], -1)
            lp, _ = head_distribution_terms(self._dist, acts, self._bernoulli)
            head_old, _ = self._rollout_columns(self._current[2], self._current[3], lp.device)
            if head_old is not None:
                head_losses = {}
                for i, h in enumerate(self.heads):
                    r = torch.exp(lp[:, i] - head_old[h])
                    s = torch.min(adv * r, adv * torch.clamp(r, 1 - clip, 1 + clip))
                    head_losses[h] = -(s.mean() if mask is None else s[mask].mean())
        self.hub.observe_loss_terms(policy_loss=policy_loss, value_loss=value_loss, head_losses=head_losses)


def _select(tensors: Mapping[str, torch.Tensor] | None, mask: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v[mask] for k, v in tensors.items()}
