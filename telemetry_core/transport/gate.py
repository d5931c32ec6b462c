"""The command gate: who may send, how often, and what a command may say.

Every message read from the command port passes :meth:`CommandGate.admit` on the publisher
thread. It never raises and never decodes before authenticating: the HMAC is checked on the raw
envelope bytes with ``compare_digest`` first. Its answer (:class:`Verdict`) says whether to drop
the message silently, answer with the constant unsigned Nack, answer with a signed Nack, or hand
the command on.

Refusals and replies (``REJECT_CODES`` lists every stable code, the hub's included):

* ``rate_limited``, ``frame_count``, ``oversize``: dropped **without a reply** (counted). The peer
  is not speaking the protocol, or is flooding; answering would only cost the trainer.
* ``unsigned``, ``bad_signature``: answered with a constant, **unsigned** Nack (empty mac, empty
  session, no command id, nothing echoed from the request), so a dashboard holding a stale key can
  tell its user to re-read the connection file. It never signs anything for an unauthenticated peer.
* Every other refusal comes from a holder of the key, so it gets a signed Nack with a plain reason.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass

from telemetry_core import protocol
from telemetry_core.config import TelemetryLevel
from telemetry_core.schema import COMMAND_ACTIONS, Command

__all__ = [
    "AUTH_CODES",
    "FRAME_CODES",
    "REJECT_CODES",
    "SILENT_CODES",
    "CommandGate",
    "TokenBucket",
    "Verdict",
]

log = logging.getLogger("telemetry_core.transport")

# Every refusal has a stable code (counted, logged and shown by the dashboard). The last three
# come from the hub when it applies an accepted command; the rest from the gate.
REJECT_CODES: dict[str, str] = {
    "rate_limited": "too many messages from this peer (token bucket empty)",
    "frame_count": "not [mac, envelope] after the routing id",
    "oversize": f"command envelope over {protocol.MAX_COMMAND_BYTES} bytes",
    "unsigned": "no HMAC signature",
    "bad_signature": "HMAC signature does not match the connection file's key",
    "empty": "empty envelope",
    "malformed": "not a msgpack envelope / command (pickle payloads land here)",
    "bad_magic": "wrong magic",
    "incompatible": "different schema major version",
    "unknown_kind": "unknown message kind",
    "wrong_kind": "a valid message kind that is not a command",
    "wrong_session": "meant for another trainer session",
    "expired": "past its expiry time",
    "stale": "issued too long ago",
    "future": "issued too far in the future (clock skew?)",
    "duplicate": "this command id was already received",
    "unknown_action": "unknown command action",
    "bad_argument": "an argument of the command is out of range",
    "busy": "the trainer's command inbox or replay memory is full, or a profile is running",
    "bad_value": "the hub refused a value when applying the command (the gate's limits make it rare)",
    "no_lease": "renew without an active DEBUG lease",
}
SILENT_CODES = frozenset({"rate_limited", "frame_count", "oversize"})  # never answered
AUTH_CODES = frozenset({"unsigned", "bad_signature"})  # answered with a constant unsigned Nack
FRAME_CODES = frozenset(
    {
        "frame_count",
        "oversize",
        "unsigned",
        "bad_signature",
        "empty",
        "malformed",
        "bad_magic",
        "incompatible",
        "unknown_kind",
        "wrong_kind",
    }
)
MAX_ID_CHARS = 128


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` never waits.

    :meth:`charge` takes a cost after the fact and may leave the bucket in debt (a CPU-time
    budget learns the cost of a batch only once it ran).
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def charge(self, now: float, cost: float, floor: float = -math.inf) -> None:
        """Take ``cost`` after the fact; the debt never goes below ``floor``."""
        self._refill(now)
        self.tokens = max(floor, self.tokens - cost)

    def wait_time(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available."""
        self._refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate


@dataclass(frozen=True)
class Verdict:
    """What to do with one message: ``action`` is drop | auth_nack | nack | history | accept."""

    action: str
    code: str = ""
    reason: str = ""
    command: Command | None = None
    command_id: str = ""


_DROP = "drop"


class CommandGate:
    """Per-peer rate limits, authentication, decoding, replay memory and argument checks."""

    def __init__(
        self,
        key: bytes,
        session: str,
        *,
        command_rate: float,
        command_burst: float,
        history_cost: float,
        max_age: float,
        max_skew: float,
        inbox_size: int,
        replay_memory: int,
        max_peers: int,
    ) -> None:
        self.key = key
        self.session = session
        self.command_rate = float(command_rate)
        self.command_burst = float(command_burst)
        self.history_cost = float(history_cost)
        self.max_age = float(max_age)
        self.max_skew = float(max_skew)
        self.inbox_size = inbox_size
        self.replay_memory = replay_memory
        self.max_peers = max_peers
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self._peers: collections.OrderedDict[bytes, TokenBucket] = collections.OrderedDict()
        self._seen: dict[str, float] = {}  # command id -> monotonic time it may be forgotten
        self._warned: set[str] = set()

    def _reject(self, code: str, message: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        if code not in self._warned:
            self._warned.add(code)
            log.warning("telemetry: refused a command (%s): %s; further refusals are counted", code, message)
        else:
            log.debug("telemetry: refused a command (%s): %s", code, message)

    def admit(self, parts: list[bytes], count: int, now: float, inbox_len: int) -> Verdict:
        """Judge one message: ``parts`` = [routing id, mac, envelope] (at most), ``count`` frames."""
        peer = parts[0]
        bucket = self._peers.get(peer)
        if bucket is None:
            if len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)
            bucket = self._peers[peer] = TokenBucket(self.command_rate, self.command_burst, now)
        else:
            self._peers.move_to_end(peer)
        if not bucket.take(now):
            self._reject("rate_limited", f"peer {peer.hex()[:32]} over {self.command_rate:g} commands/s")
            return Verdict(_DROP, "rate_limited")
        if count != 3:
            self._reject("frame_count", f"{count - 1} frames after the routing id, expected 2")
            return Verdict(_DROP, "frame_count")
        mac, data = parts[1], parts[2]
        if len(data) > protocol.MAX_COMMAND_BYTES or len(mac) > 128:
            self._reject("oversize", f"{len(data)}-byte command envelope")
            return Verdict(_DROP, "oversize")
        # Authentication on the raw bytes, before anything is decoded.
        if not mac or not protocol.verify(self.key, mac, data):
            code = "bad_signature" if mac else "unsigned"
            self._reject(code, REJECT_CODES[code])
            return Verdict("auth_nack", code)
        command_id = ""
        try:
            env = protocol.decode_envelope(data, max_bytes=protocol.MAX_COMMAND_BYTES)
            if env.kind != "command":
                raise protocol.FrameError("wrong_kind", f"a {env.kind[:32]!r} message sent as a command")
            command = protocol.decode_body(env)
            command_id = command.id[:MAX_ID_CHARS]
            self._check_command(env.session, command, now, inbox_len)
        except protocol.FrameError as exc:
            self._reject(exc.code, str(exc))
            return Verdict("nack", exc.code, str(exc), command_id=command_id)
        if command.action == "history":
            # A history reply can be megabytes: it costs more of the peer's bucket.
            if not bucket.take(now, self.history_cost - 1.0):
                reason = "history requested too often; retry in a second"
                self._reject("rate_limited", reason)
                return Verdict("nack", "rate_limited", reason, command_id=command.id)
            self.accepted += 1
            return Verdict("history", command=command)
        self.accepted += 1
        return Verdict("accept", command=command)

    def _check_command(self, session: str, command: Command, now: float, inbox_len: int) -> None:
        """Raise FrameError(code) unless ``command`` may be handed to the hub (or served here)."""
        fail = protocol.FrameError
        if not command.id or len(command.id) > MAX_ID_CHARS or len(command.client) > MAX_ID_CHARS:
            raise fail("bad_argument", f"command id must be 1-{MAX_ID_CHARS} characters")
        if session != self.session or command.session != self.session:
            other = command.session if command.session != self.session else session
            raise fail(
                "wrong_session",
                f"command for session {other[:32]!r}, this trainer is session {self.session!r} "
                "(the trainer restarted? re-read the connection file)",
            )
        if not (math.isfinite(command.issued) and math.isfinite(command.expires)):
            raise fail("bad_argument", "issued and expires must be finite wall times")
        wall = time.time()
        if command.expires < command.issued:
            raise fail("bad_argument", "expires is before issued")
        if wall > command.expires:
            raise fail("expired", f"expired {wall - command.expires:.1f} s ago (trainer clock {wall:.3f})")
        if command.issued > wall + self.max_skew:
            raise fail(
                "future",
                f"issued {command.issued - wall:.1f} s in the future (allowed skew {self.max_skew:g} s; "
                "check the clocks)",
            )
        if wall - command.issued > self.max_age:
            raise fail("stale", f"issued {wall - command.issued:.1f} s ago (limit {self.max_age:g} s)")
        # Replay memory: every id seen within the acceptance window. Older replays are stale.
        seen = self._seen
        if command.id in seen:
            raise fail("duplicate", f"command id {command.id!r} was already received")
        if len(seen) >= self.replay_memory:
            for key in [k for k, until in seen.items() if until <= now]:
                del seen[key]
            if len(seen) >= self.replay_memory:
                raise fail("busy", "too many recent commands to remember; try again shortly")
        seen[command.id] = now + self.max_age + max(0.0, command.issued - wall) + 1.0
        self._check_action(command, inbox_len)

    def _check_action(self, command: Command, inbox_len: int) -> None:
        fail = protocol.FrameError
        action = command.action
        if action not in COMMAND_ACTIONS:
            raise fail(
                "unknown_action", f"unknown action {action[:32]!r}; known: {', '.join(COMMAND_ACTIONS)}"
            )
        if action in ("lease_debug", "renew"):
            top = protocol.MAX_LEASE_UPDATES
            if command.updates is not None and not 1 <= command.updates <= top:
                raise fail("bad_argument", f"updates must be 1-{top}")
            if command.lease_seconds is not None and not (
                math.isfinite(command.lease_seconds) and 0 < command.lease_seconds <= 86400
            ):
                raise fail("bad_argument", "lease_seconds must be in (0, 86400]")
        elif action == "set_level":
            if command.level is None:
                raise fail("bad_argument", "set_level needs a level")
            try:
                TelemetryLevel.parse(command.level[:16])
            except ValueError as exc:
                raise fail("bad_argument", str(exc)) from None
        elif action == "history":
            if command.since_seq is not None and command.since_seq < 0:
                raise fail("bad_argument", "since_seq must be >= 0")
        elif action == "profile" and not 1 <= (command.profile_updates or 1) <= protocol.MAX_PROFILE_UPDATES:
            raise fail("bad_argument", f"profile_updates must be 1-{protocol.MAX_PROFILE_UPDATES}")
        if action != "history" and inbox_len >= self.inbox_size:
            raise fail("busy", "the trainer has not applied the previous commands yet")
