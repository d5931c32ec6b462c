"""What the publisher sent, dropped and refused: a consistent copy for the hub and the tests."""

from __future__ import annotations

import msgspec

from telemetry_core.schema import Counters
from telemetry_core.transport.gate import FRAME_CODES

__all__ = ["PublisherCounters"]


class PublisherCounters(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent copy of what the publisher sent, dropped and refused so far.

    A msgspec Struct: the hub builds one per update on the training thread, and a frozen dataclass
    of this size costs tens of microseconds to construct.
    """

    published: int = 0  # snapshot frames handed to the PUB socket
    dropped: int = 0  # snapshots dropped from the full publish queue (oldest first)
    unsent: int = 0  # snapshots encoded while the stream is off (bind=None, bind failed, closed)
    heartbeats: int = 0
    commands_accepted: int = 0  # passed every check (queued for the hub, or history served)
    rejected: dict[str, int] = msgspec.field(default_factory=dict)  # refusals by stable code
    history_served: int = 0  # history replies (chunks) sent
    history_frames: int = 0  # snapshot frames sent in history replies
    replies_sent: int = 0
    replies_dropped: int = 0  # peer gone or its queue full (ROUTER_MANDATORY + NOBLOCK)
    handshake_failures: int = 0  # CURVE / ZMTP handshakes refused (unknown key, no CURVE, ...)
    # Handshakes the ZAP handler refused, by reason (unknown key, too many connections, handshake rate)
    connections_refused: dict[str, int] = msgspec.field(default_factory=dict)
    peers: int = 0  # authenticated connections open now (both ports; the cap is max_peers)
    read_pauses: int = 0  # times the command CPU budget ran out and reading stopped
    errors: int = 0  # unexpected exceptions in the publisher thread (logged)
    network: bool = False  # the sockets are bound and the thread runs

    @property
    def commands_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def bad_frames(self) -> int:
        """Refusals before a well-formed, authenticated command was decoded."""
        return sum(n for code, n in self.rejected.items() if code in FRAME_CODES)

    def to_schema(self, base: Counters | None = None) -> Counters:
        """The wire :class:`Counters` with this publisher's fields filled in (others from ``base``)."""
        out = msgspec.structs.replace(base) if base is not None else Counters()
        out.snapshots_published = self.published
        out.snapshots_dropped = self.dropped
        out.commands_accepted = self.commands_accepted
        out.commands_rejected = self.commands_rejected
        return out

