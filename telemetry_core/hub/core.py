"""TelemetryHub: the one object a training loop holds.

The loop hands tensors over as it runs; every statistic is reduced on the device; at
``end_update`` one host transfer materialises the whole update, the anomaly detector judges it,
and the snapshot goes out (publisher thread, recorder thread) without the training thread ever
waiting. Commands from dashboards (DEBUG leases, level changes, profiles) are applied at update
boundaries only and acknowledged with the step at which they take effect.

Errors inside telemetry are logged once per kind, counted in the snapshot's counters and never
raised into training; ``strict=True`` (for tests) re-raises them.

Typical use (see README for the ~10 lines a CleanRL-style loop adds)::

    with TelemetryHub(agent, heads={"direction": 2, "force": 3}, max_grad_norm=0.5,
                      total_updates=num_updates, lstm=agent.lstm) as hub:
        for update in range(num_updates):
            ...rollout, GAE...
            hub.observe_rollout(raw_advantages=b_adv, returns=b_returns, values=b_values)
            for epoch in range(update_epochs):
                for mb in minibatches:
                    ...loss...
                    loss.backward()
                    hub.observe_gradients(loss)
                    nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                    optimizer.step(); optimizer.zero_grad()
                    hub.observe_minibatch(new_logprob=..., old_logprob=..., advantages=mb_adv,
                                          clip_range=0.2, epoch=epoch)
            hub.end_update(update, lstm_state=(h, c))

Numbers may be Python or numpy numbers wherever the API takes one (``heads={"action":
envs.single_action_space.n}``, a ``np.float32`` clip range); a tensor is refused where reading it
would sync the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from telemetry_core import protocol
from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.hub.collect import UpdateCollector, default_groups
from telemetry_core.hub.epochs import EpochCounter
from telemetry_core.hub.levels import LevelControl
from telemetry_core.hub.observe import Observations
from telemetry_core.hub.output import SnapshotOutput
from telemetry_core.reductions.advantage import as_int, as_real
from telemetry_core.reductions.gradients import resolve_groups
from telemetry_core.schema import Counters, RunInfo, Snapshot

__all__ = ["DEFAULT_BIND", "TelemetryHub"]

log = logging.getLogger("telemetry_core")

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class TelemetryHub(Observations):
    """Collects one PPO update's statistics on the device and publishes them once per update.

    Args:
        model: the ``nn.Module`` being trained (its named parameters are observed), or an iterable of
            ``(name, parameter)`` pairs.
        heads: action head name -> number of actions (order = columns of ``actions``); a Python or
            numpy integer (``envs.single_action_space.n`` as it is).
        max_grad_norm: the loop's gradient clipping cap (gradient limits are relative to it).
        total_updates: planned number of updates (training phase, performance checks).
        clip_range: the PPO clip range, when it is constant: :meth:`observe_minibatch` may then
            omit it (a value given there wins, e.g. a scheduled clip range).
        config: levels, escalation, thresholds (default :class:`TelemetryConfig`).
        bind: ZeroMQ endpoint for the PUB socket (commands on port + 1); ``None`` for no network.
        record: path of a recording file for every published frame, or ``None``.
        run_name: shown on the dashboard and written to the connection file.
        groups: named parameter groups (name -> parameters, a module prefix, or prefixes); default:
            one group per top-level child module (e.g. encoder / lstm / actor / critic).
        lstm: the policy's ``nn.LSTM`` (enables gate saturation).
        strict: re-raise telemetry errors (tests); by default they are logged once and counted.
        publisher_options: extra keyword arguments for :class:`telemetry_core.transport.Publisher`.
        distributed: aggregate across torch.distributed ranks (:mod:`telemetry_core.distributed`):
            None (default) when torch.distributed is initialised with more than one rank, True to
            require torch.distributed, False never.
            Must be the same on every rank (construction is collective). Under it only rank 0
            binds and publishes (other ranks get ``bind=None``) and other ranks record to
            ``<name>.rank<R><suffix>``; every rank changes level when rank 0 says so.
        process_group: the group to aggregate over (default: the default process group).
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, nn.Parameter]],
        *,
        heads: Mapping[str, int],
        max_grad_norm: float,
        total_updates: int | None = None,
        clip_range: float | None = None,
        config: TelemetryConfig | None = None,
        bind: str | None = DEFAULT_BIND,
        record: str | Path | None = None,
        run_name: str = "run",
        groups: Mapping[str, Any] | None = None,
        lstm: nn.LSTM | None = None,
        strict: bool = False,
        publisher_options: Mapping[str, Any] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        self.strict = strict
        self.config = config if config is not None else TelemetryConfig()
        self.thresholds = self.config.thresholds
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty mapping: head name -> number of actions")
        self.heads = {
            name: as_int(f"heads[{name!r}] (number of actions)", n, minimum=1) for name, n in heads.items()
        }
        self._only_head = next(iter(self.heads))  # what entropy= means for a single-head policy
        self._epochs = EpochCounter()  # for minibatches observed without epoch=
        self.max_grad_norm = as_real("max_grad_norm", max_grad_norm, above=0.0)
        self.total_updates = (
            None if total_updates is None else as_int("total_updates", total_updates, minimum=1)
        )
        self.clip_range = None if clip_range is None else as_real("clip_range", clip_range, minimum=0.0)
        self.run_name = run_name

        named = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
        if not named:
            raise ValueError("model has no parameters to observe")
        self._named = named
        group_spec = groups if groups is not None else default_groups(named)
        group_index = resolve_groups(named, group_spec)
        device = named[0][1].device

        th = self.thresholds
        self._update = UpdateCollector(
            named,
            heads=self.heads,
            thresholds=th,
            max_grad_norm=self.max_grad_norm,
            groups=group_index,
            lstm=lstm,
            total_updates=self.total_updates,
        )
        # The reducers the observe_* calls feed, bound here for the hot path.
        u = self._update
        self._grads, self._policy, self._value, self._adv = u.grads, u.policy, u.value, u.adv
        self._lstm, self._episodes, self._debug = u.lstm, u.episodes, u.debug
        self.detector = u.detector
        self.incidents = u.incidents

        self.session = protocol.new_session_id()
        self.counters = Counters()
        self._error_kinds: set[str] = set()
        self._pid = os.getpid()
        self.run_info = RunInfo(
            name=run_name,
            heads=self.heads,
            param_names=[n for n, _ in named],
            param_numels=[p.numel() for _, p in named],
            groups={g: sum(named[i][1].numel() for i in idx) for g, idx in group_index.items()},
            planned_updates=self.total_updates,
            world_size=1,
            rank=0,
            device=str(device),
            max_grad_norm=self.max_grad_norm,
        )

        self._last_end = time.perf_counter()
        self._level, self._reason = self.config.effective(0)

        # Multi-rank: one all_gather per update (telemetry_core.distributed); rank 0 alone binds.
        self._rollout_at: float | None = None
        self._timing = (math.nan, math.nan)
        self._began = time.perf_counter()
        self._ranks = self._update.join_ranks(self.config, device, distributed, process_group)
        if self._ranks is not None:
            self.run_info.world_size, self.run_info.rank = self._ranks.world_size, self._ranks.rank
            self._level, self._reason = self._ranks.level_now() or (self._level, self._reason)
            if not self._ranks.leads:
                bind = None
                if record is not None:
                    path = Path(record)
                    record = path.with_name(f"{path.stem}.rank{self._ranks.rank}{path.suffix}")
        self._control = LevelControl(self.config, session=self.session, ranks=self._ranks)

        self._output = SnapshotOutput.open(
            bind,
            record,
            session=self.session,
            counters=self.counters,
            run_name=run_name,
            strict=strict,
            publisher_options=publisher_options,
            level=self._level,
        )
        self.publisher, self.recorder = self._output.publisher, self._output.recorder
        self._closed = False  # from here on close() has a publisher and a recorder to close
        self._reset_reducers()

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    @property
    def level(self) -> TelemetryLevel:
        """The effective level of the update in progress."""
        return self._level

    @property
    def level_reason(self) -> str:
        return self._reason

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def endpoints(self) -> tuple[str, str] | None:
        """(pub, cmd) endpoints actually bound, or None without a network."""
        if self.publisher is None:
            return None
        return self.publisher.endpoints

    # ------------------------------------------------------------------------------------------
    # error guard
    # ------------------------------------------------------------------------------------------
    def guard(self, where: str) -> contextlib.AbstractContextManager[None]:
        """A context in which an exception is the telemetry's, never training's.

        For integrations that compute telemetry inputs in their own code (a callback, a wrapper):
        an exception inside is counted in ``counters.telemetry_errors`` (shown on every snapshot),
        logged once per ``where`` and exception type, and swallowed, unless the hub is ``strict``.
        """
        return self._guard(where)

    @contextlib.contextmanager
    def _guard(self, where: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self.counters.telemetry_errors += 1
            self.counters.last_telemetry_error = f"{where}: {type(exc).__name__}: {exc}"[:300]
            key = f"{where}:{type(exc).__name__}"
            if key not in self._error_kinds:
                self._error_kinds.add(key)
                log.warning("telemetry error in %s (training continues): %s", where, exc)
            if self.strict:
                raise

    # ------------------------------------------------------------------------------------------
    # the update boundary
    # ------------------------------------------------------------------------------------------
    def end_update(
        self,
        step: int,
        *,
        lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None,
        lstm_inputs: torch.Tensor | None = None,
        lstm_input_state: tuple[torch.Tensor, torch.Tensor] | None = None,
        lstm_resets: torch.Tensor | None = None,
        timesteps: int | None = None,
    ) -> Snapshot | None:
        """Close update ``step``: one host transfer, detection, publish; apply queued commands.

        ``lstm_state`` is the final ``(h, c)``. For gate saturation also pass the LSTM's inputs over
        the rollout (``lstm_inputs``, laid out as the LSTM takes them), the state they started from
        (``lstm_input_state``; zeros when omitted) and, when the loop zeroes the state at episode
        starts, where it did (``lstm_resets``: ``(T, B)``, ``(B, T)`` with ``batch_first``; nonzero
        where the state entering that step was zeroed, as CleanRL's ``dones`` and TorchRL's
        ``is_init``): the whole rollout is replayed as the loop ran it, no sequence cutting needed.
        Without ``lstm_inputs`` the snapshot says the gates were not fed.

        ``timesteps``: the environment steps the loop's own logger shows this update at (e.g.
        CleanRL's ``global_step``), carried in the snapshot so an export can use the same x-axis.

        Returns the published :class:`Snapshot` (``None`` at OFF, or if telemetry failed). Treat it
        as read-only: the publisher thread encodes it after this returns.
        """
        if type(step) is not int:  # a numpy step is fine; a bad one is telemetry's error, not training's
            with self._guard("end_update"):
                step = as_int("step", step)
        if timesteps is not None:  # a bad one is left out of the snapshot, and counted as an error
            given, timesteps = timesteps, None
            with self._guard("end_update"):
                timesteps = as_int("timesteps", given, minimum=0)
        now = time.perf_counter()
        update_seconds = now - self._last_end
        rollout_at, self._rollout_at = self._rollout_at, None
        self._timing = (update_seconds, rollout_at - self._began if rollout_at is not None else math.nan)
        self._last_end = now
        level = self._level
        self.config.note_update(level, self._reason, update_seconds)
        snapshot: Snapshot | None = None
        try:
            if level > TelemetryLevel.OFF and os.getpid() == self._pid:
                with self._guard("end_update"):
                    snapshot = self._collect(
                        step,
                        level,
                        update_seconds,
                        lstm_state,
                        lstm_inputs,
                        lstm_input_state,
                        lstm_resets,
                        timesteps,
                    )
        finally:
            if self._ranks is not None and os.getpid() == self._pid:
                with self._guard("ranks"):  # every rank joins this update's collective, whatever happened
                    self._ranks.settle()
        with self._guard("commands"):
            self._boundary(step)
        self._reset_reducers()
        self._began = time.perf_counter()  # the next update's own work starts here (after the collective)
        return snapshot

    def _collect(
        self,
        step: int,
        level: TelemetryLevel,
        update_seconds: float,
        lstm_state: tuple[torch.Tensor, torch.Tensor] | None,
        lstm_inputs: torch.Tensor | None,
        lstm_input_state: tuple[torch.Tensor, torch.Tensor] | None,
        lstm_resets: torch.Tensor | None = None,
        timesteps: int | None = None,
    ) -> Snapshot:
        snapshot = self._update.collect(
            step,
            level,
            update_seconds=update_seconds,
            timesteps=timesteps,
            lstm_state=lstm_state,
            lstm_inputs=lstm_inputs,
            lstm_input_state=lstm_input_state,
            lstm_resets=lstm_resets,
            level_info=self._control.level_info(step, self._level, self._reason),
            run=self.run_info,
            counters=self.counters,
            ranks=self._ranks,
            timing=self._timing,
            profile_trace=self._control.take_profile_trace,
        )
        self._control.escalate(snapshot.incident_events, step)
        self._publish(snapshot)
        return snapshot

    def _publish(self, snapshot: Snapshot) -> None:
        self._output.publish(snapshot)

    def _counters_now(self) -> Counters:
        return self._output.counters_now()

    # ------------------------------------------------------------------------------------------
    # commands, leases, profiles — at update boundaries only (telemetry_core.hub.levels)
    # ------------------------------------------------------------------------------------------
    def _boundary(self, step: int) -> None:
        if self.publisher is not None:
            effective = step + 1 + self._control.lag
            for peer, command in self.publisher.poll_commands():
                self.publisher.reply(peer, self._control.apply(command, effective))
        self._level, self._reason = self._control.next_level(step, (self._level, self._reason))
        if self.publisher is not None:
            self.publisher.set_status(step, self._level.name, self._counters_now())

    # ------------------------------------------------------------------------------------------
    def _reset_reducers(self) -> None:
        self._update.reset(self._level)
        self._epochs.reset()

    def state_dict(self) -> dict[str, Any]:
        """Host-side state worth checkpointing: the gradient EMA, the detector's history and, under
        torch.distributed, the rank judge's baselines (the same on every rank)."""
        state = self._update.state_dict()
        if self._ranks is not None:
            state["ranks"] = self._ranks.judge.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Rank baselines are restored when both sides aggregate
        across ranks with the same statistics; otherwise they are re-learnt (a logged note)."""
        self._update.load_state_dict(state)
        ranks = state.get("ranks")
        if ranks is not None and self._ranks is not None:
            try:
                self._ranks.judge.load_state_dict(ranks)
            except ValueError as exc:
                log.warning("rank baselines not restored (%s); they are re-learnt over the next updates", exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._control.close()
        if os.getpid() == self._pid:
            with self._guard("close"):
                self._publish_finished()
        self._output.close()

    def _publish_finished(self) -> None:
        """Publish the run's closing frame (:meth:`SnapshotOutput.finished_frame`) and let it go out."""
        final = self._output.finished_frame()
        if final is None:
            return
        self._publish(final)
        self._output.drain()

    def __enter__(self) -> TelemetryHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
