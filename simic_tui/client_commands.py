"""The command side of the dashboard's network worker: the operator's commands and the trainer's replies.

:class:`CommandSide` is the half of :class:`~simic_tui.client.TelemetryClient` that speaks over the
DEALER socket: the UI queues commands (:meth:`~CommandSide.request_debug`, :meth:`~CommandSide.set_level`,
...), the worker signs and sends them with the connection file's key, verifies every reply's signature
before decoding it, applies history chunks (the Clone pattern's backfill) and acknowledgements, and
tracks the operator's DEBUG lease. The SUB stream, the sockets and the link's timers stay in
:mod:`simic_tui.client`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from simic_tui.client_sockets import _sync
from simic_tui.link import DebugLease, LeasePhase, LinkState, LinkStatus
from simic_tui.store import StoreEvent, TelemetryStore
from simic_tui.target import AttachTarget
from telemetry_core.protocol import encode_envelope, new_command, sign, verify
from telemetry_core.schema import SCHEMA_MAJOR, SCHEMA_MINOR, Ack, Envelope, History, Nack, Snapshot

__all__ = ["CommandSide"]


@dataclass
class _Pending:
    action: str
    sent_at: float
    fields: dict[str, Any] = field(default_factory=dict)


class CommandSide:
    """Commands out, replies in (a mixin of :class:`~simic_tui.client.TelemetryClient`, whose
    constructor sets the state below)."""

    target: AttachTarget
    store: TelemetryStore
    clock: Callable[[], float]
    status: LinkStatus
    lease: DebugLease
    session: str | None
    profile_note: str
    lease_updates: int
    lease_seconds: float
    profile_updates: int
    client_name: str
    _dealer: zmq.asyncio.Socket | None
    _queue: collections.deque[tuple[str, dict[str, Any]]]
    _pending: dict[str, _Pending]
    _live_buffer: collections.deque[tuple[Envelope, Snapshot]]
    _history_since: float | None
    _history_sent: bool
    _session_confirmed: bool
    _cmd_seq: int
    _reply_auth_failures: int

    # The SUB side's decode and ingest (simic_tui.client), shared by the history replies.
    _decode: Callable[[bytes, tuple[str, ...]], tuple[Envelope, Any] | None]
    _ingest: Callable[..., None]

    # ------------------------------------------------------------------------------------------
    # UI-facing API (called from the same event loop; the worker sends)
    # ------------------------------------------------------------------------------------------
    def commands_unavailable(self) -> str:
        """'' when a command can be sent now, else the reason in plain words."""
        self._update_commands_note()
        return self.status.commands_note

    def request_debug(self) -> str:
        """Ask for a DEBUG lease; returns '' or the reason it cannot be sent."""
        reason = self.commands_unavailable()
        if reason:
            return reason
        if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            return ""
        self.lease = DebugLease(phase=LeasePhase.PENDING)
        self._queue.append(
            ("lease_debug", {"updates": self.lease_updates, "lease_seconds": self.lease_seconds})
        )
        return ""

    def release_debug(self) -> str:
        """End the operator's DEBUG lease now; returns '' or why there is nothing to release."""
        if self.lease.phase not in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            return "no DEBUG lease to release"
        reason = self.commands_unavailable()
        if reason:
            return reason
        self._queue.append(("release", {}))
        self.lease = DebugLease(phase=LeasePhase.RELEASED, effective_step=self.lease.effective_step)
        return ""

    @property
    def lease_held(self) -> bool:
        return self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE)

    def set_level(self, level: str) -> str:
        """Set the trainer's level (NORMAL / MINIMAL); an active DEBUG lease is released first."""
        reason = self.commands_unavailable()
        if reason:
            return reason
        if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            self._queue.append(("release", {}))
            self.lease = DebugLease(phase=LeasePhase.RELEASED, effective_step=self.lease.effective_step)
        self._queue.append(("set_level", {"level": level}))
        return ""

    def request_profile(self) -> str:
        reason = self.commands_unavailable()
        if reason:
            return reason
        self.profile_note = "profile requested…"
        self._queue.append(("profile", {"profile_updates": self.profile_updates}))
        return ""

    def _update_commands_note(self) -> None:
        t = self.target
        if self.status.state == LinkState.INCOMPATIBLE and self.status.their_version is not None:
            major, minor = self.status.their_version
            note = f"commands disabled: the trainer speaks schema {major}.{minor}, this dashboard {SCHEMA_MAJOR}.{SCHEMA_MINOR}"
        elif not t.can_command:
            note = t.note or "commands disabled: no connection file"
        elif not t.curve and not t.loopback and not t.allow_plaintext:
            note = (
                "commands disabled: the link is not encrypted (the connection file has no CURVE keys); "
                "anyone on the path could read or replay them. Pass --allow-plaintext-commands to send anyway"
            )
        elif self.session is None:
            note = "commands wait for the first frame from the trainer"
        elif t.session is not None and t.session != self.session:
            note = (
                f"commands disabled: the connection file is for session {t.session[:8]}, the trainer streams "
                f"session {self.session[:8]} (an old file? pass the current one with --connection-file)"
            )
        else:
            note = ""
        self.status.commands_note = note

    # -- replies ---------------------------------------------------------------------------------
    async def _drain_dealer(self, budget: int = 256) -> None:
        assert self._dealer is not None
        for _ in range(budget):
            try:
                frames = _sync(self._dealer).recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                self.store.note_bad("socket_error")
                return
            self._on_reply(frames)

    def _on_reply(self, frames: list[bytes]) -> None:
        store = self.store
        key = self.target.key
        if len(frames) != 2 or key is None:
            store.note_bad("frame_count")
            return
        mac, data = frames
        if not mac:
            self._on_unsigned_reply(data)
            return
        # The trainer's replies carry history (straight into the store) and acknowledgements:
        # nothing is decoded before the signature under the connection file's key is checked.
        if not verify(key, mac, data):
            store.note_bad("bad_signature")
            self._reply_auth_failures += 1
            self.status.banner = (
                "Replies from the trainer fail authentication: the connection file's key does not match "
                "this trainer (a wrong or stale key file?)."
            )
            return
        decoded = self._decode(data, ("history", "ack", "nack"))
        if decoded is None:
            return
        env, body = decoded
        if env.session != self.session:
            # Signed with this file's key but for another session: a replay of an old reply.
            store.note_bad("wrong_session")
            return
        if body.command_id not in self._pending:
            # Every reply answers a command this dashboard sent and still waits for; anything else
            # (a reply replayed on a plaintext path, a late duplicate) changes nothing.
            store.note_bad("unexpected_reply")
            return
        if isinstance(body, History):
            self._on_history(env, body)
        elif isinstance(body, Ack):
            self._on_ack(body)
        else:
            self._on_nack(body)

    def _on_unsigned_reply(self, data: bytes) -> None:
        """The trainer's constant, unsigned refusal of a badly signed command: say what to do."""
        decoded = self._decode(data, ("nack",))
        if decoded is None:
            return
        body = decoded[1]
        if body.code not in ("unsigned", "bad_signature"):
            self.store.note_bad("unsigned")
            return
        self._pending.clear()
        if self._history_since is not None:
            self._finish_backfill()  # the history request was refused too: show live frames
        if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            self.lease = DebugLease(phase=LeasePhase.REFUSED, reason="bad signature")
        self.status.banner = (
            "The trainer refused our commands: their signature does not match its key. The connection "
            "file is wrong or stale (did the trainer restart?); pass the current one with --connection-file."
        )
        self.store.events.append(StoreEvent("command", "trainer refused the command: bad signature", "error"))
        self.store.version += 1

    def _on_history(self, env: Envelope, hist: History) -> None:
        """One chunk of a backfill; the live frames held meanwhile are applied after the last one."""
        last_chunk = hist.chunk >= hist.chunks - 1
        if last_chunk:
            for cid in [cid for cid, p in self._pending.items() if p.action == "history"]:
                del self._pending[cid]
        self._session_confirmed = True  # signed by this session's key holder
        for frame in hist.frames:
            decoded = self._decode(frame, ("snapshot",))
            if decoded is None:
                continue
            fenv, snap = decoded
            if fenv.session != self.session:
                self.store.note_bad("wrong_session")
                continue
            self._ingest(fenv, snap, backfill=True)
        if last_chunk:
            self._finish_backfill()
        elif self._history_since is not None:
            self._history_since = self.clock()  # more chunks coming: keep holding live frames

    def _finish_backfill(self) -> None:
        self._history_since = None
        self._history_sent = False
        buffered = list(self._live_buffer)
        self._live_buffer.clear()
        for env, snap in buffered:
            self._ingest(env, snap)
        self.store.version += 1

    def _on_ack(self, ack: Ack) -> None:
        pending = self._pending.pop(ack.command_id, None)
        action = pending.action if pending else ack.action
        store = self.store
        if action in ("lease_debug", "renew"):
            if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
                if self.lease.effective_step is None or action == "lease_debug":
                    self.lease.effective_step = ack.effective_step
                self.lease.lease_until = ack.lease_until
                first = self.lease.phase == LeasePhase.PENDING
                self.lease.phase = LeasePhase.ACTIVE
                if first:
                    store.events.append(StoreEvent("command", self.lease.describe(), "information"))
        elif action == "release":
            store.events.append(StoreEvent("command", "DEBUG lease released", "information"))
        elif action == "set_level":
            at = f" from step {ack.effective_step}" if ack.effective_step is not None else ""
            level = ack.level or (pending.fields.get("level") if pending else "") or ""
            store.events.append(StoreEvent("command", f"level {level} acknowledged{at}", "information"))
        elif action == "profile":
            at = f" from step {ack.effective_step}" if ack.effective_step is not None else ""
            self.profile_note = f"profile acknowledged{at}: waiting for the trace…"
            store.events.append(StoreEvent("command", self.profile_note, "information"))
        store.version += 1

    def _on_nack(self, nack: Nack) -> None:
        pending = self._pending.pop(nack.command_id, None)
        action = pending.action if pending else "command"
        reason = f"{nack.reason} ({nack.code})"
        if nack.code == "bad_signature":
            reason += ": the connection file's key does not match this trainer"
        if action in ("lease_debug", "renew") and self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            self.lease.phase = LeasePhase.REFUSED if action == "lease_debug" else LeasePhase.EXPIRED
            self.lease.reason = reason
        if action == "profile":
            self.profile_note = f"profile refused: {reason}"
        self.store.events.append(StoreEvent("command", f"trainer refused {action}: {reason}", "error"))
        self.store.version += 1

    def _track_lease(self, snap: Snapshot) -> None:
        """The trainer's snapshots say when the lease really ended (N updates, or not renewed)."""
        lease = self.lease
        if lease.phase != LeasePhase.ACTIVE or lease.effective_step is None:
            return
        if snap.step < lease.effective_step:
            return
        if snap.level.lease_until is not None:
            lease.lease_until = snap.level.lease_until
            return
        lease.phase = LeasePhase.EXPIRED
        self.store.events.append(StoreEvent("command", self.lease.describe(), "warning"))

    # -- sending ---------------------------------------------------------------------------------
    def _lease_left(self) -> int | None:
        """Updates the active lease may still run within its bound (None before it took effect)."""
        lease, latest = self.lease, self.store.latest
        if lease.effective_step is None:
            return None
        step = max(latest.step if latest is not None else 0, lease.effective_step)
        return lease.effective_step + self.lease_updates - step

    def _ask_history(self) -> None:
        """Hold live snapshots and ask for what came before them (the Clone pattern)."""
        if not self.target.can_command:
            return
        if self._history_since is None:
            self._history_since = self.clock()
        self._history_sent = False
        self._queue = collections.deque(((a, f) for a, f in self._queue if a != "history"), maxlen=64)
        self._queue.appendleft(("history", {"since_seq": self.store.last_seq}))

    async def _send_queued(self) -> None:
        while self._queue:
            action, fields = self._queue.popleft()
            self._send_now(action, fields)

    def _send_now(self, action: str, fields: dict[str, Any]) -> None:
        t = self.target
        now = self.clock()
        if self._dealer is None or t.key is None or self.session is None:
            if action == "history":
                self._finish_backfill()
            return
        cmd = new_command(action, session=self.session, client=self.client_name, **fields)
        self._cmd_seq += 1
        data = encode_envelope(
            "command",
            cmd,
            session=self.session,
            seq=self._cmd_seq,
            step=self.store.latest.step if self.store.latest else 0,
        )
        try:
            _sync(self._dealer).send_multipart([sign(t.key, data), data], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            if action == "history":
                return  # not connected yet: housekeeping retries until the history timeout
            self.store.events.append(
                StoreEvent(
                    "command", f"{action} not sent: the trainer's command port is not reachable", "error"
                )
            )
            if action == "lease_debug":
                self.lease = DebugLease(phase=LeasePhase.REFUSED, reason="command port not reachable")
            self.store.version += 1
            return
        self._pending[cmd.id] = _Pending(action, now, fields)
        if action == "history":
            self._history_sent = True
        if action in ("lease_debug", "renew"):
            self.lease.last_sent = now
            if action == "lease_debug":
                self.lease.command_id = cmd.id
