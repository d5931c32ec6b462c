"""The publisher thread: the sockets' owner, its loop, and what it sends on its own.

:class:`PublisherThread` is the half of :class:`~.publisher.Publisher` that runs on the
publisher thread: it creates the context, the ZAP handler and the sockets, then loops: heartbeats,
the snapshots the training thread queued (encoded here), replies, monitor events, the ZAP requests
and the command port, reading only while the read rate and the CPU budget allow. The training-
thread half (the queue, the API, the lifecycle) lives in :mod:`.publisher`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

import zmq

from telemetry_core import protocol
from telemetry_core.schema import Heartbeat
from telemetry_core.transport.auth import ZapHandler
from telemetry_core.transport.sockets import FAILED_EVENTS, MONITOR_EVENTS, describe_bind_error, make_sockets

__all__ = ["CLOSE_LINGER_MS", "PublisherThread"]

log = logging.getLogger("telemetry_core.transport")
# How long the publisher thread lets libzmq write the frames queued at close (the closing frame).
CLOSE_LINGER_MS = 200


class PublisherThread:
    """The publisher thread's work; :class:`~.publisher.Publisher` sets up the state it reads
    (settings, buckets, the command port, the queues) and provides ``_encode``, ``counters`` and
    ``_warn_once``."""

    def _lower_priority(self) -> None:
        """Run this thread (and the libzmq threads it starts) ``thread_nice`` steps below its creator.

        Linux only (where a thread's nice value is its own); unprivileged, and never fatal.
        """
        if self._thread_nice == 0 or not sys.platform.startswith("linux"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self._thread_nice)
            )
        except OSError as exc:  # a sandbox that forbids it: the CPU budget still bounds the thread
            log.debug("telemetry publisher: could not lower the thread priority: %r", exc)


    def _run(self) -> None:
        ctx: zmq.Context | None = None
        sockets: list[zmq.Socket] = []
        monitors: list[zmq.Socket] = []
        try:
            try:
                # Before the context: libzmq's I/O and reaper threads start from this thread and
                # inherit its lower priority, so handshakes and TLS-like CURVE work yield to training.
                self._lower_priority()
                ctx = zmq.Context()
                # The ZAP handler is bound before the sockets, so no connection is ever judged
                # without it; it lives on this thread and is served from the loop below.
                self._zap = ZapHandler(
                    ctx,
                    curve=self._curve,
                    allowed=frozenset(self._plan.allowed),
                    max_peers=self._max_peers,
                    handshake_rate=self._handshake_rate,
                    handshake_burst=self._handshake_burst,
                )
                pub, router, self._endpoints = make_sockets(ctx, self._plan, sockets, pub_hwm=self._pub_hwm)
                for sock in sockets:
                    monitors.append(sock.get_monitor_socket(MONITOR_EVENTS))
                self._network = True
            except zmq.ZMQError as exc:
                self._bind_error = describe_bind_error(self._plan, exc)
                return
            except Exception as exc:
                self._bind_error = f"telemetry: could not start the stream: {exc!r}"
                return
            finally:
                self._ready.set()
            self._loop(pub, router, monitors)
        except BaseException as exc:  # never let the thread die silently
            self._errors += 1
            self._thread_error = exc
            log.exception("telemetry publisher thread stopped: %r", exc)
        finally:
            self._network = False
            # Monitors stop while their reading ends are still open and emptied: libzmq's I/O
            # thread writes monitor events with a blocking send while holding the socket's monitor
            # lock, so an event sent to a closed (or full) monitor pipe would block it for good,
            # and disable_monitor/close would then wait on that lock forever.
            for mon in monitors:
                _drain(mon)
            for sock in sockets:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
            for mon in monitors:
                with contextlib.suppress(zmq.ZMQError):
                    mon.close(linger=0)
            for sock in sockets:
                with contextlib.suppress(zmq.ZMQError):
                    sock.close()  # each socket's LINGER: 0, or the short closing linger set above
            if self._zap is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._zap.close()
            if ctx is not None:
                with contextlib.suppress(zmq.ZMQError):
                    ctx.term()

    def _loop(self, pub: zmq.Socket, router: zmq.Socket, monitors: list[zmq.Socket]) -> None:
        next_hb = time.monotonic()
        was_reading = True
        zap = self._zap.socket if self._zap is not None else None
        budget = self._cpu_bucket
        # Built once: one poller while reading, one with only the wake-up pipe and the PUB socket
        # while the budget is spent (rebuilding them each time round cost more than the poll
        # itself). Paused, the thread still reads the monitors and answers the ZAP requests, but
        # once per wake-up (every ``wake_interval`` at most) and in batches, not per event: a
        # flood of connections then costs a read per event instead of a turn of the loop, and no
        # handshake waits long for its answer (one waiting holds its connection's buffers in
        # libzmq: a flood of identities waiting out a pause held tens of MB). The PUB socket is
        # in both: it never has a message for us, but polling it makes libzmq take in the
        # subscriptions waiting in its pipe as they come, so that a subscriber cannot fill it
        # (RCVHWM) between two sends and have its input stopped.
        paused = zmq.Poller()
        for sock in (self._wake_r, pub):
            paused.register(sock, zmq.POLLIN)
        peer_sockets = (*monitors, *((zap,) if zap is not None else ()))
        peers_ready = zmq.Poller()  # looked at without waiting, once per turn while paused
        for sock in peer_sockets:
            peers_ready.register(sock, zmq.POLLIN)
        reading_poller = zmq.Poller()
        for sock in (self._wake_r, pub, *peer_sockets, router):
            reading_poller.register(sock, zmq.POLLIN)
        # The CPU budget is charged with everything this thread spends except its own work
        # (snapshots, heartbeats, the training thread's requests): polling and waking included, so a
        # flood that only keeps the loop turning is paid for too. ``mark`` is where the current
        # charge began, ``own`` the thread's own work since then.
        mark, own = time.thread_time(), 0.0
        resume = budget.burst / 2
        while True:  # leaves through the stop check after the poll, which drains the queue first
            now = time.monotonic()
            if now >= next_hb:
                t = time.thread_time()
                self._send_heartbeat(pub)
                own += time.thread_time() - t
                next_hb = now + self._hb_interval
            # Stop reading the ROUTER while the read rate or the CPU budget is spent: libzmq's
            # queue fills and TCP pushes back on the flooding peer instead. Reading resumes once
            # the budget holds half its burst again: resuming at zero, the paused loop's own
            # turns (charged too) kept it just below zero for good.
            wait = max(self._read_bucket.wait_time(now), budget.wait_time(now, 0.0 if was_reading else resume))
            reading = wait == 0.0
            if was_reading and not reading:
                self._read_pauses += 1
            was_reading = reading
            timeout = min(max(0.0, next_hb - now), self._wake_interval)
            if not reading:
                timeout = min(timeout, wait)
            events = dict((reading_poller if reading else paused).poll(timeout * 1000.0))
            if not events or (len(events) == 1 and self._wake_r in events):
                # Woken by the clock or the training thread: this turn so far (the poll's own CPU
                # included, ~0.1 ms) is the thread's cadence, not something a peer made it do.
                own = time.thread_time() - mark
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
            if self._stop:
                # What the training thread queued before close() goes out (NOBLOCK: never waits),
                # so the last update of a run is not counted lost because the poll had not come yet.
                with contextlib.suppress(zmq.ZMQError):
                    self._drain_snapshots(pub, stopping=True)
                    # The last frames (the run's closing frame among them) may still sit in the
                    # socket's queue: a short, bounded linger lets the I/O thread write them, so a
                    # dashboard sees "finished" instead of "trainer lost". A stalled peer costs at
                    # most this long, well inside close()'s timeout.
                    pub.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
                break
            try:
                t = time.thread_time()
                while self._controls:
                    self._controls.popleft()()
                self._drain_snapshots(pub)
                own += time.thread_time() - t
                self._port.drain_replies(router, self._replies)
                if not reading:
                    events.update(peers_ready.poll(0))
                for index, mon in enumerate(monitors):
                    if mon in events:
                        self._read_monitor(index, mon)
                if zap is not None and zap in events and self._zap is not None:
                    self._zap.serve(64 if reading else 16)
                if reading and router in events and self._port.read(router, mark + own):
                    # Counted here: on a busy machine the budget may refill before the next round
                    # looks, though reading did stop because it ran out.
                    self._read_pauses += 1
                    was_reading = False
            except zmq.ContextTerminated:
                raise
            except Exception as exc:  # one bad message must not stop the stream
                self._errors += 1
                if self.strict:
                    self._thread_error = exc
                self._warn_once("loop", f"telemetry publisher: unexpected error (counted): {exc!r}")
                log.debug("publisher error", exc_info=True)
                time.sleep(0.01)  # a persistent error must not turn into a busy loop
            end = time.thread_time()
            # The debt is bounded: after a flood that kept the budget spent (monitor events and
            # handshakes are answered even then), commands are read again within seconds.
            budget.charge(time.monotonic(), end - mark - own, floor=-budget.burst)
            mark, own = end, 0.0

    # -- snapshots, heartbeats, replies --------------------------------------------------------

    def _drain_snapshots(self, pub: zmq.Socket, *, stopping: bool = False) -> None:
        queue = self._queue
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                return
            seq, payload, on_frame = item
            if self._stop and not stopping:
                queue.appendleft(item)  # close() counts it (and still records it)
                return
            if isinstance(payload, bytes):
                frame = payload
            else:
                try:
                    frame = self._encode(seq, payload)
                except Exception as exc:  # a snapshot that cannot be encoded is lost, counted
                    self._errors += 1
                    self._warn_once("encode", f"telemetry publisher: could not encode a snapshot: {exc!r}")
                    continue
            if on_frame is not None:
                try:
                    on_frame(frame)
                except Exception as exc:
                    self._errors += 1
                    self._warn_once("on_frame", f"telemetry publisher: on_frame failed: {exc!r}")
            pub.send_multipart([protocol.TOPIC_SNAPSHOT, frame], flags=zmq.NOBLOCK)
            self._published += 1
            self._last_sent_seq = seq
            self._history.remember(seq, frame)

    def _send_heartbeat(self, pub: zmq.Socket) -> None:
        step, level, hub_counters = self._status
        body = Heartbeat(
            step=step,
            level=level,
            uptime=time.monotonic() - self._start_time,
            counters=self.counters.to_schema(hub_counters),
            run_name=self.run_name,
        )
        # seq = the newest snapshot sent, so a subscriber can tell it missed one.
        frame = protocol.encode_envelope(
            "heartbeat", body, session=self.session, seq=self._last_sent_seq, step=step
        )
        pub.send_multipart([protocol.TOPIC_HEARTBEAT, frame], flags=zmq.NOBLOCK)
        self._heartbeats += 1

    def _read_monitor(self, index: int, mon: zmq.Socket, budget: int = 256) -> None:
        """Read up to ``budget`` events of the monitor of socket ``index`` (never waits).

        Parsed by hand (the event number is the first two bytes of the first frame): under a flood
        of connections these are most of what the thread reads, and the generic parser costs
        several times more per event.
        """
        zap = self._zap
        for _ in range(budget):
            try:
                head = mon.recv(zmq.NOBLOCK)
                endpoint = mon.recv(zmq.NOBLOCK) if mon.getsockopt(zmq.RCVMORE) else b""
            except zmq.Again:
                return
            kind = int.from_bytes(head[:2], sys.byteorder)
            if zap is not None:
                zap.on_event(index, kind)
            if kind & FAILED_EVENTS:
                self._handshake_failures += 1
                self._warn_once(
                    "handshake",
                    f"telemetry: refused a connection at {endpoint!r} (handshake failed: "
                    "no or unknown CURVE key, not a simic dashboard, too many connections or "
                    "handshakes); further refusals are counted",
                )


def _drain(sock: zmq.Socket) -> None:
    """Read whatever is queued on a socket without waiting (bounded: a monitor queue holds at
    most its high-water mark of events)."""
    for _ in range(100_000):
        try:
            sock.recv(zmq.NOBLOCK)
        except zmq.ZMQError:
            return
