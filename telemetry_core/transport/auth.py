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

import contextlib

import zmq
from zmq.utils import z85

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "ZapHandler"]

ZAP_DOMAIN = b"simic"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class ZapHandler:
    """Grant or refuse each handshake; refuse new ones while ``max_peers`` connections are open.

    libzmq's monitor names a connection's file descriptor when it is accepted and when it goes, but
    not when its handshake succeeds, so the count is of open TCP connections on both ports. A
    connection that never completes its handshake is dropped by libzmq after ``HANDSHAKE_IVL``.
    """

    def __init__(self, ctx: zmq.Context, *, curve: bool, allowed: frozenset[bytes], max_peers: int) -> None:
        self.curve = curve
        self.allowed = allowed
        self.max_peers = max_peers
        self.granted = 0
        self.refused: dict[str, int] = {}
        self.connected: set[int] = set()  # file descriptors of open connections (both ports)
        self.socket: zmq.Socket | None = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    @property
    def peers(self) -> int:
        return len(self.connected)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def serve(self, budget: int = 64) -> None:
        """Answer up to ``budget`` queued requests (never blocks)."""
        sock = self.socket
        if sock is None:
            return
        for _ in range(budget):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
                continue  # not a ZAP request: libzmq never sends one, nothing to answer
            routing, request_id, domain, mechanism = frames[0], frames[3], frames[4], frames[7]
            status, text = self._judge(domain, mechanism, frames[8:])
            if status == b"200":
                self.granted += 1
            else:
                self.refused[text] = self.refused.get(text, 0) + 1
            reply = [routing, b"", b"1.0", request_id, status, text.encode(), b"", b""]
            with contextlib.suppress(zmq.ZMQError):  # the handshake gave up meanwhile
                sock.send_multipart(reply, zmq.NOBLOCK)

    def _judge(self, domain: bytes, mechanism: bytes, credentials: list[bytes]) -> tuple[bytes, str]:
        if domain != ZAP_DOMAIN:
            return b"400", "wrong domain"
        if self.curve:
            if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
                return b"400", "not CURVE"
            if z85.encode(credentials[0]) not in self.allowed:
                return b"400", "unknown key"
        elif mechanism != b"NULL":
            return b"400", "unexpected mechanism"
        if self.peers > self.max_peers:  # the asking connection is one of them
            return b"400", "too many connections"
        return b"200", "OK"

    def on_event(self, event: int, fd: int) -> None:
        """Monitor events of either socket keep the count of connected peers."""
        if event == zmq.EVENT_ACCEPTED:
            self.connected.add(fd)
        elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            self.connected.discard(fd)
