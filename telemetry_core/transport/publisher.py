"""The publisher: snapshots out on PUB, authenticated commands in on ROUTER, one thread owns both.

The training thread only appends a snapshot to a bounded queue that drops the oldest (and
counts it): it never waits on the network, a slow dashboard or a flood of commands, and it does
not even wake the publisher thread. With :meth:`Publisher.hand_off_snapshot` (the hub's path) it
does not encode either: the publisher thread encodes the snapshot (msgpack, tens of microseconds
for a DEBUG one), so the caller must not change it afterwards; :meth:`Publisher.publish_snapshot`
encodes on the calling thread and returns the frame. A pipe write per snapshot would release the GIL
to a thread that then holds it while the training thread waits (hundreds of microseconds per
publish with a subscriber attached); instead the thread looks at the queue every
``wake_interval`` seconds (20 ms by default, imperceptible on a dashboard).

Why it is built this way:

* Sockets are not thread-safe, so the publisher thread creates the context and owns every socket.
  A process forked after construction (DataLoader workers) checks ``os.getpid()`` and never touches
  the queue, the pipe or a socket.
* PUB drops at its high-water mark instead of blocking, and LINGER 0 lets ``close()`` return within
  about a second even with messages queued. No REQ/REP (deadlocks on a lost reply), no CONFLATE
  (breaks multipart).
* Late joiners subscribe first, then send a ``history`` command; the thread answers at once from
  the last ``history`` frames, chunked under the frame cap ("Clone" pattern).
* Authentication happens at connect, on both ports (:mod:`.auth`): CURVE with the keys of the 0600
  connection file, loopback included, so a peer without the file never completes a handshake and
  none of its bytes are buffered. On top, every command is signed (:mod:`.gate`).
* What an authenticated peer can cost is capped too: ``MAXMSGSIZE`` on both sockets (a subscription
  is a message to the PUB socket: 10 MB topics are refused by libzmq), a cap on authenticated
  peers and a handshake rate, a per-peer token bucket, a global read rate and a CPU-time budget
  for everything the thread does besides its own work (``command_cpu_share`` of one core: polling,
  monitor events, the ZAP handler, reading, refusing and answering): when it is spent the thread
  stops reading the command port, libzmq's receive queue fills and TCP pushes back on the sender.
  libzmq delivers a multipart message only once all of its parts arrived and has no limit on their
  number, so the part count cannot be bounded before buffering; the peer must have passed the
  handshake to try.
* The thread runs ``thread_nice`` steps below the thread that started it (Linux), and so do the
  libzmq I/O threads it starts: handshakes, CURVE and the GIL-free parts of a flood wait for a
  free core instead of taking one from training.

This module holds the training-thread half (the API, the queue, the lifecycle); the loop the
thread runs is :class:`~.thread.PublisherThread`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from telemetry_core import protocol
from telemetry_core.config import TelemetryLevel
from telemetry_core.schema import Ack, Command, Counters, Nack, Snapshot
from telemetry_core.transport.auth import ZapHandler
from telemetry_core.transport.commands import CommandPort
from telemetry_core.transport.counters import PublisherCounters
from telemetry_core.transport.gate import CommandGate, TokenBucket
from telemetry_core.transport.history import HistoryRing
from telemetry_core.transport.net import DEFAULT_BIND, BindError, Endpoints, TransportError, zmq_endpoint
from telemetry_core.transport.sockets import BindPlan
from telemetry_core.transport.thread import CLOSE_LINGER_MS, PublisherThread

__all__ = ["CLOSE_LINGER_MS", "Publisher", "PublisherCounters"]

log = logging.getLogger("telemetry_core.transport")

# A queued snapshot: (seq, its frame or the snapshot still to encode, who else wants the frame).
_Queued = tuple[int, bytes | Snapshot, Callable[[bytes], None] | None]


def _take_all(queue: collections.deque[_Queued]) -> list[_Queued]:
    out = []
    while True:
        try:
            out.append(queue.popleft())
        except IndexError:
            return out


def _close_at_exit(ref: weakref.ref[Publisher]) -> None:
    pub = ref()
    if pub is not None:
        pub.close()


class Publisher(PublisherThread):
    """Snapshots out on PUB, authenticated commands in on ROUTER, owned by one background thread.

    The training thread calls :meth:`publish_snapshot` (never blocks), :meth:`set_status`,
    :meth:`poll_commands` (non-blocking, at update boundaries) and :meth:`reply`. Nothing here
    raises into training once started, unless ``strict=True``.

    ``bind=None`` turns the network off: snapshots are still encoded (and returned, for a
    recorder) and counted as ``unsent``. With port 0 the PUB and ROUTER get ephemeral ports (see
    :attr:`endpoints`); otherwise the ROUTER binds the PUB port + 1 unless ``cmd_bind`` is given.
    The default ports, when taken, move to the next free pair (``port_search`` pairs are tried,
    by default for the default bind only); :attr:`endpoints` and a warning say where.

    ``curve=None`` (the default) encrypts and authenticates every connection with CURVE whenever
    libzmq has it, loopback included; ``curve=False`` is allowed on loopback only (then any local
    user can read the stream, though not command it) and ``curve=True`` insists.

    ``max_peers`` caps the authenticated connections (both ports; a dashboard holds two), and the
    ZAP handler grants at most ``handshake_rate`` handshakes a second (``handshake_burst`` at
    once); beyond either a handshake is refused at once and counted in
    ``counters.connections_refused``.
    """

    def __init__(
        self,
        bind: str | None = DEFAULT_BIND,
        *,
        session: str | None = None,
        run_name: str = "",
        cmd_bind: str | None = None,
        history: int = 2000,
        history_bytes: int = 64 * 1024 * 1024,
        history_chunk_bytes: int = 1024 * 1024,
        queue_size: int = 256,
        strict: bool = False,
        connection_file: bool | str | Path = True,
        curve: bool | None = None,
        curve_allow: list[bytes | str] | None = None,
        pub_hwm: int = 100,
        heartbeat_interval: float = 1.0,
        command_rate: float = 20.0,
        command_burst: int = 40,
        history_cost: float = 10.0,
        read_rate: float = 2000.0,
        read_burst: int = 500,
        max_command_age: float = 60.0,
        max_clock_skew: float = 30.0,
        inbox_size: int = 256,
        replay_memory: int = 16384,
        max_peers: int = 32,
        handshake_rate: float = 20.0,
        handshake_burst: int = 40,
        command_cpu_share: float = 0.02,
        wake_interval: float = 0.02,
        port_search: int | None = None,
        thread_nice: int = 10,
    ) -> None:
        for name, value, low in (
            ("history", history, 0),
            ("history_bytes", history_bytes, 0),
            ("history_chunk_bytes", history_chunk_bytes, 1024),
            ("queue_size", queue_size, 1),
            ("pub_hwm", pub_hwm, 1),
            ("command_burst", command_burst, 1),
            ("read_burst", read_burst, 1),
            ("inbox_size", inbox_size, 1),
            ("replay_memory", replay_memory, 1),
            ("max_peers", max_peers, 2),
            ("handshake_burst", handshake_burst, 1),
            ("thread_nice", thread_nice, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, fvalue in (
            ("heartbeat_interval", heartbeat_interval),
            ("command_rate", command_rate),
            ("history_cost", history_cost),
            ("read_rate", read_rate),
            ("max_command_age", max_command_age),
            ("max_clock_skew", max_clock_skew),
            ("command_cpu_share", command_cpu_share),
            ("handshake_rate", handshake_rate),
            ("wake_interval", wake_interval),
        ):
            if not isinstance(fvalue, (int, float)) or not math.isfinite(fvalue) or fvalue <= 0:
                raise ValueError(f"{name} must be a positive number, got {fvalue!r}")
        if history_chunk_bytes > protocol.MAX_FRAME_BYTES // 2:
            raise ValueError(f"history_chunk_bytes must be <= {protocol.MAX_FRAME_BYTES // 2}")

        self.session = session or protocol.new_session_id()
        self.run_name = run_name
        self.strict = strict
        self._pid = os.getpid()
        self._key_hex = protocol.ConnectionInfo.new_key()
        self._key = bytes.fromhex(self._key_hex)

        # -- where to bind, and whether CURVE is required (checked here, before any thread) ----
        self._bind = bind
        self._plan = BindPlan(bind, cmd_bind, curve, curve_allow, port_search)
        self._curve = self._plan.curve

        self._connection_file_opt = connection_file
        self._connection_path: Path | None = None
        self._connection_info: protocol.ConnectionInfo | None = None
        self._endpoints: Endpoints | None = None

        # -- settings used by the thread ---------------------------------------------------
        self._history = HistoryRing(history, history_bytes)
        self._chunk_bytes = history_chunk_bytes
        self._queue_size = queue_size
        self._pub_hwm = pub_hwm
        self._hb_interval = float(heartbeat_interval)
        self._read_bucket = TokenBucket(read_rate, read_burst)
        # CPU seconds per second the thread may spend on incoming messages, with a short burst.
        self._cpu_bucket = TokenBucket(command_cpu_share, max(0.005, 2.5 * command_cpu_share))
        self._max_peers = max_peers
        self._handshake_rate = float(handshake_rate)
        self._handshake_burst = handshake_burst
        self._wake_interval = float(wake_interval)
        self._thread_nice = thread_nice
        self._gate = CommandGate(
            self._key,
            self.session,
            command_rate=command_rate,
            command_burst=command_burst,
            history_cost=history_cost,
            max_age=max_command_age,
            max_skew=max_clock_skew,
            inbox_size=inbox_size,
            replay_memory=replay_memory,
            max_peers=1024,
        )

        # -- shared between the training thread and the publisher thread -----------------------
        self._queue: collections.deque[_Queued] = collections.deque()
        self._replies: collections.deque[tuple[bytes, Ack | Nack]] = collections.deque(maxlen=1024)
        self._controls: collections.deque[Callable[[], None]] = collections.deque()
        self._inbox: collections.deque[tuple[bytes, Command]] = collections.deque()
        self._seq = 0
        self._status: tuple[int, str, Counters | None] = (0, "NORMAL", None)
        self._started = False
        self._closed = False
        self._network = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._bind_error: str | None = None
        self._thread_error: BaseException | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._start_time = time.monotonic()
        self._warned: set[str] = set()

        # -- counters (each written by one thread only) ------------------------------------
        self._published = 0
        self._dropped = 0
        self._unsent = 0
        self._heartbeats = 0
        self._handshake_failures = 0
        self._read_pauses = 0
        self._errors = 0

        # -- publisher-thread state ------------------------------------------------------------
        self._last_sent_seq = 0
        self._atexit: Callable[[], None] | None = None
        self._zap: ZapHandler | None = None  # owned by the publisher thread
        self._port = CommandPort(
            self._gate,
            self._key,
            self.session,
            read_bucket=self._read_bucket,
            cpu_bucket=self._cpu_bucket,
            history=self._history,
            chunk_bytes=history_chunk_bytes,
            inbox=self._inbox,
            header=lambda: (self._last_sent_seq, self._status[0]),
        )

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------

    def start(self) -> Publisher:
        """Bind (in the publisher thread) and write the connection file. Idempotent.

        A failed bind logs one warning and leaves the stream off (publishing becomes a counted
        no-op); under ``strict=True`` it raises :class:`BindError`.
        """
        if self._started or self._closed:
            return self
        if os.getpid() != self._pid:
            self._warn_once(
                "fork", "telemetry publisher: start() in a forked child is ignored (children never send)"
            )
            return self
        self._started = True
        if self._bind is None:
            return self
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, name="simic-publisher", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if not self._network:
            message = self._bind_error or "the publisher thread did not start within 10 s"
            self._thread.join(1.0)
            self._close_pipe()
            if self.strict:
                self._closed = True
                raise BindError(message)
            self._warn_once("bind", message)
            return self
        self._warn_if_moved()
        self._write_connection_file()
        self._atexit = _make_atexit(self)
        atexit.register(self._atexit)
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread, drop what is queued (linger 0) and remove the connection file.

        Returns within about ``timeout`` seconds whatever the network does. In a forked child it
        only marks the publisher closed: the parent's sockets and connection file are not its own.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        self._stop = True
        thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout)
            if thread.is_alive():
                log.warning("telemetry publisher thread did not stop within %.1f s; abandoning it", timeout)
            else:
                self._close_pipe()
        self._remove_connection_file()
        self._network = False
        left = _take_all(self._queue)
        self._dropped += len(left)
        for item in left:  # lost to the stream, not to the recorder
            self._encode_for_sink(item)

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # Training-thread API
    # ------------------------------------------------------------------------------------------

    def publish_snapshot(self, snapshot: Snapshot) -> bytes:
        """Encode ``snapshot`` with the next sequence number and queue it; return the frame bytes.

        Never blocks: a full queue drops its oldest frame and counts it. In a forked child this
        returns ``b""`` and touches nothing. The snapshot may change after the call.
        """
        if os.getpid() != self._pid:
            return b""
        self._raise_thread_error()
        self._seq += 1  # the training thread is the only writer
        seq = self._seq
        frame = self._encode(seq, snapshot)
        self._status = (snapshot.step, snapshot.level.level, snapshot.counters)
        if not self._network or self._closed:
            self._unsent += 1
            return frame
        self._enqueue((seq, frame, None))
        return frame

    def hand_off_snapshot(self, snapshot: Snapshot, on_frame: Callable[[bytes], None] | None = None) -> int:
        """Queue ``snapshot`` to be encoded and sent by the publisher thread; return its sequence number.

        The encode leaves the calling thread, so ``snapshot`` (and everything it holds) must not
        change after this call. ``on_frame`` (a recorder's ``put``, say) gets the encoded frame, on
        the publisher thread, in sequence order; it must not block. Whatever the stream does (off,
        closed, the queue full and its oldest dropped) ``on_frame`` still gets every frame: then it
        is encoded on the calling thread. Never blocks; in a forked child it returns 0 and touches
        nothing.
        """
        if os.getpid() != self._pid:
            return 0
        self._raise_thread_error()
        self._seq += 1
        seq = self._seq
        self._status = (snapshot.step, snapshot.level.level, snapshot.counters)
        if not self._network or self._closed:
            self._unsent += 1
            if on_frame is not None:
                on_frame(self._encode(seq, snapshot))
            return seq
        self._enqueue((seq, snapshot, on_frame))
        return seq

    def _enqueue(self, item: _Queued) -> None:
        # No lock: deque appends and pops are atomic, and a lock held by the publisher thread (at
        # its lower priority, possibly preempted) could keep the training thread waiting.
        queue = self._queue
        dropped = None
        if len(queue) >= self._queue_size:
            with contextlib.suppress(IndexError):  # the publisher thread emptied it meanwhile
                dropped = queue.popleft()
        queue.append(item)
        # No wake-up: the thread looks every wake_interval (see the module docstring).
        if dropped is not None:
            self._dropped += 1
            self._encode_for_sink(dropped)

    def _encode(self, seq: int, snapshot: Snapshot) -> bytes:
        return protocol.encode_envelope(
            "snapshot",
            snapshot,
            session=self.session,
            seq=seq,
            step=snapshot.step,
            wall_time=snapshot.wall_time,
        )

    def _encode_for_sink(self, item: _Queued) -> None:
        """A queued snapshot the stream lost still goes to its ``on_frame`` (encoded on this thread)."""
        seq, payload, on_frame = item
        if on_frame is not None:
            on_frame(payload if isinstance(payload, bytes) else self._encode(seq, payload))

    def set_status(
        self, step: int, level: str | int | TelemetryLevel, counters: Counters | None = None
    ) -> None:
        """What heartbeats report between snapshots: the current step, level and hub counters.

        ``counters=None`` keeps the hub counters last given (or those of the last snapshot).
        """
        name = level.name if isinstance(level, TelemetryLevel) else str(level)
        self._status = (int(step), name, counters if counters is not None else self._status[2])

    def poll_commands(self) -> list[tuple[bytes, Command]]:
        """Commands that passed every check since the last call, oldest first. Non-blocking."""
        if os.getpid() != self._pid:
            return []
        self._raise_thread_error()
        out = []
        inbox = self._inbox
        while inbox:
            out.append(inbox.popleft())
        return out

    def reply(self, peer: bytes, message: Ack | Nack) -> None:
        """Queue a signed Ack / Nack for ``peer`` (sent by the publisher thread)."""
        if not isinstance(message, (Ack, Nack)):
            raise TypeError(f"reply message must be an Ack or a Nack, got {type(message).__name__}")
        if os.getpid() != self._pid or not self._network:
            return
        self._replies.append((bytes(peer), message))
        self._wake()

    # ------------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------------

    @property
    def counters(self) -> PublisherCounters:
        return PublisherCounters(
            published=self._published,
            dropped=self._dropped,
            unsent=self._unsent,
            heartbeats=self._heartbeats,
            commands_accepted=self._gate.accepted,
            rejected=dict(self._gate.rejected),
            history_served=(port := self._port).history_served,
            history_frames=port.history_frames,
            replies_sent=port.replies_sent,
            replies_dropped=port.replies_dropped,
            handshake_failures=self._handshake_failures,
            connections_refused=dict(zap.refused) if (zap := self._zap) is not None else {},
            peers=zap.peers if zap is not None else 0,
            read_pauses=self._read_pauses,
            errors=self._errors,
            network=self._network,
        )

    def fill_counters(self, out: Counters) -> Counters:
        """Write this publisher's fields of the wire :class:`Counters` into ``out``; return it.

        What :meth:`PublisherCounters.to_schema` does, without copying every counter first: the hub
        calls it once per update on the training thread.
        """
        gate = self._gate
        out.snapshots_published = self._published
        out.snapshots_dropped = self._dropped
        out.commands_accepted = gate.accepted
        out.commands_rejected = sum(gate.rejected.values())
        return out

    @property
    def network(self) -> bool:
        """True while the sockets are bound and the publisher thread serves them."""
        return self._network

    @property
    def endpoints(self) -> Endpoints | None:
        """The actual PUB and ROUTER endpoints (ephemeral ports resolved); None while off."""
        return self._endpoints

    @property
    def connection_info(self) -> protocol.ConnectionInfo | None:
        """What a dashboard needs (endpoints, session, key, CURVE keys); None while off."""
        return self._connection_info

    @property
    def connection_path(self) -> Path | None:
        return self._connection_path

    @property
    def queued(self) -> int:
        """Snapshots waiting in the publish queue (never more than ``queue_size``)."""
        return len(self._queue)

    @property
    def seq(self) -> int:
        """Sequence number of the last snapshot encoded."""
        return self._seq

    # ------------------------------------------------------------------------------------------
    # Helpers shared by both threads
    # ------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\x00")

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _warn_if_moved(self) -> None:
        plan, endpoints = self._plan, self._endpoints
        assert plan.pub_addr is not None and endpoints is not None
        asked = zmq_endpoint(*plan.pub_addr)
        if plan.pub_addr[1] and endpoints.pub != asked:
            self._warn_once(
                "moved",
                f"telemetry: {asked} is in use (another trainer?); streaming on {endpoints.pub} "
                f"(commands {endpoints.cmd}) instead",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _raise_thread_error(self) -> None:
        if self.strict and self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise TransportError(f"telemetry publisher thread failed: {error!r}") from error

    def _call_in_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the publisher thread at its next wake-up (the sockets' owner)."""
        self._controls.append(fn)
        self._wake()

    def _write_connection_file(self) -> None:
        assert self._endpoints is not None
        info = self._plan.connection_info(
            self._endpoints,
            session=self.session,
            key_hex=self._key_hex,
            run_name=self.run_name,
            pid=self._pid,
            created=time.time(),
        )
        self._connection_info = info
        opt = self._connection_file_opt
        if opt is False:
            return
        try:
            path = None if opt is True else Path(opt)
            self._connection_path = protocol.write_connection_file(info, path)
        except OSError as exc:  # an unwritable runtime dir must not stop training
            if self.strict:
                raise
            self._warn_once("connfile", f"telemetry: could not write the connection file: {exc}")

    def _remove_connection_file(self) -> None:
        path = self._connection_path
        if path is None:
            return
        self._connection_path = None
        try:
            raw = json.loads(path.read_text())
            if raw.get("session") == self.session and raw.get("pid") == self._pid:
                path.unlink()
        except (OSError, ValueError):
            pass


def _make_atexit(pub: Publisher) -> Callable[[], None]:
    ref = weakref.ref(pub)
    return lambda: _close_at_exit(ref)


