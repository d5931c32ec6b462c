"""The level each update runs at, and what changes it at update boundaries.

Operator commands (DEBUG leases and their renewal, ``set_level``, ``release``, profiles) arrive from
dashboards and take effect at an update boundary, acknowledged with the step they apply from. A
lease also has a wall-clock side: it reverts when no dashboard renews it in time. Critical incidents
escalate to DEBUG within the configured budget. Under torch.distributed rank 0 decides and every rank
adopts its level one update later (the ``lag``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from telemetry_core import protocol
from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.incidents import escalates
from telemetry_core.schema import Ack, Command, LevelInfo, Nack

__all__ = ["DEFAULT_LEASE_SECONDS", "DEFAULT_LEASE_UPDATES", "LevelControl"]

log = logging.getLogger("telemetry_core")

DEFAULT_LEASE_UPDATES = 50
DEFAULT_LEASE_SECONDS = 15.0


class LevelControl:
    """Applies commands, runs leases and profiles, escalates, and names the next update's level.

    Args:
        config: the hub's configuration; its override (the operator's) and escalations change here.
        session: the hub's session id (names profile traces).
        ranks: the hub's :class:`telemetry_core.distributed.RankAggregator`, or None on one process.
    """

    def __init__(self, config: TelemetryConfig, *, session: str, ranks: Any = None) -> None:
        self.config = config
        self._session = session
        self._ranks = ranks
        # Operator lease (wall-clock side; the step side lives in config.override_until).
        self._lease_deadline: float | None = None
        self._lease_seconds = DEFAULT_LEASE_SECONDS
        self._profile: Any = None
        self._profile_remaining = 0
        self._profile_path: str | None = None
        self._profile_done: str | None = None

    @property
    def lag(self) -> int:
        """Updates between rank 0's decision and the level change: 1 when ranks sync their level."""
        return 1 if self._ranks is not None and self._ranks.enabled else 0

    def next_level(self, step: int, current: tuple[TelemetryLevel, str]) -> tuple[TelemetryLevel, str]:
        """At the end of update ``step`` (after its commands): the level and reason of the next one."""
        nxt = step + 1
        if self._lease_deadline is not None and time.monotonic() > self._lease_deadline:
            self.config.clear_override()
            self._lease_deadline = None
            log.info("DEBUG lease not renewed: reverting at step %d", nxt)
        self._advance_profile()
        ranks = self._ranks if self._ranks is not None and self._ranks.enabled else None
        if ranks is None:
            level = self.config.effective(nxt)
        else:  # adopt what rank 0 sent in this update's vector; rank 0 plans the update after next
            if ranks.leads:
                from telemetry_core.distributed import plan_level

                ranks.plan(*plan_level(self.config, nxt + 1))
            level = ranks.level_now() or current
        if self.config.override_level is None:
            self._lease_deadline = None
        return level

    def escalate(self, events: Iterable[Any], step: int) -> None:
        """Escalate on critical onsets and on upgrades to critical only, within the DEBUG budget: a
        capture window when something broke, not DEBUG for every warning (the operator can lease
        more). Across ranks, rank 0 decides and its level reaches every rank one update later."""
        if self._ranks is None or not self._ranks.enabled or self._ranks.leads:
            for event in events:
                if escalates(event):
                    self.config.escalate(event.incident.kind, step + 1 + self.lag)

    def level_info(self, step: int, level: TelemetryLevel, reason: str) -> LevelInfo:
        """What a snapshot of update ``step`` says about its level."""
        share, window = self.config.debug_share()
        return LevelInfo(
            level=level.name,
            reason=reason,
            lease_until=self.config.override_until if self.config.override_level is not None else None,
            escalations=self.config.active_escalations(step),
            debug_share=share,
            debug_window=window,
            debug_seconds=self.config.debug_seconds,
            escalations_refused=self.config.escalations_refused,
        )

    def apply(self, command: Command, effective_step: int) -> Ack | Nack:
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
        self._profile_path = str(directory / f"{self._session}-{int(time.time())}.trace.json")
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

    def take_profile_trace(self) -> str | None:
        """The path of a profile trace finished since the last call (it goes in one snapshot)."""
        done, self._profile_done = self._profile_done, None
        return done

    def close(self) -> None:
        """Stop a profile still capturing (its trace is not written)."""
        if self._profile is not None:
            with contextlib.suppress(Exception):
                self._profile.stop()
            self._profile = None
