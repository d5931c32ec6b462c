"""Authentication at connect: a ZAP handler served by the publisher thread, and the peer cap.

libzmq asks the handler (RFC 27, ``inproc://zeromq.zap.01``) about every connection on both
ports before a single message of that connection is delivered. With CURVE (the default, loopback
included) a peer that does not hold the connection file's server key cannot even produce a valid
HELLO, so it is dropped inside libzmq without reaching Python; a peer with a valid HELLO is asked
for here, and only the client keys in the allow-list pass. Without CURVE (``curve=False`` on
loopback) the NULL mechanism still consults the handler, which then only enforces the peer cap.

``ZAP_ENFORCE_DOMAIN`` is set on both sockets, so if this handler is gone every handshake fails:
authentication cannot fail open.
"""

from __future__ import annotations

import collections
import contextlib
import time

import zmq
from zmq.utils import z85

from telemetry_core.transport.gate import TokenBucket

__all__ = ["HANDSHAKE_FAILED", "ZAP_DOMAIN", "ZAP_ENDPOINT", "ZapHandler"]

ZAP_DOMAIN = b"simic"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ZapHandler:
    """Grant or refuse each handshake: CURVE keys, a cap on authenticated peers, a handshake rate.

    The cap counts **authenticated** connections, so peers that never pass the handshake (no
    connection file) cannot use up the places of real dashboards. libzmq's monitor does not say
    which connection a handshake event belongs to (``HANDSHAKE_SUCCEEDED`` carries no file
    descriptor), but every connection ends its handshake with exactly one success or failure event
    and closes with one ``DISCONNECTED``, in order on its socket's monitor (a failure's close comes
    right after it): so per socket the open authenticated connections are ``succeeded`` minus the
    closes that did not follow a failure. Handshakes granted here whose success event has not come
    back yet count too (for at most ``HANDSHAKE_IVL``), so a burst of grants cannot overshoot the
    cap.

    Beyond ``handshake_rate`` requests a second (a token bucket with ``handshake_burst``) the
    handler refuses at once, without looking at the key. libzmq mostly does not reconnect a peer
    the handler refused (it does when that peer sees the connection close before the refusal),
    and a handshake waiting for its answer holds its connection's buffers in libzmq (some 30 KB):
    answering fast is what keeps a flood of identities from holding memory.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        curve: bool,
        allowed: frozenset[bytes],
        max_peers: int,
        handshake_rate: float = 20.0,
        handshake_burst: int = 40,
        sockets: int = 2,
        grant_timeout: float = 5.0,
    ) -> None:
        self.curve = curve
        self.allowed = allowed
        self.max_peers = max_peers
        self.granted = 0
        self.refused: dict[str, int] = {}
        self.rate = TokenBucket(handshake_rate, handshake_burst)
        # Per socket (its monitor's index): authenticated connections open on it, and failed
        # handshakes whose DISCONNECTED has not been read yet.
        self._open = [0] * sockets
        self._failing = [0] * sockets
        # When each grant whose success event has not arrived yet was made (oldest first).
        self._in_flight: collections.deque[float] = collections.deque()
        self._grant_timeout = grant_timeout
        self.socket: zmq.Socket | None = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    @property
    def peers(self) -> int:
        """Authenticated connections open now, both ports."""
        return sum(self._open)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def serve(self, budget: int = 64) -> int:
        """Answer up to ``budget`` queued requests (never blocks); returns how many were read."""
        sock = self.socket
        if sock is None:
            return 0
        for n in range(budget):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
                continue  # not a ZAP request: libzmq never sends one, nothing to answer
            routing, request_id, domain, mechanism = frames[0], frames[3], frames[4], frames[7]
            now = time.monotonic()
            if not self.rate.take(now):
                status, text = b"400", "handshake rate"
            else:
                status, text = self._judge(domain, mechanism, frames[8:], now)
            if status == b"200":
                self.granted += 1
                self._in_flight.append(now)
            else:
                self.refused[text] = self.refused.get(text, 0) + 1
            reply = [routing, b"", b"1.0", request_id, status, text.encode(), b"", b""]
            with contextlib.suppress(zmq.ZMQError):  # the handshake gave up meanwhile
                sock.send_multipart(reply, zmq.NOBLOCK)
        return budget

    def _judge(
        self, domain: bytes, mechanism: bytes, credentials: list[bytes], now: float
    ) -> tuple[bytes, str]:
        if domain != ZAP_DOMAIN:
            return b"400", "wrong domain"
        if self.curve:
            if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
                return b"400", "not CURVE"
            if z85.encode(credentials[0]) not in self.allowed:
                return b"400", "unknown key"
        elif mechanism != b"NULL":
            return b"400", "unexpected mechanism"
        in_flight = self._in_flight
        while in_flight and in_flight[0] < now - self._grant_timeout:  # that handshake failed late
            in_flight.popleft()
        if self.peers + len(in_flight) >= self.max_peers:
            return b"400", "too many connections"
        return b"200", "OK"

    def on_event(self, index: int, event: int) -> None:
        """A monitor event of socket ``index`` (its order in the monitors): keeps the peer count."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._open[index] += 1
            if self._in_flight:
                self._in_flight.popleft()
        elif event & HANDSHAKE_FAILED:
            self._failing[index] += 1  # its DISCONNECTED comes next, in libzmq's same error path
        elif event == zmq.EVENT_DISCONNECTED:
            if self._failing[index]:
                self._failing[index] -= 1
            else:
                # Never below zero: an event libzmq did not send for some path must not let the
                # count drift into refusing everyone (it drifts towards a looser cap instead).
                self._open[index] = max(0, self._open[index] - 1)
