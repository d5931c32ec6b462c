"""The callback itself: SB3's events, the hub it builds or is given (kept across ``learn`` calls),
save / load, and the update boundary where one SB3 iteration becomes one published update."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback

from telemetry_core.config import TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.integrations.sb3.distributions import (
    check_distribution,
    heads_from_action_space,
    sb3_groups,
)
from telemetry_core.integrations.sb3.logger import loss_mismatches, sb3_log_values, train_values
from telemetry_core.integrations.sb3.minibatch import _MinibatchReader
from telemetry_core.integrations.sb3.rollout import _RolloutReader
from telemetry_core.integrations.sb3.state import read_state, write_state
from telemetry_core.integrations.sb3.train import _TrainHooks
from telemetry_core.schema import Snapshot

__all__ = ["SimicCallback"]

log = logging.getLogger("telemetry_core")


class SimicCallback(_TrainHooks, _MinibatchReader, _RolloutReader, BaseCallback):
    """Streams each PPO update of an SB3 model to simic-tui (see the package docstring for what is
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
        self._pending_timesteps: int | None = None  # SB3's timesteps of that update's logger dump
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
        check_distribution(policy)
        self._multi = len(self.heads) > 1
        self._bernoulli = isinstance(model.action_space, spaces.MultiBinary)
        self._continuous = isinstance(model.action_space, spaces.Box)
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
        # SB3 dumps its logger before train(): this update's train/* (and simic/*) values are written
        # at the next iteration's dump, after one more rollout; the snapshot carries that x-axis
        self._pending_timesteps = self.model.num_timesteps + self._rollout_size
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
        write_state(path, self.hub, self._last_step)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote: into the hub now if it is open, otherwise into the hub
        the next ``learn`` builds (or is given). Update steps continue from the saved ones."""
        state = read_state(path)
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
            log_std = getattr(model.policy, "log_std", None) if self._continuous else None
            if isinstance(log_std, torch.Tensor) and hub.level > TelemetryLevel.OFF:
                # the Gaussian head's log-std after the update: what the next rollout samples with
                hub.observe_log_std(next(iter(self.heads)), log_std.detach())
            if self.recurrent and model._last_lstm_states is not None:
                lstm_state = tuple(model._last_lstm_states.pi)
                if self._gate_capture is not None:
                    lstm_inputs, lstm_input_state = self._gate_inputs(self._gate_capture)
        snapshot = hub.end_update(
            step,
            lstm_state=lstm_state,
            lstm_inputs=lstm_inputs,
            lstm_input_state=lstm_input_state,
            timesteps=self._pending_timesteps,
        )
        self.last_snapshot = snapshot
        self.sb3_logged = train_values(model.logger)
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

    def _check_against_sb3(self, snapshot: Snapshot) -> None:
        """Our replica losses' means must equal what SB3 logged for the same minibatches."""
        bad = loss_mismatches(snapshot, self.sb3_logged)
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
