"""The trainer side of the control plane: one thread owns every ZeroMQ socket.

:class:`Publisher` streams snapshots and heartbeats on a PUB socket and takes signed commands on
a ROUTER socket (dashboards connect SUB + DEALER; frames are defined in
:mod:`telemetry_core.protocol`). The parts:

* :mod:`.net` - addresses, endpoints and setup errors;
* :mod:`.auth` - authentication at connect (CURVE + a ZAP handler) and the peer cap;
* :mod:`.sockets` - where to bind, with which CURVE keys, and the PUB / ROUTER sockets;
* :mod:`.gate` - the command gate: rate limits, signature, replay memory, refusal codes;
* :mod:`.commands` - the command port on the publisher thread: read, judge, reply, serve history;
* :mod:`.history` - the last frames sent, kept for late joiners;
* :mod:`.publisher` - the training-thread API, the publish queue and the lifecycle;
* :mod:`.thread` - the publisher thread: sockets, its loop, heartbeats and monitor events;
* :mod:`.counters` - what the publisher sent, dropped and refused.
"""

from __future__ import annotations

from telemetry_core.transport.auth import ZAP_DOMAIN, ZapHandler
from telemetry_core.transport.gate import (
    AUTH_CODES,
    FRAME_CODES,
    REJECT_CODES,
    SILENT_CODES,
    CommandGate,
    TokenBucket,
    Verdict,
)
from telemetry_core.transport.net import (
    DEFAULT_BIND,
    DEFAULT_PORT_SEARCH,
    BindError,
    Endpoints,
    InsecureBindError,
    TransportError,
    is_loopback,
    parse_tcp,
    zmq_endpoint,
)
from telemetry_core.transport.publisher import Publisher, PublisherCounters

__all__ = [
    "AUTH_CODES",
    "DEFAULT_BIND",
    "DEFAULT_PORT_SEARCH",
    "FRAME_CODES",
    "REJECT_CODES",
    "SILENT_CODES",
    "ZAP_DOMAIN",
    "BindError",
    "CommandGate",
    "Endpoints",
    "InsecureBindError",
    "Publisher",
    "PublisherCounters",
    "TokenBucket",
    "TransportError",
    "Verdict",
    "ZapHandler",
    "is_loopback",
    "parse_tcp",
    "zmq_endpoint",
]
