"""What the dashboard knows about its link to the trainer and about the operator's DEBUG lease.

Plain state, written by the network worker (:mod:`simic_tui.client`) or the replay and read by the
header on a timer; nothing here touches a socket or a clock of its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["DebugLease", "LeasePhase", "LinkState", "LinkStatus"]


class LinkState(str, enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    STALE = "stale"
    DISCONNECTED = "disconnected"
    INCOMPATIBLE = "incompatible"
    REPLAY = "replay"


@dataclass
class LinkStatus:
    """What the header says about the link; written by the client (or the replay), read on a timer."""

    state: LinkState = LinkState.CONNECTING
    endpoint: str = ""
    detail: str = ""  # e.g. "retry 4", "no heartbeat for 5 s"
    since: float = 0.0  # clock time of the last state change
    last_frame_at: float | None = None  # clock time of the last decoded frame (snapshot or heartbeat)
    connect_retries: int = 0
    restarts: int = 0  # trainer restarts seen (new session ids)
    their_version: tuple[int, int] | None = None  # an incompatible trainer's schema version
    banner: str = ""  # a problem the operator must see (incompatible schema, authentication)
    commands_note: str = ""  # why commands are unavailable ('' when they are)
    unencrypted: bool = False  # a non-loopback link without CURVE: anyone on the path reads and rewrites it
    worker_failures: int = 0  # times the network worker failed and was restarted

    def set(self, state: LinkState, now: float, detail: str = "") -> None:
        if state != self.state:
            self.since = now
        self.state = state
        self.detail = detail

    @property
    def commands_enabled(self) -> bool:
        return not self.commands_note


class LeasePhase(str, enum.Enum):
    NONE = "none"
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"
    RELEASED = "released"
    REFUSED = "refused"


@dataclass
class DebugLease:
    """The operator's DEBUG lease: pending -> acknowledged at step N -> expired / released."""

    phase: LeasePhase = LeasePhase.NONE
    command_id: str = ""
    effective_step: int | None = None
    lease_until: int | None = None
    reason: str = ""
    last_sent: float = 0.0

    def describe(self) -> str:
        if self.phase == LeasePhase.PENDING:
            return "DEBUG lease pending…"
        if self.phase == LeasePhase.ACTIVE:
            until = f", until step {self.lease_until}" if self.lease_until is not None else ""
            return f"DEBUG lease acknowledged at step {self.effective_step}{until}"
        if self.phase == LeasePhase.EXPIRED:
            return (
                f"DEBUG lease expired{f' at step {self.lease_until}' if self.lease_until is not None else ''}"
            )
        if self.phase == LeasePhase.RELEASED:
            return "DEBUG lease released"
        if self.phase == LeasePhase.REFUSED:
            return f"DEBUG lease refused: {self.reason}"
        return ""
