"""The network side of the dashboard: one long-lived async worker owns SUB + DEALER.

``TelemetryClient.run()`` runs on the UI's event loop (a Textual worker) and is the only code that
touches the sockets. It subscribes first, then asks the trainer for its recent history and backfills,
dropping frames older than what the store already holds (ZeroMQ's "Clone" pattern). It tracks the
link (connecting / live / stale / disconnected / incompatible), recognises a trainer restart by its new
session id, counts every refused frame, renews the operator's DEBUG lease, and writes everything into
the :class:`~simic_tui.store.TelemetryStore`. Widgets read the store on a timer; nothing here draws.

Commands are queued by the UI (:meth:`request_debug`, :meth:`set_level`, ...) and sent by the worker,
signed with the connection file's key; replies are verified before they are decoded
(:mod:`simic_tui.client_commands`; socket helpers: :mod:`simic_tui.client_sockets`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from simic_tui.client_commands import CommandSide, _Pending
from simic_tui.client_sockets import _SHADOWS, _cap_receive, _keys, _sync
from simic_tui.link import DebugLease, LeasePhase, LinkState, LinkStatus
from simic_tui.reach import explain_unreachable
from simic_tui.store import StoreEvent, TelemetryStore
from simic_tui.target import AttachTarget
from telemetry_core.protocol import TOPIC_HEARTBEAT, TOPIC_SNAPSHOT, IncompatibleVersion
from telemetry_core.schema import SCHEMA_MAJOR, SCHEMA_MINOR, Envelope, Heartbeat, Snapshot

__all__ = ["DebugLease", "LeasePhase", "LinkState", "LinkStatus", "TelemetryClient"]  # the first four: link.py

log = logging.getLogger(__name__)


class TelemetryClient(CommandSide):
    """SUB + DEALER in one coroutine; see the module docstring for the behaviour.

    The command side (the UI's requests, sending, replies, the DEBUG lease) is
    :class:`~simic_tui.client_commands.CommandSide`; this class owns the sockets, the SUB stream and
    the link's timers.
    """

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
        # Seconds between drains of the sockets (0: woken by each frame as it arrives). A sweep sets
        # it for the runs not on screen: nothing is skipped (frames wait in the socket's queue, then
        # in the kernel's and the trainer's send queue, each bounded); they are taken in batches.
        self.receive_interval = 0.0
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
        self._refused = False  # ZeroMQ reported a failed connect since the last success
        self._diagnosis: asyncio.Task[str] | None = None
        self._diagnosed_at = -1e18
        self._update_commands_note()

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
                events: Collection[object]
                if self.receive_interval > 0:
                    # Batched: no poller (its futures and reader registrations cost more than a
                    # frame's decode); every socket is drained without blocking once per interval,
                    # and the frames that arrived meanwhile wait in its queue.
                    await asyncio.sleep(self.receive_interval)
                    events = (self._sub, self._dealer, self._monitor)
                else:
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
            if self._diagnosis is not None:
                self._diagnosis.cancel()
                self._diagnosis = None
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
        self.status.unreachable = ""
        if self.status.state == LinkState.FINISHED and self.store.finished is not None:
            return  # the run ended; its publisher's last heartbeats change nothing
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
        if self.store.finished is not None and self.status.state != LinkState.FINISHED:
            self._on_finished(self.store.finished)
            return
        self._track_lease(snap)
        if snap.profile_trace and not backfill:
            self.profile_note = f"profile trace: {snap.profile_trace}"

    def _on_finished(self, final: Snapshot) -> None:
        """The trainer closed its hub: the run ended. Stop asking it for anything."""
        self.status.set(LinkState.FINISHED, self.clock())
        self._pending.clear()
        if self.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE):
            self.lease = DebugLease(phase=LeasePhase.EXPIRED, reason="the run ended")
        planned = final.run.planned_updates
        self.store.events.append(
            StoreEvent("info", f"the trainer finished at step {final.step}{f'/{planned}' if planned else ''}")
        )
        self.store.version += 1

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
            self._refused = False
            if st.state in (LinkState.DISCONNECTED, LinkState.CONNECTING):
                st.set(LinkState.CONNECTING, now, "connected, waiting for the trainer's first frame")
            if self.session is not None and st.state != LinkState.FINISHED:
                self._ask_history()  # reconnected: backfill what was missed
        elif event == zmq.EVENT_DISCONNECTED:
            if st.state not in (LinkState.INCOMPATIBLE, LinkState.FINISHED):
                # Frames stopped without the closing frame: the trainer vanished (or the network).
                st.set(LinkState.DISCONNECTED, now, "reconnecting quietly")
        elif event == zmq.EVENT_CONNECT_RETRIED:
            # Counted, not shown: the header names the address and the reason instead (below).
            st.connect_retries += 1
            self._refused = True
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            st.banner = (
                "The trainer refused the encrypted handshake (CURVE): pass its current connection file "
                "with --connection-file."
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or self.target.curve
                else "The trainer requires CURVE encryption: pass its connection file with --connection-file."
            )
        self.store.version += 1

    # -- housekeeping ------------------------------------------------------------------------------
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
        self._diagnose(now)
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
            # Renewal keeps the lease while this dashboard is attached, never past its bound:
            # lease_updates from the step it took effect (DEBUG costs the trainer ~20-30 %).
            left = self._lease_left()
            if left is not None and left > 0:
                self._queue.append(("renew", {"updates": left, "lease_seconds": self.lease_seconds}))
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

    # Seconds without a connection before the header says why, and between fresh looks.
    DIAGNOSE_AFTER = 1.5
    DIAGNOSE_EVERY = 10.0

    def _diagnose(self, now: float) -> None:
        """While no trainer answers, name the address and the likely reason (in the background:
        resolving a host name may take a while) and keep retrying quietly."""
        st = self.status
        task = self._diagnosis
        if task is not None and task.done():
            self._diagnosis = None
            reason = "" if task.cancelled() or task.exception() is not None else task.result()
            if reason and st.state == LinkState.CONNECTING and st.last_frame_at is None:
                st.unreachable = reason
                st.detail = "retrying quietly"
                self.store.version += 1
            return
        if (
            task is not None
            or st.state != LinkState.CONNECTING
            or st.last_frame_at is not None
            or self.target.require_pid is not None  # the demo: its own trainer is starting
            or not (self._refused or now - st.since > self.DIAGNOSE_AFTER)
            or now - self._diagnosed_at < self.DIAGNOSE_EVERY
        ):
            return
        self._diagnosed_at = now
        self._diagnosis = asyncio.ensure_future(explain_unreachable(self.target, refused=self._refused))

