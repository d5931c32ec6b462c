"""Where the stream binds, with what security, and the sockets the publisher thread owns.

:class:`BindPlan` turns the ``bind`` / ``cmd_bind`` / ``curve`` arguments into addresses and
CURVE keys (and refuses what would fail open) on the calling thread, before any thread starts;
:func:`make_sockets` creates and binds the PUB and ROUTER sockets on the publisher thread, which
owns them (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import logging

import zmq

from telemetry_core import protocol
from telemetry_core.transport.auth import HANDSHAKE_FAILED, ZAP_DOMAIN
from telemetry_core.transport.net import (
    DEFAULT_BIND,
    DEFAULT_PORT_SEARCH,
    Endpoints,
    InsecureBindError,
    is_loopback,
    parse_tcp,
    zmq_endpoint,
)

__all__ = ["FAILED_EVENTS", "MONITOR_EVENTS", "BindPlan", "describe_bind_error", "make_sockets"]

log = logging.getLogger("telemetry_core.transport")

# Inbound messages on the PUB socket are (un)subscriptions of a few bytes and, with CURVE, the
# handshake's commands (HELLO 200 bytes, INITIATE under 512); libzmq applies MAXMSGSIZE to both.
MAX_INBOUND_PUB = 1024
# What the peer count needs (see ZapHandler): every handshake's end and every connection's close.
# Not ACCEPTED: a flood of connections that never pass the handshake costs one event fewer each.
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED
FAILED_EVENTS = HANDSHAKE_FAILED


class BindPlan:
    """The PUB and ROUTER addresses and the CURVE keys, checked before anything binds.

    ``bind=None`` plans no network. Otherwise the ROUTER binds the PUB port + 1 unless ``cmd_bind``
    is given (port 0: ephemeral ports for both). ``curve=None`` uses CURVE whenever libzmq has it,
    loopback included; ``curve=False`` is allowed on loopback only and ``curve=True`` insists.

    ``port_search`` further port pairs are tried when the ports asked for are in use (two trainers
    started with the defaults must not collide); ``None`` searches for the default bind only, as
    a port the caller named is one a dashboard is told to attach to.
    """

    def __init__(
        self,
        bind: str | None,
        cmd_bind: str | None,
        curve: bool | None,
        curve_allow: list[bytes | str] | None,
        port_search: int | None = None,
    ) -> None:
        self.pub_addr: tuple[str, int] | None = None
        self.cmd_addr: tuple[str, int] | None = None
        self.curve = False
        if port_search is None:
            port_search = DEFAULT_PORT_SEARCH if bind == DEFAULT_BIND and cmd_bind is None else 0
        if isinstance(port_search, bool) or not isinstance(port_search, int) or port_search < 0:
            raise ValueError(f"port_search must be an integer >= 0, got {port_search!r}")
        self.port_search = port_search
        if bind is not None:
            host, port = parse_tcp(bind, "bind")
            if cmd_bind is not None:
                cmd_host, cmd_port = parse_tcp(cmd_bind, "cmd_bind")
            else:
                if port == 65535:
                    raise ValueError("bind port 65535 leaves no room for the command port; pass cmd_bind")
                cmd_host, cmd_port = host, (port + 1 if port else 0)
            self.pub_addr, self.cmd_addr = (host, port), (cmd_host, cmd_port)
            local = is_loopback(host) and is_loopback(cmd_host)
            if curve is False and not local:
                raise InsecureBindError(
                    f"refusing to bind {bind} without CURVE: a non-loopback bind must be encrypted and "
                    "authenticated (leave curve=None or set curve=True)"
                )
            if curve is None and local and not zmq.has("curve"):
                log.warning(
                    "telemetry: this libzmq has no CURVE; the loopback stream is not encrypted and any "
                    "local user can read it (commands still need the connection file's key)"
                )
                curve = False
            self.curve = curve is not False
            if self.curve and not zmq.has("curve"):
                raise InsecureBindError(
                    f"refusing to bind {bind}: this libzmq was built without CURVE, so the stream "
                    "cannot be encrypted; bind 127.0.0.1 and use an SSH tunnel instead"
                )
        self.server: tuple[bytes, bytes] | None = None  # (public, secret), z85
        self.client: tuple[bytes, bytes] | None = None
        self.allowed: set[bytes] = set()
        if self.curve:
            self.server = zmq.curve_keypair()
            self.client = zmq.curve_keypair()
            self.allowed = {self.client[0]}
            for key in curve_allow or []:
                raw = key.encode() if isinstance(key, str) else bytes(key)
                if len(raw) != 40:
                    raise ValueError(f"curve_allow keys must be 40-character z85 public keys, got {key!r}")
                self.allowed.add(raw)
        elif curve_allow:
            raise ValueError("curve_allow needs CURVE (leave curve=None or set curve=True)")

    def attempts(self) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        """The (PUB, ROUTER) addresses to try in order: those asked for, then ``port_search`` more.

        Ephemeral ports (0) never collide, so they are tried once. With the command port next to
        the stream port, pairs move by two (5555/5556, 5557/5558, ...).
        """
        assert self.pub_addr is not None and self.cmd_addr is not None
        (host, port), (cmd_host, cmd_port) = self.pub_addr, self.cmd_addr
        out = [(self.pub_addr, self.cmd_addr)]
        if port == 0 or cmd_port == 0:
            return out
        step = 2 if cmd_port == port + 1 else 1
        for k in range(1, self.port_search + 1):
            pub, cmd = port + k * step, cmd_port + k * step
            if max(pub, cmd) > 65535:
                break
            out.append(((host, pub), (cmd_host, cmd)))
        return out

    def connection_info(
        self, endpoints: Endpoints, *, session: str, key_hex: str, run_name: str, pid: int, created: float
    ) -> protocol.ConnectionInfo:
        """What a dashboard needs to attach: endpoints, session, command key and CURVE keys."""
        info = protocol.ConnectionInfo(
            pub=endpoints.pub,
            cmd=endpoints.cmd,
            session=session,
            key=key_hex,
            run_name=run_name,
            pid=pid,
            created=created,
        )
        if self.curve:
            assert self.server is not None and self.client is not None
            info.curve_server_public = self.server[0].decode()
            info.curve_client_public = self.client[0].decode()
            info.curve_client_secret = self.client[1].decode()
        return info


def describe_bind_error(plan: BindPlan, exc: zmq.ZMQError) -> str:
    assert plan.pub_addr is not None and plan.cmd_addr is not None
    pub = zmq_endpoint(*plan.pub_addr)
    cmd = zmq_endpoint(*plan.cmd_addr)
    what = "already in use" if exc.errno == zmq.EADDRINUSE else exc.strerror
    if exc.errno == zmq.EADDRINUSE and plan.port_search:
        what += f" (and so were the next {len(plan.attempts()) - 1} port pairs)"
    return (
        f"telemetry: cannot bind the stream on {pub} (commands {cmd}): {what}. Training continues "
        "without the live stream (recording, if on, is unaffected); pick another port with "
        "bind=..., or bind=None to turn the stream off."
    )


def make_sockets(
    ctx: zmq.Context, plan: BindPlan, sockets: list[zmq.Socket], *, pub_hwm: int
) -> tuple[zmq.Socket, zmq.Socket, Endpoints]:
    """Create, configure and bind PUB and ROUTER; both are appended to ``sockets`` (to be closed).

    While the ports are in use, the next pair of :meth:`BindPlan.attempts` is tried; the first
    error is raised when none is free (it names the ports asked for).
    """
    first: zmq.ZMQError | None = None
    for pub_addr, cmd_addr in plan.attempts():
        pub, router = _configured(ctx, plan, pub_hwm)
        try:
            for sock, (host, port) in ((pub, pub_addr), (router, cmd_addr)):
                if ":" in host.strip("[]"):
                    sock.setsockopt(zmq.IPV6, 1)
                sock.bind(zmq_endpoint(host, port))
        except zmq.ZMQError as exc:
            pub.close(linger=0)
            router.close(linger=0)
            if exc.errno != zmq.EADDRINUSE:
                raise
            first = first or exc
            continue
        sockets += [pub, router]
        endpoints = Endpoints(
            pub.getsockopt_string(zmq.LAST_ENDPOINT), router.getsockopt_string(zmq.LAST_ENDPOINT)
        )
        return pub, router, endpoints
    assert first is not None
    raise first


def _configured(ctx: zmq.Context, plan: BindPlan, pub_hwm: int) -> tuple[zmq.Socket, zmq.Socket]:
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
        # Drop peers whose host went away (TCP keepalive: ~16 s), so no queue waits on a dead
        # dashboard. Not ZMTP heartbeats: libzmq 4.3.5 fires their timer on a connection whose
        # input was stopped (receive queue full while reading is paused) and that then failed,
        # and aborts the process (!_io_error, stream_engine_base.cpp:310) - a key holder that
        # floods the command port and disconnects killed a trainer that way.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        if plan.curve:
            assert plan.server is not None
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, plan.server[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, plan.server[1])
        # Every handshake asks the ZAP handler (peer cap; CURVE keys); without it, refuse.
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    pub.setsockopt(zmq.SNDHWM, pub_hwm)
    pub.setsockopt(zmq.RCVHWM, 16)
    # What a subscriber sends is (un)subscriptions: a few bytes each. A longer message gets the
    # peer disconnected by libzmq before it is buffered (a 10 MB topic used to be kept).
    pub.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_PUB)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 1000)
    # A dashboard sends a command now and then; a flooding peer's backlog (read, refused and
    # answered within the CPU budget, even after it left) stays short. Full: TCP pushes back.
    router.setsockopt(zmq.RCVHWM, 16)
    # And a small kernel buffer per connection: what a flooding peer left in it must be read (within
    # the budget) before libzmq sees the peer has gone, so the default ~128 KB+ of tiny refused
    # commands kept a departed flooder counted as a peer for tens of seconds on a loaded machine.
    router.setsockopt(zmq.RCVBUF, 32 * 1024)
    # Commands are tiny: a larger frame gets the peer disconnected by libzmq before we see it.
    router.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_COMMAND_BYTES)
    return pub, router
