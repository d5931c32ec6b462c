"""ZeroMQ socket helpers of the dashboard's network worker (:mod:`simic_tui.client`).

Receive caps that bound what a trainer can make this process buffer, the blocking shadow of an
asyncio socket for NOBLOCK calls, and the key material that identifies a trainer's connection file.
"""

from __future__ import annotations

import zmq
import zmq.asyncio

from simic_tui.target import AttachTarget
from telemetry_core.protocol import MAX_FRAME_BYTES

__all__ = ["RECEIVE_BUDGET_BYTES"]

_SHADOWS: dict[int, zmq.Socket] = {}

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

