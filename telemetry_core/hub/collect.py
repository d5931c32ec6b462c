"""One update's statistics: the reducers the loop's tensors go to, and the update's end.

At the end of an update every reducer hands over what it reduced on the device, the multi-rank
all_gather is launched on the device beside them, and *one* host transfer materialises the lot. The
snapshot is built from it, the gradient EMA advances, the detector judges the update and the incident
tracker turns its anomalies into incidents.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from telemetry_core.anomaly import AnomalyDetector
from telemetry_core.config import TelemetryConfig, TelemetryLevel, Thresholds, phase_of
from telemetry_core.debug import DebugDiagnostics
from telemetry_core.ema import GradientEMA
from telemetry_core.incidents import IncidentTracker
from telemetry_core.reductions.advantage import AdvantageReducer
from telemetry_core.reductions.episodes import EpisodeReducer
from telemetry_core.reductions.gradients import GradientReducer
from telemetry_core.reductions.lstm import LSTMReducer
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.transfer import transfer
from telemetry_core.reductions.value import ValueReducer
from telemetry_core.schema import Counters, LevelInfo, RunInfo, Snapshot

__all__ = ["UpdateCollector", "default_groups"]


class UpdateCollector:
    """The reducers of one update (the hub feeds them), the EMA, detector and incident tracker.

    Args:
        named: the observed ``(name, parameter)`` pairs.
        heads: action head name -> number of actions.
        thresholds: the configuration's thresholds.
        max_grad_norm: the loop's gradient clipping cap.
        groups: group name -> indices into ``named`` (:func:`resolve_groups`'s output).
        lstm: the policy's ``nn.LSTM``, or None.
        total_updates: the planned number of updates, or None.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        *,
        heads: Mapping[str, int],
        thresholds: Thresholds,
        max_grad_norm: float,
        groups: Mapping[str, Sequence[int]],
        lstm: nn.LSTM | None,
        total_updates: int | None,
    ) -> None:
        th = thresholds
        self.thresholds = th
        self.total_updates = total_updates
        self._heads = dict(heads)
        self.grads = GradientReducer(named, max_grad_norm=max_grad_norm, thresholds=th, groups=groups)
        self.policy = PolicyReducer(heads, th)
        self.value = ValueReducer()
        self.adv = AdvantageReducer()
        self.lstm = LSTMReducer(lstm, th)
        self.episodes = EpisodeReducer()
        self.debug = DebugDiagnostics(named, heads, th, max_grad_norm=max_grad_norm)
        self.ema = GradientEMA(momentum=th.grad_ema_momentum, warmup=th.grad_drift_warmup)
        self.detector = AnomalyDetector(th, total_updates=total_updates, heads=heads)
        self.incidents = IncidentTracker.from_thresholds(th)

    def join_ranks(
        self, config: TelemetryConfig, device: torch.device, distributed: bool | None, process_group: Any
    ) -> Any:
        """The rank aggregator whose all_gather joins every update's transfer, or None on one
        process (``distributed``: see :class:`telemetry_core.hub.TelemetryHub`). Construction is
        collective: every rank must call it."""
        if distributed is False:
            return None
        from telemetry_core import distributed as tdist

        if tdist.distributed_ready() and tdist.group_size(process_group) > 1:
            word, reason = tdist.plan_level(config, 0)
            ranks = tdist.RankAggregator(
                heads=list(self._heads),
                thresholds=self.thresholds,
                device=device,
                initial=word,
                initial_reason=reason,
                group=process_group,
            )
            self.grads.device_totals = True  # the aggregator reads rank_sums() before the transfer
            return ranks
        if distributed:
            raise ValueError("distributed=True but torch.distributed is not initialised")
        return None

    def reset(self, level: TelemetryLevel) -> None:
        """Empty every reducer for the next update (run at ``level``)."""
        for reducer in (self.grads, self.policy, self.value, self.adv, self.lstm, self.episodes):
            reducer.reset()
        self.debug.reset(level)

    def collect(
        self,
        step: int,
        level: TelemetryLevel,
        *,
        update_seconds: float,
        timesteps: int | None,
        lstm_state: tuple[torch.Tensor, torch.Tensor] | None,
        lstm_inputs: torch.Tensor | None,
        lstm_input_state: tuple[torch.Tensor, torch.Tensor] | None,
        lstm_resets: torch.Tensor | None,
        level_info: LevelInfo,
        run: RunInfo,
        counters: Counters,
        ranks: Any,
        timing: tuple[float, float],
        profile_trace: Callable[[], str | None],
    ) -> Snapshot:
        """Update ``step``'s snapshot: one host transfer, the snapshot's sections, detection, incidents.

        ``counters`` gets the inputs the reducers skipped; ``ranks`` (the hub's rank aggregator or
        None) launches its all_gather in the same transfer; ``timing`` is (update seconds, seconds
        to the end of the rollout) for it; ``profile_trace`` hands over a finished profile's path.
        """
        if lstm_state is not None and level >= TelemetryLevel.NORMAL:
            h, c = lstm_state
            self.lstm.observe(
                h, c, inputs=lstm_inputs, input_state=lstm_input_state, resets=lstm_resets, level=level
            )
        pending: dict[str, torch.Tensor] = {}
        reducers = (self.grads, self.policy, self.value, self.adv, self.lstm, self.episodes, self.debug)
        for reducer in reducers:
            pending.update(reducer.pending(level))
        if ranks is not None and ranks.enabled:  # all_gather on the device, read in the transfer
            pending["ranks.gathered"] = ranks.launch(
                pending,
                grads=self.grads,
                policy=self.policy,
                value=self.value,
                update_seconds=timing[0],
                rollout_seconds=timing[1],
            )
        host = transfer(pending)  # the one host transfer of the update

        grads = self.grads.build(host, level)
        if grads is not None and grads.calls:
            normal = level >= TelemetryLevel.NORMAL
            drift = self.ema.update(grads.total_norm, grads.group_norms if normal else None)
            grads.ema_total_norm = self.ema.value
            grads.ema_drift = drift if normal else None
            if normal:
                grads.group_ema_drift = {k: v for k, v in self.ema.extras_drift.items() if v is not None}
        counters.inputs_skipped += getattr(self.grads, "skipped_params", 0)
        debug = self.debug.build(host, level)
        if debug is not None:
            counters.inputs_skipped += debug.skipped
        snapshot = Snapshot(
            step=step,
            wall_time=time.time(),
            timesteps=timesteps,
            phase=phase_of(step, self.total_updates, self.thresholds).value,
            update_seconds=update_seconds,
            level=level_info,
            gradients=grads,
            policy=self.policy.build(host, level),
            value=self.value.build(host, level),
            advantage=self.adv.build(host, level),
            lstm=self.lstm.build(host, level),
            episodes=self.episodes.build(host, level),
            debug=debug,
            thresholds=self.thresholds,
            run=run,
            profile_trace=profile_trace(),
        )
        rank_anomalies: list[Any] = []
        if ranks is not None:
            snapshot.ranks, rank_anomalies = ranks.finish(host.get("ranks.gathered"), step)
        snapshot.anomalies = self.detector.check(snapshot) + rank_anomalies
        events = self.incidents.update(snapshot.anomalies, step)
        snapshot.incidents = self.incidents.active()
        snapshot.incident_events = events
        return snapshot

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "detector": self.detector.state_dict(),
            "incidents": self.incidents.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.detector.load_state_dict(state["detector"])
        if "incidents" in state:  # absent in checkpoints written before incidents existed
            self.incidents.load_state_dict(state["incidents"])


def default_groups(named: Sequence[tuple[str, nn.Parameter]]) -> dict[str, list[str]]:
    """One group per top-level child module: 'encoder.0.weight' -> group 'encoder'."""
    groups: dict[str, list[str]] = {}
    for name, _ in named:
        top = name.split(".", 1)[0]
        groups.setdefault(top, [top + "."] if "." in name else [name])
    return groups
