"""Stable-Baselines3: a callback that streams a PPO's training health to simic-tui.

``model.learn(total_timesteps, callback=SimicCallback(bind="tcp://127.0.0.1:5555"))`` works for
``stable_baselines3.PPO``, ``sb3_contrib.RecurrentPPO`` and ``sb3_contrib.MaskablePPO`` with
``Discrete``, ``MultiDiscrete`` and ``MultiBinary`` action spaces (each sub-action is a head; under
MaskablePPO every per-head term is that of the masked distribution the loss used, and the per-head
old log-probs are recomputed under the masks the rollout acted with). An action distribution the
callback cannot read per head is refused at the start of ``learn()``. One hub update is one SB3 iteration:
the rollout, then ``train()``; it is published right after ``train()`` returns (at the next
``on_rollout_start``, or ``on_training_end`` for the last one), so nothing lags.

SB3's ``BaseCallback`` only sees the rollout; ``train()`` is one closed method. What the callback
sees and how — every number below is computed from the tensors SB3 itself uses:

* **Rollout** (``on_rollout_end``, real): advantages, returns and value predictions straight from
  ``model.rollout_buffer`` after GAE; episode returns and lengths from the ``info["episode"]`` of
  each step (Monitor's, the same records SB3 puts in ``ep_info_buffer`` — read per step because
  that deque keeps only the last 100 episodes, fewer than a CartPole rollout can finish).
* **Every minibatch** (real): ``policy.evaluate_actions`` and ``rollout_buffer.get`` are wrapped on
  the instances while ``train()`` runs, so the callback sees each minibatch's new log-probs, the
  buffer's old log-probs, advantages, returns and (for RecurrentPPO) the padding mask — the very
  tensors of SB3's loss, before its optimizer step. Ratios, k1/k3 KL, clip fractions and ESS are
  therefore per minibatch and per epoch, as in a hand-written loop. SB3 does not hand its loss
  terms out: the policy and value losses are recomputed from those tensors with SB3's formulas
  (normalised advantages, clipped surrogate, optional ``clip_range_vf``, masks); after each update
  their means are checked against SB3's own ``train/policy_gradient_loss`` and ``train/value_loss``
  (``mismatches`` counts disagreements, e.g. a subclass with a different loss, and warns once).
* **Per head** (MultiDiscrete / MultiBinary): the action distribution ``evaluate_actions`` builds
  is captured (``policy._get_action_dist_from_latent`` is wrapped), giving each head's log-prob and
  entropy of every minibatch at no extra forward pass. SB3 stores only the joint old log-prob, so
  per-head *old* log-probs are recomputed once per update at ``on_rollout_end``, by one no-grad
  forward over the buffer with the unchanged rollout policy (for RecurrentPPO from the LSTM states
  SB3 stored per step); the first update checks that the heads sum to SB3's stored joint log-prob
  and turns head ratios off with a warning if they do not. Cost: one forward pass over the buffer
  per update (``head_ratios=False`` skips it; head entropies stay).
* **Gradients, before clipping** (real): SB3 runs ``backward``, ``clip_grad_norm_`` and ``step`` back
  to back inside ``train()``. A post-accumulate-grad hook on each parameter queues one callback on
  the autograd engine (``Variable._execution_engine.queue_callback``, the mechanism FSDP uses for
  its post-backward work) that runs when the whole backward has finished — still inside
  ``loss.backward()``, before SB3 clips — and calls ``hub.observe_gradients``. Measured in
  ``tests/test_sb3.py``: these norms equal the values ``clip_grad_norm_`` returns (its pre-clip
  norm) for every backward, while gradients read at ``optimizer.step`` (wrapping ``step``) are the
  clipped ones (never above ``max_grad_norm``), so wrapping ``step`` would hide exploding gradients.
* **Early stop** (``target_kl``): SB3 stops when a minibatch's k3 KL exceeds ``1.5 * target_kl``; the
  callback keeps that KL of the last minibatch on the device and reads it once per update at the
  boundary (one host read, only when ``target_kl`` is set) to report ``hub.early_stop``.
* **LSTM** (RecurrentPPO): the actor LSTM's final state ``model._last_lstm_states.pi`` at the end of
  the update, and gate saturation replayed from the last ``gate_steps`` rollout steps of every
  environment (their features through the current extractor, from the state SB3 stored at the first
  of them; cut at the first episode start after it so the replay sees what the LSTM saw).
* **DEBUG**: per-layer gradients, numerical report and ratio outliers (indices are rollout-buffer
  positions), and the policy/value gradient conflict from grad-carrying replicas of the two loss
  terms (and per-head surrogates when head ratios are on).

What SB3 hides or costs, plainly: the loss terms are replicas (checked each update, above); the
callback adds a few small kernels per minibatch and no host sync to PPO (SB3's own loop makes four
``.item()`` syncs per minibatch); for RecurrentPPO it finds the real (unpadded) rows once per
minibatch with one ``nonzero`` (a sync; SB3's masked means make several) and selects by index. The
hub's own per-minibatch reductions dominate the cost: ``benchmarks/bench_sb3.py`` measures it
against SB3's 64x64 MLP, where a minibatch step is itself only a few milliseconds. At OFF the
callback only counts episodes. Continuous (``Box``) action spaces are refused:
the hub's heads are discrete (entropy is normalised by ``log(number of actions)``). SB3's
``train/*`` logger values are what the callback's own statistics compute (read fresh at the
boundary, not one update late as a callback reading them at ``on_rollout_end`` would get them);
``sb3_logged`` holds the last update's, and ``on_update`` receives them with each snapshot.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from torch.autograd import Variable

from telemetry_core.config import TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.schema import Snapshot

__all__ = ["SimicCallback", "heads_from_action_space", "sb3_groups", "sb3_log_values"]

log = logging.getLogger("telemetry_core")

# Named parameter groups for SB3 actor-critic policies (prefixes of policy.named_parameters()).
_GROUP_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("features_extractor.", "pi_features_extractor.", "vf_features_extractor."),
    "lstm_actor": ("lstm_actor.",),
    "lstm_critic": ("lstm_critic.",),
    "actor": ("mlp_extractor.policy_net.", "action_net."),
    "critic": ("mlp_extractor.value_net.", "value_net.", "critic."),
}
_STATE_FORMAT = "simic-sb3-callback"
_STATE_VERSION = 1
# Losses whose means are compared with SB3's logger after each update.
_CHECKS = (
    ("policy", "policy_loss", "train/policy_gradient_loss"),
    ("value", "value_loss", "train/value_loss"),
)


def heads_from_action_space(space: spaces.Space, names: Sequence[str] | None = None) -> dict[str, int]:
    """Action heads of an SB3 action space: ``Discrete(n)`` -> one head, ``MultiDiscrete`` -> one per
    dimension, ``MultiBinary(n)`` -> ``n`` heads of 2. ``names`` overrides the default names
    (``action`` for Discrete, ``head0``, ``head1``... otherwise)."""
    if isinstance(space, spaces.Discrete):
        sizes = [int(space.n)]
        default = ["action"]
    elif isinstance(space, spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec)
        if nvec.ndim != 1:
            raise ValueError(
                f"MultiDiscrete action spaces must be 1-D for SB3, got nvec of shape {nvec.shape}"
            )
        sizes = [int(n) for n in nvec]
        default = [f"head{i}" for i in range(len(sizes))]
    elif isinstance(space, spaces.MultiBinary):
        if not isinstance(space.n, (int, np.integer)):
            raise ValueError(f"MultiBinary action spaces must be 1-D for SB3, got n={space.n!r}")
        sizes = [2] * int(space.n)
        default = [f"head{i}" for i in range(len(sizes))]
    else:
        raise ValueError(
            f"SimicCallback supports Discrete, MultiDiscrete and MultiBinary action spaces, not "
            f"{type(space).__name__}: the hub's heads are discrete (entropy is normalised by log(actions))"
        )
    if names is None:
        return dict(zip(default, sizes))
    names = list(names)
    if (
        len(names) != len(sizes)
        or len(set(names)) != len(names)
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(
            f"head_names must be {len(sizes)} distinct non-empty strings for {space}, got {names!r}"
        )
    return dict(zip(names, sizes))


def sb3_groups(policy: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter groups of an SB3 actor-critic policy: encoder, lstm_actor, lstm_critic, actor,
    critic (those that hold parameters), plus any other top-level module under its own name."""
    names = [n for n, p in policy.named_parameters()]
    groups: dict[str, list[str]] = {}
    covered: set[str] = set()
    for group, prefixes in _GROUP_PREFIXES.items():
        hit = [n for n in names if n.startswith(prefixes)]
        if hit:
            groups[group] = list(prefixes)
            covered.update(hit)
    for name in names:
        if name not in covered:
            top = name.split(".", 1)[0]
            groups.setdefault(top, [top + "." if "." in name else top])
    return groups


def sb3_log_values(snapshot: Snapshot) -> dict[str, float]:
    """The key health statistics of one update as ``simic/...`` logger values: KL (k3 mean over the
    update, and k3 / k1 of the last epoch that ran — SB3's ``train/approx_kl`` is that epoch's k3,
    whatever epoch ``target_kl`` stopped at), clip fraction, ratio extremes, ESS, entropy and
    normalised entropy per head, the pre-clip gradient norm and its clip rate, explained variance,
    and the number of warning / critical anomalies. Undefined values are left out."""
    out: dict[str, float] = {}
    p, g, v = snapshot.policy, snapshot.gradients, snapshot.value
    if p is not None:
        out["simic/kl_k3_mean"] = p.kl_k3_mean
        if p.kl_k3_per_epoch:
            out["simic/kl_k3_last_epoch"] = p.kl_k3_per_epoch[-1]
            out["simic/kl_k1_last_epoch"] = p.kl_k1_per_epoch[-1]
        out["simic/clip_fraction"] = p.clip_fraction
        out["simic/ratio_max"] = p.ratio_max
        out["simic/ratio_min"] = p.ratio_min
        out["simic/ess_min"] = p.ess_min
        for head, ent in p.entropy.items():
            out[f"simic/entropy/{head}"] = ent
        for head, ent in p.entropy_normalized.items():
            out[f"simic/entropy_normalized/{head}"] = ent
    if g is not None:
        out["simic/grad_norm_preclip"] = g.total_norm
        out["simic/grad_clip_rate"] = g.clip_rate
    if v is not None and v.explained_variance is not None:
        out["simic/explained_variance"] = v.explained_variance
    out["simic/anomalies_warning"] = float(sum(a.severity == "warning" for a in snapshot.anomalies))
    out["simic/anomalies_critical"] = float(sum(a.severity == "critical" for a in snapshot.anomalies))
    return {k: float(x) for k, x in out.items() if isinstance(x, (int, float)) and math.isfinite(x)}


class SimicCallback(BaseCallback):
    """Streams each PPO update of an SB3 model to simic-tui (see the module docstring for what is
    measured and how).

    Args:
        hub: a :class:`TelemetryHub` built on ``model.policy`` (it is not closed by the callback);
            by default the callback builds one at the start of the first ``learn`` from the model
            (heads from the action space, ``max_grad_norm``, planned updates, SB3 groups, the actor
            LSTM) and keeps it across later ``learn`` calls — chunked training continues the same
            recording, session and detector baselines, and update steps keep counting even when
            ``reset_num_timesteps=True`` restarts SB3's timesteps. That hub is closed by
            :meth:`close` (or ``with SimicCallback(...) as cb:``), when the callback is garbage
            collected, or at interpreter exit; after :meth:`close` a new ``learn`` builds a new one.
        head_names: names of the action heads (default ``action`` / ``head0``, ``head1``...).
        head_ratios: per-head ratios for multi-head action spaces (one extra no-grad forward over
            the buffer per update).
        gate_steps: RecurrentPPO rollout steps replayed for LSTM gate saturation (0: none).
        on_update: called after each update with the published snapshot (``None`` at OFF) and SB3's
            ``train/*`` values of that update.
        log_to_sb3: record the key health statistics of each update in SB3's logger under
            ``simic/`` (see :func:`sb3_log_values`), so they reach SB3's TensorBoard / CSV output
            beside ``train/*``, at SB3's timesteps.
        verbose: SB3 verbosity.
        **hub_kwargs: passed to :class:`TelemetryHub` when the callback builds it (``bind``,
            ``record``, ``config``, ``run_name``, ``groups``, ``strict``, ``publisher_options``).
    """

    def __init__(
        self,
        hub: TelemetryHub | None = None,
        *,
        head_names: Sequence[str] | None = None,
        head_ratios: bool = True,
        gate_steps: int = 8,
        on_update: Callable[[Snapshot | None, dict[str, float]], None] | None = None,
        log_to_sb3: bool = True,
        verbose: int = 0,
        **hub_kwargs: Any,
    ) -> None:
        super().__init__(verbose)
        if hub is not None and hub_kwargs:
            raise ValueError(
                f"pass either hub= or hub keyword arguments, not both (got {sorted(hub_kwargs)})"
            )
        if isinstance(gate_steps, bool) or not isinstance(gate_steps, int) or gate_steps < 0:
            raise ValueError(f"gate_steps must be an int >= 0, got {gate_steps!r}")
        self.hub = hub
        self._owns_hub = hub is None
        self._finalizer: weakref.finalize | None = None
        self._last_step = 0  # last update step handed to the hub, across learn() calls
        self._step_offset = 0
        self._restore: dict[str, Any] | None = None  # load()ed state awaiting the hub
        self._hub_kwargs = hub_kwargs
        self.head_names = head_names
        self.head_ratios = bool(head_ratios)
        self.gate_steps = gate_steps
        self.on_update = on_update
        self.log_to_sb3 = bool(log_to_sb3)
        self.last_snapshot: Snapshot | None = None
        self.sb3_logged: dict[str, float] = {}  # SB3's train/* values of the last update
        self.mismatches = 0  # updates whose replica losses disagreed with SB3's logged ones
        self.heads: dict[str, int] = {}
        self._installed = False
        self._armed = False  # between on_rollout_end and the end of train()
        self._pending: int | None = None  # update step awaiting end_update
        self._reset_update_state()

    # ------------------------------------------------------------------------------------------
    # SB3 callback events
    # ------------------------------------------------------------------------------------------
    def _on_training_start(self) -> None:
        model = self.model
        if not all(hasattr(model, a) for a in ("clip_range", "n_epochs", "rollout_buffer", "max_grad_norm")):
            raise TypeError(
                f"SimicCallback supports PPO, sb3-contrib RecurrentPPO and MaskablePPO, not {type(model).__name__}"
            )
        policy = model.policy
        self.recurrent = hasattr(policy, "lstm_actor")
        self.heads = heads_from_action_space(model.action_space, self.head_names)
        _check_distribution(policy)
        self._multi = len(self.heads) > 1
        self._bernoulli = isinstance(model.action_space, spaces.MultiBinary)
        self._rollout_size = model.n_steps * model.n_envs
        total = self.locals.get("total_timesteps")
        total_updates = (
            math.ceil(total / self._rollout_size) if isinstance(total, int) and total > 0 else None
        )
        if self.hub is None or (self._owns_hub and self.hub.closed):
            kwargs = dict(self._hub_kwargs)
            kwargs.setdefault("run_name", f"sb3-{type(model).__name__}")
            kwargs.setdefault("groups", sb3_groups(policy))
            self.hub = TelemetryHub(
                policy,
                heads=self.heads,
                max_grad_norm=float(model.max_grad_norm),
                total_updates=total_updates,
                lstm=policy.lstm_actor if self.recurrent else None,
                **kwargs,
            )
            self._last_step = 0
            # the hub outlives learn(): closed by close(), by collection of the callback or at exit
            self._finalizer = weakref.finalize(self, self.hub.close)
        else:
            names = [n for n, _ in policy.named_parameters()]
            if self.hub.run_info.param_names != names:
                raise ValueError(
                    "hub was not built on this model's policy (model.policy): its parameters differ"
                )
            if dict(self.hub.heads) != self.heads:
                raise ValueError(f"hub has heads {self.hub.heads} but the action space gives {self.heads}")
        if self._restore is not None:
            self._apply_state(self._restore)
            self._restore = None
        self._head_ratios_on = self.head_ratios and self._multi
        self._head_check_done = False
        self._pending = None
        # a learn() that restarts SB3's timesteps must not replay step numbers the hub already saw
        self._step_offset = max(0, self._last_step - model.num_timesteps // self._rollout_size)
        self._reset_update_state()
        self._install()

    def _on_rollout_start(self) -> None:
        self._finish_update()

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            episode = info.get("episode") if isinstance(info, dict) else None
            if episode is not None:
                self._ep_returns.append(float(episode["r"]))
                self._ep_lengths.append(float(episode["l"]))
        return True

    def _on_rollout_end(self) -> None:
        hub = self.hub
        assert hub is not None
        self._pending = self.model.num_timesteps // self._rollout_size + self._step_offset
        level = hub.level
        if level > TelemetryLevel.OFF:
            with hub.guard("sb3.rollout"):
                self._observe_rollout(level)
        self._ep_returns, self._ep_lengths = [], []
        self._armed = level > TelemetryLevel.OFF  # the level holds until this update's end_update

    def _on_training_end(self) -> None:
        self._finish_update()
        self._uninstall()

    def close(self) -> None:
        """Close the hub the callback built (its publisher and recording); a hub passed in is the
        caller's to close. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs hub.close once and detaches from exit
            self._finalizer = None

    def save(self, path: str | Path) -> None:
        """Write the hub's state (gradient EMA, detector baselines and history, open incidents) and
        the callback's update count to ``path`` (JSON), to keep beside ``model.save``; restore it
        with :meth:`load` before the next ``learn`` of the loaded model::

            model.save("ppo.zip"); cb.save("ppo.simic.json")
            ...
            model = PPO.load("ppo.zip", env=env)
            cb = SimicCallback(bind=...); cb.load("ppo.simic.json")
            model.learn(n, callback=cb, reset_num_timesteps=False)
        """
        if self.hub is None:
            raise RuntimeError("SimicCallback.save(): no hub yet (save after a learn() call)")
        state = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "last_step": self._last_step,
            "heads": dict(self.hub.heads),
            "hub": self.hub.state_dict(),
        }
        Path(path).write_text(json.dumps(state))

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote: into the hub now if it is open, otherwise into the hub
        the next ``learn`` builds (or is given). Update steps continue from the saved ones."""
        state = json.loads(Path(path).read_text())
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path} is not a SimicCallback state file")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: state version {state.get('version')!r}, expected {_STATE_VERSION}")
        if self.hub is not None and not self.hub.closed:
            self._apply_state(state)
        else:
            self._restore = state

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        hub = self.hub
        assert hub is not None
        if state["heads"] != dict(hub.heads):
            raise ValueError(f"saved state is for heads {state['heads']}, the hub has {dict(hub.heads)}")
        hub.load_state_dict(state["hub"])
        self._last_step = max(self._last_step, int(state["last_step"]))

    def __enter__(self) -> SimicCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # rollout
    # ------------------------------------------------------------------------------------------
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
            self._head_old = self._rollout_head_logprobs()
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
    def _rollout_head_logprobs(self) -> np.ndarray | torch.Tensor:
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
            o = _obs_slice(obs, sl, model.device)
            if self.recurrent:
                dist, _ = policy.get_distribution(
                    o, (h[:, sl].contiguous(), c[:, sl].contiguous()), starts[sl]
                )
            elif masks is not None:  # MaskablePPO: the masks the rollout acted under
                dist = policy.get_distribution(o, action_masks=masks[sl])
            else:
                dist = policy.get_distribution(o)
            parts.append(_head_logprobs(dist, actions[sl], self._bernoulli))
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

    # ------------------------------------------------------------------------------------------
    # train(): wrappers and hooks
    # ------------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._installed:
            return
        policy, buf = self.model.policy, self.model.rollout_buffer
        self._orig = {
            "evaluate_actions": (policy, policy.evaluate_actions),
            "_get_action_dist_from_latent": (policy, policy._get_action_dist_from_latent),
            "get": (buf, buf.get),
            "_get_samples": (buf, buf._get_samples),
        }
        orig_eval = policy.evaluate_actions
        orig_dist = policy._get_action_dist_from_latent
        orig_get = buf.get
        orig_samples = buf._get_samples

        def evaluate_actions(*args: Any, **kwargs: Any) -> Any:
            self._dist = None
            out = orig_eval(*args, **kwargs)
            if self._armed and self._current is not None:
                self._queued = False
                with self.hub.guard("sb3.minibatch"):
                    self._observe_minibatch(*out)
            return out

        def get_action_dist(*args: Any, **kwargs: Any) -> Any:
            dist = orig_dist(*args, **kwargs)
            self._dist = dist
            return dist

        def get(*args: Any, **kwargs: Any) -> Iterator[Any]:
            if not self._armed:
                yield from orig_get(*args, **kwargs)
                return
            epoch = self._epochs
            self._epochs += 1
            if epoch == 0:
                with self.hub.guard("sb3.train"):
                    self._start_train()
            for sample in orig_get(*args, **kwargs):
                self._current = (sample, epoch, self._batch_inds, self._layout)
                yield sample
            self._current = None

        def get_samples(batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            sample = orig_samples(batch_inds, *args, **kwargs)
            self._batch_inds = batch_inds
            self._layout = buf.pad if self.recurrent and hasattr(buf, "pad") else None
            return sample

        policy.evaluate_actions = evaluate_actions
        policy._get_action_dist_from_latent = get_action_dist
        buf.get = get
        buf._get_samples = get_samples
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook)
            for p in policy.parameters()
            if p.requires_grad
        ]
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed:
            return
        for name, (owner, _) in self._orig.items():
            owner.__dict__.pop(name, None)  # the instance attribute shadowed the class method
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._installed = False

    def _grad_hook(self, _param: torch.Tensor) -> None:
        # Runs inside backward as each parameter's gradient lands; the queued callback runs once
        # the whole backward is done, before SB3's clip_grad_norm_.
        if self._armed and not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        hub = self.hub
        with hub.guard("sb3.gradients"), torch.no_grad():  # never raise into SB3's backward
            hub.observe_gradients(self._loss if hub.level >= TelemetryLevel.DEBUG else None)

    def _start_train(self) -> None:
        model = self.model
        progress = model._current_progress_remaining
        self._clip_range = float(model.clip_range(progress))
        self._clip_range_vf = None if model.clip_range_vf is None else float(model.clip_range_vf(progress))

    # ------------------------------------------------------------------------------------------
    # one minibatch
    # ------------------------------------------------------------------------------------------
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
            action_masks = _head_masks(self._dist, list(self.heads)) if head_ent is not None else None
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
        )
        if action_masks:
            # MaskablePPO: the normalised entropy divides by log(valid actions) per sample; the
            # hub's policy reducer takes the masks beside the entropies observe_minibatch handed it
            hub._policy.observe_action_masks(head_ent, action_masks, level)

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
        actions = {h: acts[:, i].long() for i, h in enumerate(names)}
        if not self._multi:
            ent = None if entropy is None else {names[0]: entropy.detach()}
            return None, ent, actions
        dist = self._dist
        if dist is None:  # a custom policy that builds its distribution elsewhere: no per-head terms
            return None, None, actions
        lp, ent = _head_distribution_terms(dist, acts, self._bernoulli)
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
            lp, _ = _head_distribution_terms(self._dist, acts, self._bernoulli)
            head_old, _ = self._rollout_columns(self._current[2], self._current[3], lp.device)
            if head_old is not None:
                head_losses = {}
                for i, h in enumerate(self.heads):
                    r = torch.exp(lp[:, i] - head_old[h])
                    s = torch.min(adv * r, adv * torch.clamp(r, 1 - clip, 1 + clip))
                    head_losses[h] = -(s.mean() if mask is None else s[mask].mean())
        self.hub.observe_loss_terms(policy_loss=policy_loss, value_loss=value_loss, head_losses=head_losses)

    # ------------------------------------------------------------------------------------------
    # the update boundary
    # ------------------------------------------------------------------------------------------
    def _finish_update(self) -> None:
        self._armed = False
        self._current = None
        step, self._pending = self._pending, None
        if step is None or self.hub is None:
            return
        self._last_step = step
        hub, model = self.hub, self.model
        lstm_state = lstm_inputs = lstm_input_state = None
        with hub.guard("sb3.end_update"):
            if model.target_kl is not None and self._last_kl is not None:
                kl = float(self._last_kl)  # the one host read the callback adds per update
                if kl > 1.5 * model.target_kl:
                    hub.early_stop(epoch=self._last_epoch, kl=kl)
            if self.recurrent and model._last_lstm_states is not None:
                lstm_state = tuple(model._last_lstm_states.pi)
                if self._gate_capture is not None:
                    lstm_inputs, lstm_input_state = self._gate_inputs(self._gate_capture)
        snapshot = hub.end_update(
            step, lstm_state=lstm_state, lstm_inputs=lstm_inputs, lstm_input_state=lstm_input_state
        )
        self.last_snapshot = snapshot
        self.sb3_logged = {
            k: float(v)
            for k, v in model.logger.name_to_value.items()
            if k.startswith("train/") and _is_number(v)
        }
        if snapshot is not None:
            self._check_against_sb3(snapshot)
            if self.log_to_sb3:
                # recorded before SB3's next dump, which writes this update's train/* too: both land
                # at the same timesteps
                for key, value in sb3_log_values(snapshot).items():
                    model.logger.record(key, value)
        if self.on_update is not None:
            self.on_update(snapshot, dict(self.sb3_logged))
        self._reset_update_state()

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
        features = policy.extract_features(_obs_slice(flat, slice(None), device))
        if not policy.share_features_extractor:
            features = features[0]
        inputs = features.reshape(steps, envs, -1)
        keep = torch.as_tensor(1.0 - start0, device=device).view(1, envs, 1)
        h = torch.as_tensor(h0, device=device) * keep
        c = torch.as_tensor(c0, device=device) * keep
        return inputs, (h, c)

    def _check_against_sb3(self, snapshot: Snapshot) -> None:
        """Our replica losses' means must equal what SB3 logged for the same minibatches."""
        bad = []
        for part, field, key in _CHECKS:
            stats = getattr(snapshot, part)
            ours = None if stats is None else getattr(stats, field)
            theirs = self.sb3_logged.get(key)
            if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)):
                continue
            if abs(ours - theirs) > 1e-4 * (1.0 + abs(theirs)):
                bad.append(f"{key}: SB3 {theirs:.6g}, callback {ours:.6g}")
        if bad:
            self.mismatches += 1
            if self.mismatches == 1:
                log.warning(
                    "SimicCallback: SB3's logged losses differ from the callback's replica (%s); a custom "
                    "train() or loss? Ratios, KL and gradients are still SB3's own tensors",
                    "; ".join(bad),
                )

    def _reset_update_state(self) -> None:
        self._ep_returns: list[float] = []
        self._ep_lengths: list[float] = []
        self._epochs = 0
        self._current: tuple[Any, int, np.ndarray | None, Any] | None = None
        self._batch_inds: np.ndarray | None = None
        self._layout: Any = None
        self._dist: Any = None
        self._queued = False
        self._loss: torch.Tensor | None = None
        self._last_kl: torch.Tensor | None = None
        self._last_epoch = 0
        self._head_old: Any = None
        self._gate_capture: Any = None
        self._columns: np.ndarray | None = None
        self._clip_range = math.nan
        self._clip_range_vf: float | None = None


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _obs_slice(obs: Any, sl: slice, device: torch.device) -> Any:
    if isinstance(obs, dict):
        return {k: torch.as_tensor(v[sl], device=device) for k, v in obs.items()}
    return torch.as_tensor(obs[sl], device=device)


def _supported_distributions() -> tuple[type, ...]:
    from stable_baselines3.common.distributions import (
        BernoulliDistribution,
        CategoricalDistribution,
        MultiCategoricalDistribution,
    )

    known: tuple[type, ...] = (CategoricalDistribution, MultiCategoricalDistribution, BernoulliDistribution)
    try:
        from sb3_contrib.common.maskable.distributions import (
            MaskableCategoricalDistribution,
            MaskableMultiCategoricalDistribution,
        )
    except ImportError:  # sb3-contrib is optional
        return known
    # (MaskableBernoulliDistribution is a MaskableMultiCategoricalDistribution)
    return (*known, MaskableCategoricalDistribution, MaskableMultiCategoricalDistribution)


def _check_distribution(policy: Any) -> None:
    """Refuse, before the first rollout, an action distribution whose per-head terms the callback
    cannot read (its statistics would otherwise be missing from every update)."""
    dist = getattr(policy, "action_dist", None)
    if dist is None:
        return  # a custom policy without SB3's attribute: per-head terms are read when present
    if not isinstance(dist, _supported_distributions()):
        raise TypeError(
            f"SimicCallback cannot read the action distribution {type(dist).__name__} of "
            f"{type(policy).__name__}: supported are SB3's Categorical, MultiCategorical and Bernoulli "
            "distributions and sb3-contrib's maskable ones"
        )


def _head_distributions(dist: Any) -> list[Any] | None:
    """The per-head torch distributions of an SB3 MultiCategorical or an sb3-contrib maskable
    MultiCategorical / Bernoulli distribution (``None`` for SB3's Bernoulli, one joint one)."""
    heads = getattr(dist, "distributions", None)  # sb3-contrib's maskable ones, masks applied
    if heads is not None:
        return list(heads)
    inner = getattr(dist, "distribution", None)
    return list(inner) if isinstance(inner, (list, tuple)) else None


def _head_distribution_terms(
    dist: Any, actions: torch.Tensor, bernoulli: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, heads)`` log-probs and entropies from an SB3 MultiCategorical / Bernoulli distribution
    or an sb3-contrib maskable one (whose entropies are those of the masked heads)."""
    heads = _head_distributions(dist)
    if heads is None:
        if not bernoulli:
            raise TypeError(f"no per-head distributions in {type(dist).__name__}")
        d = dist.distribution
        return d.log_prob(actions), d.entropy()
    lps = [d.log_prob(a) for d, a in zip(heads, torch.unbind(actions, dim=1))]
    ents = [d.entropy() for d in heads]
    return torch.stack(lps, dim=1), torch.stack(ents, dim=1)


def _head_logprobs(dist: Any, actions: torch.Tensor, bernoulli: bool) -> torch.Tensor:
    return _head_distribution_terms(dist, actions.reshape(actions.shape[0], -1), bernoulli)[0]


def _head_masks(dist: Any, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Each head's bool ``(B, actions)`` mask of an sb3-contrib maskable distribution after
    ``apply_masking`` (heads without a mask left out), or ``None``."""
    if dist is None:
        return None
    heads = _head_distributions(dist)
    if heads is None:
        inner = getattr(dist, "distribution", None)
        heads = [inner] if inner is not None and len(names) == 1 else []
    masks = {h: m for h, d in zip(names, heads) if (m := getattr(d, "masks", None)) is not None}
    return masks or None


def _select(tensors: Mapping[str, torch.Tensor] | None, mask: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v[mask] for k, v in tensors.items()}


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
