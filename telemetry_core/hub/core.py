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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import torch
from torch import nn

from telemetry_core import protocol
from telemetry_core.anomaly import AnomalyDetector
from telemetry_core.config import (
    TelemetryConfig,
    TelemetryLevel,
    phase_of,
)
from telemetry_core.debug import DebugDiagnostics
from telemetry_core.ema import GradientEMA
from telemetry_core.incidents import IncidentTracker, escalates
from telemetry_core.record import Recorder
from telemetry_core.reductions.advantage import AdvantageReducer, as_int, as_real
from telemetry_core.reductions.episodes import EpisodeReducer
from telemetry_core.reductions.gradients import GradientReducer, resolve_groups
from telemetry_core.reductions.lstm import LSTMReducer
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.transfer import transfer
from telemetry_core.reductions.value import ValueReducer
from telemetry_core.schema import (
    RUN_FINISHED,
    Ack,
    Command,
    Counters,
    LevelInfo,
    Nack,
    RunInfo,
    Snapshot,
)

__all__ = ["TelemetryHub"]

log = logging.getLogger("telemetry_core")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_LEASE_UPDATES = 50
DEFAULT_LEASE_SECONDS = 15.0


class TelemetryHub:
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
        self._epoch_marked = False  # next_epoch() was called: epochs are counted by its calls from then on
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
        group_spec = groups if groups is not None else _default_groups(named)
        group_index = resolve_groups(named, group_spec)
        device = named[0][1].device

        th = self.thresholds
        self._grads = GradientReducer(
            named, max_grad_norm=self.max_grad_norm, thresholds=th, groups=group_index
        )
        self._policy = PolicyReducer(self.heads, th)
        self._value = ValueReducer()
        self._adv = AdvantageReducer()
        self._lstm = LSTMReducer(lstm, th)
        self._episodes = EpisodeReducer()
        self._debug = DebugDiagnostics(named, self.heads, th, max_grad_norm=self.max_grad_norm)
        self._ema = GradientEMA(
            momentum=th.grad_ema_momentum, warmup=th.grad_drift_warmup
        )
        self.detector = AnomalyDetector(th, total_updates=self.total_updates, heads=self.heads)
        self.incidents = IncidentTracker.from_thresholds(th)

        self.session = protocol.new_session_id()
        self.counters = Counters()
        self._error_kinds: set[str] = set()
        self._seq = 0
        self._pid = os.getpid()
        self._last_published: Snapshot | None = None  # repeated, marked finished, by close()
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

        # Operator lease (wall-clock side; the step side lives in config.override_until).
        self._lease_deadline: float | None = None
        self._lease_seconds = DEFAULT_LEASE_SECONDS
        self._profile: Any = None
        self._profile_remaining = 0
        self._profile_path: str | None = None
        self._profile_done: str | None = None

        self._last_end = time.perf_counter()
        self._level, self._reason = self.config.effective(0)
        self._closed = False

        # Multi-rank: one all_gather per update (telemetry_core.distributed); rank 0 alone binds.
        self._ranks: Any = None
        self._rollout_at: float | None = None
        self._timing = (math.nan, math.nan)
        self._began = time.perf_counter()
        if distributed is not False:
            from telemetry_core import distributed as tdist

            if tdist.distributed_ready() and tdist.group_size(process_group) > 1:
                word, reason = tdist.plan_level(self.config, 0)
                self._ranks = tdist.RankAggregator(
                    heads=list(self.heads),
                    thresholds=th,
                    device=device,
                    initial=word,
                    initial_reason=reason,
                    group=process_group,
                )
                self.run_info.world_size, self.run_info.rank = self._ranks.world_size, self._ranks.rank
                self._grads.device_totals = True  # the aggregator reads rank_sums() before the transfer
                self._level, self._reason = self._ranks.level_now() or (self._level, self._reason)
                if not self._ranks.leads:
                    bind = None
                    if record is not None:
                        path = Path(record)
                        record = path.with_name(f"{path.stem}.rank{self._ranks.rank}{path.suffix}")
            elif distributed:
                raise ValueError("distributed=True but torch.distributed is not initialised")

        self.publisher = None
        if bind is not None:
            from telemetry_core.transport import Publisher

            self.publisher = Publisher(
                bind,
                session=self.session,
                run_name=run_name,
                strict=strict,
                **dict(publisher_options or {}),
            )
            self.publisher.start()
            self.publisher.set_status(0, self._level.name)
        self.recorder = Recorder(record, session=self.session) if record is not None else None
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
    # observation (hot path: no host syncs)
    # ------------------------------------------------------------------------------------------
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
            self._rollout_samples += raw_advantages.numel()
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
            epoch = self._epoch_of(new_logprob) if epoch is None else as_int("epoch", epoch, minimum=0)
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
            )
            self._last_epoch = epoch
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
        self._epoch_marked = True
        if self._epoch_samples:
            self._epoch_counted += 1
            self._epoch_samples = 0

    def _epoch_of(self, new_logprob: object) -> int:
        """The counted epoch of a minibatch that came without one (see :meth:`observe_minibatch`)."""
        n = new_logprob.numel() if isinstance(new_logprob, torch.Tensor) else 0
        rollout = self._rollout_samples
        if not self._epoch_marked and rollout and self._epoch_samples and self._epoch_samples + n > rollout:
            self._epoch_counted += 1
            self._epoch_samples = 0
        self._epoch_samples += n
        return self._epoch_counted

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
            epoch = self._last_epoch if epoch is None else as_int("epoch", epoch, minimum=0)
            self._policy.early_stop(epoch, kl)

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
        if lstm_state is not None and level >= TelemetryLevel.NORMAL:
            h, c = lstm_state
            self._lstm.observe(
                h, c, inputs=lstm_inputs, input_state=lstm_input_state, resets=lstm_resets, level=level
            )
        pending: dict[str, torch.Tensor] = {}
        reducers = (self._grads, self._policy, self._value, self._adv, self._lstm, self._episodes, self._debug)
        for reducer in reducers:
            pending.update(reducer.pending(level))
        if self._ranks is not None and self._ranks.enabled:  # all_gather on the device, read in the transfer
            pending["ranks.gathered"] = self._ranks.launch(
                pending,
                grads=self._grads,
                policy=self._policy,
                value=self._value,
                update_seconds=self._timing[0],
                rollout_seconds=self._timing[1],
            )
        host = transfer(pending)  # the one host transfer of the update

        grads = self._grads.build(host, level)
        if grads is not None and grads.calls:
            normal = level >= TelemetryLevel.NORMAL
            drift = self._ema.update(grads.total_norm, grads.group_norms if normal else None)
            grads.ema_total_norm = self._ema.value
            grads.ema_drift = drift if normal else None
            if normal:
                grads.group_ema_drift = {k: v for k, v in self._ema.extras_drift.items() if v is not None}
        self.counters.inputs_skipped += getattr(self._grads, "skipped_params", 0)
        debug = self._debug.build(host, level)
        if debug is not None:
            self.counters.inputs_skipped += debug.skipped
        snapshot = Snapshot(
            step=step,
            wall_time=time.time(),
            timesteps=timesteps,
            phase=phase_of(step, self.total_updates, self.thresholds).value,
            update_seconds=update_seconds,
            level=self._level_info(step),
            gradients=grads,
            policy=self._policy.build(host, level),
            value=self._value.build(host, level),
            advantage=self._adv.build(host, level),
            lstm=self._lstm.build(host, level),
            episodes=self._episodes.build(host, level),
            debug=debug,
            thresholds=self.thresholds,
            run=self.run_info,
            profile_trace=self._take_profile_trace(),
        )
        rank_anomalies: list[Any] = []
        if self._ranks is not None:
            snapshot.ranks, rank_anomalies = self._ranks.finish(host.get("ranks.gathered"), step)
        snapshot.anomalies = self.detector.check(snapshot) + rank_anomalies
        events = self.incidents.update(snapshot.anomalies, step)
        snapshot.incidents = self.incidents.active()
        snapshot.incident_events = events
        # Escalate on critical onsets and on upgrades to critical only, within the DEBUG budget: a
        # capture window when something broke, not DEBUG for every warning (the operator can lease
        # more). Across ranks, rank 0 decides and its level reaches every rank one update later.
        if self._ranks is None or not self._ranks.enabled or self._ranks.leads:
            for event in events:
                if escalates(event):
                    self.config.escalate(event.incident.kind, step + 1 + self._level_lag)
        self._publish(snapshot)
        return snapshot

    def _publish(self, snapshot: Snapshot) -> None:
        self._last_published = snapshot
        snapshot.counters = self._counters_now()
        if self.publisher is not None:
            # The publisher thread encodes it (and hands the frame to the recorder), so the
            # training thread pays for the hand-off only; nothing here changes the snapshot after.
            self.publisher.hand_off_snapshot(snapshot, self.recorder.put if self.recorder is not None else None)
            return
        self._seq += 1
        frame = protocol.encode_envelope(
            "snapshot", snapshot, session=self.session, seq=self._seq, step=snapshot.step
        )
        self.counters.snapshots_published += 1
        if self.recorder is not None:
            self.recorder.put(frame)

    def _counters_now(self) -> Counters:
        c = msgspec.structs.replace(self.counters)
        if self.publisher is not None:
            self.publisher.fill_counters(c)
        if self.recorder is not None:
            c.records_written = self.recorder.written
            c.records_dropped = self.recorder.dropped
        return c

    def _level_info(self, step: int) -> LevelInfo:
        share, window = self.config.debug_share()
        return LevelInfo(
            level=self._level.name,
            reason=self._reason,
            lease_until=self.config.override_until if self.config.override_level is not None else None,
            escalations=self.config.active_escalations(step),
            debug_share=share,
            debug_window=window,
            debug_seconds=self.config.debug_seconds,
            escalations_refused=self.config.escalations_refused,
        )

    # ------------------------------------------------------------------------------------------
    # commands, leases, profiles — at update boundaries only
    # ------------------------------------------------------------------------------------------
    def _boundary(self, step: int) -> None:
        nxt = step + 1
        if self.publisher is not None:
            for peer, command in self.publisher.poll_commands():
                reply = self._apply(command, nxt + self._level_lag)
                self.publisher.reply(peer, reply)
        if self._lease_deadline is not None and time.monotonic() > self._lease_deadline:
            self.config.clear_override()
            self._lease_deadline = None
            log.info("DEBUG lease not renewed: reverting at step %d", nxt)
        self._advance_profile()
        ranks = self._ranks if self._ranks is not None and self._ranks.enabled else None
        if ranks is None:
            self._level, self._reason = self.config.effective(nxt)
        else:  # adopt what rank 0 sent in this update's vector; rank 0 plans the update after next
            if ranks.leads:
                from telemetry_core.distributed import plan_level

                ranks.plan(*plan_level(self.config, nxt + 1))
            self._level, self._reason = ranks.level_now() or (self._level, self._reason)
        if self.config.override_level is None:
            self._lease_deadline = None
        if self.publisher is not None:
            self.publisher.set_status(step, self._level.name, self._counters_now())

    @property
    def _level_lag(self) -> int:
        """Updates between rank 0's decision and the level change: 1 when ranks sync their level."""
        return 1 if self._ranks is not None and self._ranks.enabled else 0

    def _apply(self, command: Command, effective_step: int) -> Ack | Nack:
        """Apply one authenticated command; it takes effect from ``effective_step``."""
        action = command.action
        if action in ("lease_debug", "renew"):
            if action == "renew" and self.config.override_level != TelemetryLevel.DEBUG:
                return Nack(command_id=command.id, reason="no DEBUG lease to renew", code="no_lease")
            updates = command.updates or DEFAULT_LEASE_UPDATES
            if updates < 1 or updates > 100_000:
                return Nack(command_id=command.id, reason=f"lease of {updates} updates refused", code="bad_value")
            seconds = command.lease_seconds or DEFAULT_LEASE_SECONDS
            until = effective_step + updates
            self.config.set_override(
                TelemetryLevel.DEBUG, until_step=until, reason=f"operator lease until step {until}"
            )
            self._lease_seconds = max(1.0, min(float(seconds), 3600.0))
            self._lease_deadline = time.monotonic() + self._lease_seconds
            return Ack(
                command_id=command.id, action=action, effective_step=effective_step, level="DEBUG",
                lease_until=until, message=f"DEBUG from step {effective_step} until step {until}",
            )
        if action == "release":
            self.config.clear_override()
            self._lease_deadline = None
            return Ack(command_id=command.id, action=action, effective_step=effective_step,
                       level=self.config.effective(effective_step)[0].name, message="lease released")
        if action == "set_level":
            try:
                level = TelemetryLevel.parse(command.level or "")
            except ValueError as exc:
                return Nack(command_id=command.id, reason=str(exc), code="bad_value")
            self._lease_deadline = None
            if level == self.config.level:
                self.config.clear_override()
            else:
                self.config.set_override(level, until_step=None, reason=f"operator set {level.name}")
            return Ack(command_id=command.id, action=action, effective_step=effective_step,
                       level=level.name, message=f"level {level.name} from step {effective_step}")
        if action == "profile":
            k = command.profile_updates or 3
            if not 1 <= k <= 100:
                return Nack(command_id=command.id, reason=f"profile of {k} updates refused", code="bad_value")
            if self._profile is not None:
                return Nack(command_id=command.id, reason="a profile is already being captured", code="busy")
            self._start_profile(k)
            return Ack(command_id=command.id, action=action, effective_step=effective_step,
                       message=f"profiling {k} updates from step {effective_step}")
        return Nack(command_id=command.id, reason=f"unknown action {action!r}", code="unknown_action")

    def _start_profile(self, updates: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        directory = protocol.connection_dir() / "profiles"
        directory.mkdir(parents=True, exist_ok=True)
        self._profile_path = str(directory / f"{self.session}-{int(time.time())}.trace.json")
        self._profile = profile(activities=activities, record_shapes=False)
        self._profile.start()
        self._profile_remaining = updates

    def _advance_profile(self) -> None:
        if self._profile is None:
            return
        self._profile_remaining -= 1
        if self._profile_remaining > 0:
            return
        prof, self._profile = self._profile, None
        prof.stop()
        prof.export_chrome_trace(self._profile_path)
        self._profile_done = self._profile_path

    def _take_profile_trace(self) -> str | None:
        done, self._profile_done = self._profile_done, None
        return done

    # ------------------------------------------------------------------------------------------
    def _reset_reducers(self) -> None:
        for reducer in (self._grads, self._policy, self._value, self._adv, self._lstm, self._episodes):
            reducer.reset()
        self._debug.reset(self._level)
        # Epochs counted for minibatches observed without one (observe_minibatch, next_epoch).
        self._rollout_samples = 0
        self._epoch_counted = 0
        self._epoch_samples = 0
        self._last_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """Host-side state worth checkpointing: the gradient EMA, the detector's history and, under
        torch.distributed, the rank judge's baselines (the same on every rank)."""
        state = {
            "ema": self._ema.state_dict(),
            "detector": self.detector.state_dict(),
            "incidents": self.incidents.state_dict(),
        }
        if self._ranks is not None:
            state["ranks"] = self._ranks.judge.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Rank baselines are restored when both sides aggregate
        across ranks with the same statistics; otherwise they are re-learnt (a logged note)."""
        self._ema.load_state_dict(state["ema"])
        self.detector.load_state_dict(state["detector"])
        if "incidents" in state:  # absent in checkpoints written before incidents existed
            self.incidents.load_state_dict(state["incidents"])
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
        if self._profile is not None:
            with contextlib.suppress(Exception):
                self._profile.stop()
            self._profile = None
        if os.getpid() == self._pid:
            with self._guard("close"):
                self._publish_finished()
        if self.publisher is not None:
            self.publisher.close()
        if self.recorder is not None:
            self.recorder.close()

    # How long close() lets the publisher thread send the final frame (it polls every few ms), and
    # then lets ZeroMQ's I/O thread write it out before the socket closes with linger 0.
    FINAL_FRAME_WAIT = 0.5
    FINAL_FRAME_SETTLE = 0.05

    def _publish_finished(self) -> None:
        """The run's last frame: the last update's statistics again, marked ``run_state="finished"``.

        It travels the same way as every snapshot (stream, history, recording), so a dashboard or a
        replay can tell a run that ended from a trainer that vanished. No anomalies or incident
        events: they belong to the update, which was already published.
        """
        last = self._last_published
        if last is None or last.run_state == RUN_FINISHED:
            return
        final = msgspec.structs.replace(
            last,
            run_state=RUN_FINISHED,
            wall_time=time.time(),
            anomalies=[],
            incident_events=[],
            debug=None,
            profile_trace=None,
        )
        self._publish(final)
        pub = self.publisher
        if pub is not None and pub.network:
            deadline = time.monotonic() + self.FINAL_FRAME_WAIT
            while pub.queued and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(self.FINAL_FRAME_SETTLE)

    def __enter__(self) -> TelemetryHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _default_groups(named: Sequence[tuple[str, nn.Parameter]]) -> dict[str, list[str]]:
    """One group per top-level child module: 'encoder.0.weight' -> group 'encoder'."""
    groups: dict[str, list[str]] = {}
    for name, _ in named:
        top = name.split(".", 1)[0]
        groups.setdefault(top, [top + "."] if "." in name else [name])
    return groups

