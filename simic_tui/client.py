"""The network side of the dashboard: one long-lived async worker owns SUB + DEALER.

``TelemetryClient.run()`` runs on the UI's event loop (a Textual worker) and is the only code that
touches the sockets. It subscribes first, then asks the trainer for its recent history and backfills,
dropping frames older than what the store already holds (ZeroMQ's "Clone" pattern). It tracks the
link (connecting / live / stale / disconnected / incompatible), recognises a trainer restart by its new
session id, counts every refused frame, renews the operator's DEBUG lease, and writes everything into
the :class:`~simic_tui.store.TelemetryStore`. Widgets read the store on a timer; nothing here draws.

Commands are queued by the UI (:meth:`request_debug`, :meth:`set_level`, ...) and sent by the worker,
signed with the connection file's key; replies are verified before they are decoded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from simic_tui.link import DebugLease, LeasePhase, LinkState, LinkStatus
from simic_tui.store import StoreEvent, TelemetryStore
from simic_tui.target import AttachTarget
from telemetry_core.protocol import (
    MAX_FRAME_BYTES,
    TOPIC_HEARTBEAT,
    TOPIC_SNAPSHOT,
    IncompatibleVersion,
    encode_envelope,
    new_command,
    sign,
    verify,
)
from telemetry_core.schema import (
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    Ack,
    Envelope,
    Heartbeat,
    History,
    Nack,
    Snapshot,
)

__all__ = ["DebugLease", "LeasePhase", "LinkState", "LinkStatus", "TelemetryClient"]  # the first four: link.py


_SHADOWS: dict[int, zmq.Socket] = {}
log = logging.getLogger(__name__)

# What the trainer may make this process buffer, in bytes: libzmq caps queues in messages, so the
# cap in messages is the byte budget over the largest message allowed (8 with 8 MiB frames), with
# the kernel's socket buffer held at 1 MiB. A flood of frames is then dropped by the trainer's PUB
# (and counted as missed here) instead of piling up in this process.
RECEIVE_BUDGET_BYTES = 64 * 1024 * 1024


def _keys(t: AttachTarget) -> tuple[object, ...]:
    return (t.key, t.cmd, t.curve_server_public, t.curve_client_public, t.curve_client_secret)


def _cap_receive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024)
    sock.setsockopt(zmq.RCVHWM, max(4, RECEIVE_BUDGET_BYTES // (MAX_FRAME_BYTES + 1024)))
    sock.setsockopt(zmq.RCVBUF, 1024 * 1024)


def _sync(sock: zmq.asyncio.Socket) -> zmq.Socket:
    """The same socket through the blocking API, for NOBLOCK calls that must fail *now*.

    zmq.asyncio reports EAGAIN of a NOBLOCK send through the returned future, after the fact; the
    worker wants to know at once that the trainer is unreachable. Same thread, same socket: safe.
    """
    shadow = _SHADOWS.get(sock.underlying)
    if shadow is None:
        shadow = _SHADOWS[sock.underlying] = zmq.Socket.shadow(sock.underlying)
    return shadow


@dataclass
class _Pending:
    action: str
    sent_at: float
    fields: dict[str, Any] = field(default_factory=dict)


class TelemetryClient:
    """SUB + DEALER in one coroutine; see the module docstring for the behaviour."""

    def __init__(
        self,
        target: AttachTarget,
        store: TelemetryStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after: float = 3.0,
        history_timeout: float = 3.0,
        reply_timeout: float = 5.0,
        lease_updates: int = 100,
        lease_seconds: float = 15.0,
        profile_updates: int = 3,
        rescan_interval: float = 1.0,
        client_name: str | None = None,
    ) -> None:
        self.target = target
        self.store = store
        self.clock = clock
        self.stale_after = stale_after
        self.history_timeout = history_timeout
        self.reply_timeout = reply_timeout
        self.lease_updates = lease_updates
        self.lease_seconds = lease_seconds
        self.profile_updates = profile_updates
        self.rescan_interval = rescan_interval
        self.client_name = client_name or f"simic-tui-{uuid.uuid4().hex[:8]}"
        self.status = LinkStatus(endpoint=target.pub, since=clock())
        self.lease = DebugLease()
        self.profile_note = ""
        self.session: str | None = None
        self._session_confirmed = False  # a frame of ``session`` has arrived (not just the file's word)
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=64)
        self._pending: dict[str, _Pending] = {}
        self._live_buffer: collections.deque[tuple[Envelope, Snapshot]] = collections.deque(maxlen=256)
        self._history_since: float | None = None  # wanting history since (live frames are held)
        self._history_sent = False
        self._stopping = False
        self._last_rescan = 0.0
        self._cmd_seq = 0
        self._reply_auth_failures = 0
        self._update_commands_note()

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

    def stop(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------------------------------------
    # The worker
    # ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until :meth:`stop` (or cancellation); never raises.

        A failure of the worker itself (a bug, or a frame that got past every check and still broke
        something) is logged with its traceback, shown in the header as a failed worker, and the
        worker restarts with fresh sockets after a short back-off; it never dies silently.
        """
        while not self._stopping:
            try:
                await self._run_once()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.status.worker_failures += 1
                n = self.status.worker_failures
                log.error("simic-tui: the network worker failed (%d); restarting", n, exc_info=True)
                self.status.set(
                    LinkState.DISCONNECTED,
                    self.clock(),
                    f"network worker failed ({type(exc).__name__}); restarting (failure {n})",
                )
                self.store.events.append(
                    StoreEvent("info", f"network worker failed: {type(exc).__name__}; restarted", "error")
                )
                self.store.version += 1
                self._pending.clear()
                self._live_buffer.clear()
                self._history_since = None
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(n, 6)))

    async def _run_once(self) -> None:
        self._ctx = zmq.asyncio.Context()
        try:
            self._open_sockets()
            poller = zmq.asyncio.Poller()
            self._register(poller)
            if self.target.can_command and self.target.session:
                # The connection file names the session: ask for history at once instead of waiting
                # for the first live frame (a trainer between updates may not publish for a while).
                self.session = self.target.session
                self._session_confirmed = False
                self._update_commands_note()
                self._ask_history()
            while not self._stopping:
                events = dict(await poller.poll(timeout=100))
                if self._sub is not None and self._sub in events:
                    await self._drain_sub()
                if self._dealer is not None and self._dealer in events:
                    await self._drain_dealer()
                if self._monitor is not None and self._monitor in events:
                    await self._drain_monitor()
                if self._housekeeping():
                    self._close_sockets()
                    self._open_sockets()
                    poller = zmq.asyncio.Poller()
                    self._register(poller)
                await self._send_queued()
        finally:
            if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
                with contextlib.suppress(Exception):
                    self._send_now("release", {})
            self._close_sockets()
            if self._ctx is not None:
                self._ctx.term()
            self._ctx = None

    def _register(self, poller: zmq.asyncio.Poller) -> None:
        for sock in (self._sub, self._dealer, self._monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)

    def _curve(self, sock: zmq.Socket) -> None:
        t = self.target
        if t.curve:
            assert t.curve_server_public and t.curve_client_public and t.curve_client_secret
            sock.curve_serverkey = t.curve_server_public.encode()
            sock.curve_publickey = t.curve_client_public.encode()
            sock.curve_secretkey = t.curve_client_secret.encode()

    def _open_sockets(self) -> None:
        assert self._ctx is not None
        t = self.target
        sub = self._ctx.socket(zmq.SUB)
        sub.linger = 0
        _cap_receive(sub)
        sub.setsockopt(zmq.RECONNECT_IVL, 250)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.ipv6 = t.ipv6
        self._curve(sub)
        self._monitor = sub.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC_SNAPSHOT)
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
        sub.connect(t.pub)
        self._sub = sub
        self._dealer = None
        if t.can_command:
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.linger = 0
            _cap_receive(dealer)
            dealer.setsockopt(zmq.IMMEDIATE, 1)  # refuse to queue while no trainer is connected
            dealer.setsockopt(zmq.SNDHWM, 64)
            dealer.ipv6 = t.ipv6
            self._curve(dealer)
            assert t.cmd is not None
            dealer.connect(t.cmd)
            self._dealer = dealer
        self.status.endpoint = t.pub
        self.status.unencrypted = not t.curve and not t.loopback
        self._update_commands_note()

    def _close_sockets(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
        for sock in (self._monitor, self._sub, self._dealer):
            if sock is not None:
                _SHADOWS.pop(sock.underlying, None)
                sock.close(linger=0)
        self._sub = self._dealer = self._monitor = None

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

    # -- receiving --------------------------------------------------------------------------------
    async def _drain_sub(self, budget: int = 2000) -> None:
        assert self._sub is not None
        for _ in range(budget):
            try:
                frames = _sync(self._sub).recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                self.store.note_bad("socket_error")
                return
            self._on_sub_frames(frames)

    def _on_sub_frames(self, frames: list[bytes]) -> None:
        store = self.store
        if len(frames) != 2:
            store.note_bad("frame_count")
            return
        topic, data = frames
        if topic not in (TOPIC_SNAPSHOT, TOPIC_HEARTBEAT):
            store.note_bad("unknown_topic")
            return
        decoded = self._decode(data, ("snapshot",) if topic == TOPIC_SNAPSHOT else ("heartbeat",))
        if decoded is None:
            return
        env, body = decoded
        now = self.clock()
        if not self._accept_session(env):
            return
        self.status.last_frame_at = now
        if self.status.state != LinkState.LIVE:
            self.status.set(LinkState.LIVE, now)
            self.status.banner = ""
            self.status.their_version = None
            self._update_commands_note()
        if isinstance(body, Heartbeat):
            store.note_heartbeat(env, body)
            return
        if self._history_since is not None:
            self._live_buffer.append((env, body))  # held until the history reply (or its timeout)
            return
        self._ingest(env, body)

    def _decode(self, data: bytes, kinds: tuple[str, ...]) -> tuple[Envelope, Any] | None:
        """The store's one decode path (counts bad frames); an incompatible trainer changes the link."""
        try:
            return self.store.decode_frame(data, kinds)
        except IncompatibleVersion as exc:
            self._on_incompatible(exc)
            return None

    def _ingest(self, env: Envelope, snap: Snapshot, *, backfill: bool = False) -> None:
        self.store.ingest(env, snap, quiet=backfill, backfill=backfill)
        self._track_lease(snap)
        if snap.profile_trace and not backfill:
            self.profile_note = f"profile trace: {snap.profile_trace}"

    def _accept_session(self, env: Envelope) -> bool:
        """Adopt the first session; a different one later is a trainer restart: reset and say so."""
        if self.session == env.session:
            self._session_confirmed = True
            return True
        old = self.session if self._session_confirmed else None  # a stale connection file is no restart
        if old is None and self.store.count:
            self.store.reset(env.session)  # history of the file's session: not this trainer's
        self._session_confirmed = True
        self.session = env.session
        if self.target.session != env.session:
            before = self.target
            self.target = self.target.reload()
            curve = (before.curve_client_public, before.curve_server_public, before.cmd)
            if curve != (self.target.curve_client_public, self.target.curve_server_public, self.target.cmd):
                self._reopen_needed = True
        if old is not None:
            self.status.restarts += 1
            self.store.reset(env.session)
            self.lease = DebugLease()
            self.profile_note = ""
            self._pending.clear()
            self._live_buffer.clear()
            self.store.events.append(
                StoreEvent(
                    "reset",
                    f"trainer restarted: new session {env.session[:8]} (was {old[:8]}); history reset",
                    "warning",
                )
            )
        else:
            self.store.session = env.session
        self._update_commands_note()
        self._ask_history()
        return True

    def _on_incompatible(self, exc: IncompatibleVersion) -> None:
        now = self.clock()  # the store counted the frame
        self.status.their_version = (exc.major, exc.minor)
        self.status.last_frame_at = now
        self.status.banner = (
            f"Incompatible trainer: it speaks schema {exc.major}.{exc.minor}, this dashboard speaks "
            f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}. Its frames are refused and commands are disabled; install the "
            "simic-tui release that matches the trainer."
        )
        self.status.set(LinkState.INCOMPATIBLE, now)
        self._update_commands_note()

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

    async def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                msg = _sync(self._monitor).recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            try:
                event = parse_monitor_message(msg)["event"]
            except Exception:  # a malformed monitor message is not worth a crash
                continue
            self._on_monitor(event)

    def _on_monitor(self, event: int) -> None:
        now = self.clock()
        st = self.status
        if event == zmq.EVENT_CONNECTED:
            if st.state in (LinkState.DISCONNECTED, LinkState.CONNECTING):
                st.set(LinkState.CONNECTING, now, "connected, waiting for the first frame")
            if self.session is not None:
                self._ask_history()  # reconnected: backfill what was missed
        elif event == zmq.EVENT_DISCONNECTED:
            if st.state != LinkState.INCOMPATIBLE:
                st.set(LinkState.DISCONNECTED, now, "connection lost, reconnecting…")
        elif event == zmq.EVENT_CONNECT_RETRIED:
            st.connect_retries += 1
            if st.state in (LinkState.CONNECTING, LinkState.DISCONNECTED):
                st.detail = f"retrying (attempt {st.connect_retries})"
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            st.banner = (
                "The trainer refused the encrypted handshake (CURVE): pass its current connection file "
                "with --connection-file."
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or self.target.curve
                else "The trainer requires CURVE encryption: pass its connection file with --connection-file."
            )
        self.store.version += 1

    # -- housekeeping and sending -------------------------------------------------------------------
    _reopen_needed = False

    def _housekeeping(self) -> bool:
        """Timers: stale link, history timeout, reply timeouts, lease renewal, connection-file rescan.

        Returns True when the sockets must be reopened (new key material after a restart).
        """
        now = self.clock()
        st = self.status
        if (
            st.state == LinkState.LIVE
            and st.last_frame_at is not None
            and now - st.last_frame_at > self.stale_after
        ):
            st.set(LinkState.STALE, now)
        if st.state == LinkState.STALE and st.last_frame_at is not None:
            st.detail = f"no heartbeat for {now - st.last_frame_at:.0f} s"
        if self._history_since is not None:
            if now - self._history_since > self.history_timeout:
                self.store.events.append(
                    StoreEvent("info", "no history from the trainer: showing live frames only", "warning")
                )
                self._finish_backfill()
            elif not self._history_sent and not any(a == "history" for a, _ in self._queue):
                self._queue.appendleft(("history", {"since_seq": self.store.last_seq}))
        for cid, pending in list(self._pending.items()):
            if now - pending.sent_at > self.reply_timeout:
                del self._pending[cid]
                self.store.events.append(
                    StoreEvent(
                        "command", f"no reply to {pending.action} after {self.reply_timeout:.0f} s", "warning"
                    )
                )
                if pending.action == "lease_debug" and self.lease.phase == LeasePhase.PENDING:
                    self.lease = DebugLease(phase=LeasePhase.REFUSED, reason="no reply from the trainer")
                if pending.action == "profile":
                    self.profile_note = "profile: no reply from the trainer"
                self.store.version += 1
        if self.lease.phase == LeasePhase.ACTIVE and now - self.lease.last_sent > self.lease_seconds / 3:
            self._queue.append(
                ("renew", {"updates": self.lease_updates, "lease_seconds": self.lease_seconds})
            )
            self.lease.last_sent = now
        reopen = self._reopen_needed
        self._reopen_needed = False
        if (not self.target.can_command or st.state != LinkState.LIVE) and (
            now - self._last_rescan > self.rescan_interval
        ):
            # No key yet (the trainer has not written its file), or no frames: a restarted trainer
            # has new keys, and with CURVE the old ones cannot even complete a handshake.
            self._last_rescan = now
            fresh = self.target.reload()
            if fresh.session != self.target.session and _keys(fresh) != _keys(self.target):
                had_key = self.target.can_command
                self.target = fresh
                reopen = True
                if self.session is not None and not had_key:
                    self._ask_history()
        if reopen:
            self._update_commands_note()
        return reopen

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
