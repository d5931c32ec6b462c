"""Reading SB3's rollout buffer at ``on_rollout_end``: advantages, returns, values and episodes for
the hub, per-head old log-probs (one no-grad forward over the buffer), and the RecurrentPPO rollout
steps replayed for LSTM gate saturation."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.integrations.sb3.distributions import head_logprobs

__all__ = ["obs_slice"]

log = logging.getLogger("telemetry_core")


class _RolloutReader:
    """The callback's rollout side (a mixin of :class:`SimicCallback`, sharing its state)."""

    model: Any
    hub: TelemetryHub | None
    recurrent: bool
    gate_steps: int
    _bernoulli: bool
    _rollout_size: int
    _head_ratios_on: bool
    _head_check_done: bool
    _ep_returns: list[float]
    _ep_lengths: list[float]
    _head_old: Any
    _columns: np.ndarray | None
    _gate_capture: Any

    def _observe_rollout(self, level: TelemetryLevel) -> None:
        buf = self.model.rollout_buffer
        device = self.model.device
        values = torch.as_tensor(buf.values, device=device)
        self.hub.observe_rollout(
            raw_advantages=torch.as_tensor(buf.advantages, device=device),
            returns=torch.as_tensor(buf.returns, device=device),
            values=values,
            episode_returns=self._ep_returns or None,
            episode_lengths=self._ep_lengths or None,
        )
        if self._head_ratios_on:
            self._head_old = self._rollouthead_logprobs()
        if self.recurrent:  # host columns SB3's padding is applied to: head old log-probs, position
            positions = np.arange(self._rollout_size, dtype=np.float32)[:, None]
            head_old = self._head_old
            self._columns = positions if head_old is None else np.concatenate([head_old, positions], axis=1)
        if self.recurrent and level >= TelemetryLevel.NORMAL and self.gate_steps:
            self._gate_capture = self._capture_gate_inputs()

    def _flat_obs(self, obs: Any) -> Any:
        """Buffer observations (steps, envs, ...) in SB3's flattened order (env-major)."""
        buf = self.model.rollout_buffer
        if isinstance(obs, dict):
            return {k: buf.swap_and_flatten(v) for k, v in obs.items()}
        return buf.swap_and_flatten(obs)

    @torch.no_grad()
    def _rollouthead_logprobs(self) -> np.ndarray | torch.Tensor:
        """Each head's log-prob of the stored actions under the (unchanged) rollout policy, in the
        buffer's flattened order: ``(N, heads)``, a device tensor (PPO) or a host array (recurrent,
        for SB3's own padding), one no-grad forward over the buffer in batch-size chunks."""
        model, policy, buf = self.model, self.model.policy, self.model.rollout_buffer
        obs = self._flat_obs(buf.observations)
        actions = torch.as_tensor(buf.swap_and_flatten(buf.actions), device=model.device)
        n = actions.shape[0]
        masks = getattr(buf, "action_masks", None)
        if masks is not None:
            masks = torch.as_tensor(buf.swap_and_flatten(masks), device=model.device)
        if self.recurrent:
            starts = torch.as_tensor(buf.swap_and_flatten(buf.episode_starts), device=model.device).reshape(
                -1
            )
            # stored (steps, layers, envs, hidden) -> (layers, N, hidden): state before each step
            h = torch.as_tensor(
                buf.swap_and_flatten(buf.hidden_states_pi.swapaxes(1, 2)), device=model.device
            )
            c = torch.as_tensor(buf.swap_and_flatten(buf.cell_states_pi.swapaxes(1, 2)), device=model.device)
            h, c = h.transpose(0, 1), c.transpose(0, 1)
        chunk = max(int(model.batch_size), 1)
        parts = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            o = obs_slice(obs, sl, model.device)
            if self.recurrent:
                dist, _ = policy.get_distribution(
                    o, (h[:, sl].contiguous(), c[:, sl].contiguous()), starts[sl]
                )
            elif masks is not None:  # MaskablePPO: the masks the rollout acted under
                dist = policy.get_distribution(o, action_masks=masks[sl])
            else:
                dist = policy.get_distribution(o)
            parts.append(head_logprobs(dist, actions[sl], self._bernoulli))
        head_lp = torch.cat(parts)
        if not self._head_check_done:  # once: the heads must add up to SB3's stored joint log-prob
            self._head_check_done = True
            joint = torch.as_tensor(buf.swap_and_flatten(buf.log_probs), device=model.device).reshape(-1)
            err = (head_lp.sum(dim=1) - joint).abs().max().item()
            if not err <= 1e-4 * (1.0 + joint.abs().max().item()):
                log.warning(
                    "SimicCallback: per-head log-probs do not add up to SB3's stored log-prob "
                    "(max error %.3g): head ratios are off for this run",
                    err,
                )
                self._head_ratios_on = False
                return None
        return head_lp.cpu().numpy() if self.recurrent else head_lp

    def _capture_gate_inputs(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None:
        """The last ``gate_steps`` observations of every environment, their episode starts and the
        actor LSTM state SB3 stored before the first of them (host copies: the buffer is reset
        before the update is published)."""
        buf = self.model.rollout_buffer
        t = min(self.gate_steps, buf.buffer_size)
        t0 = buf.buffer_size - t
        starts = np.array(buf.episode_starts[t0:], dtype=np.float32)  # (t, envs)
        later = np.flatnonzero(starts[1:].any(axis=1))
        steps = int(later[0]) + 1 if later.size else t
        obs = buf.observations
        obs = (
            {k: np.array(v[t0 : t0 + steps]) for k, v in obs.items()}
            if isinstance(obs, dict)
            else np.array(obs[t0 : t0 + steps])
        )
        return obs, starts[0], np.array(buf.hidden_states_pi[t0]), np.array(buf.cell_states_pi[t0])

    @torch.no_grad()
    def _gate_inputs(
        self, capture: tuple[Any, np.ndarray, np.ndarray, np.ndarray]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        obs, start0, h0, c0 = capture
        policy, device = self.model.policy, self.model.device
        first = next(iter(obs.values())) if isinstance(obs, dict) else obs
        steps, envs = first.shape[:2]
        flat = (
            {k: v.reshape(steps * envs, *v.shape[2:]) for k, v in obs.items()}
            if isinstance(obs, dict)
            else (obs.reshape(steps * envs, *obs.shape[2:]))
        )
        features = policy.extract_features(obs_slice(flat, slice(None), device))
        if not policy.share_features_extractor:
            features = features[0]
        inputs = features.reshape(steps, envs, -1)
        keep = torch.as_tensor(1.0 - start0, device=device).view(1, envs, 1)
        h = torch.as_tensor(h0, device=device) * keep
        c = torch.as_tensor(c0, device=device) * keep
        return inputs, (h, c)


def obs_slice(obs: Any, sl: slice, device: torch.device) -> Any:
    if isinstance(obs, dict):
        return {k: torch.as_tensor(v[sl], device=device) for k, v in obs.items()}
    return torch.as_tensor(obs[sl], device=device)
