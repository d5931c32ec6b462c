"""Addresses, endpoints and the errors of stream setup."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

__all__ = [
    "DEFAULT_BIND",
    "DEFAULT_PORT_SEARCH",
    "BindError",
    "Endpoints",
    "InsecureBindError",
    "TransportError",
    "is_loopback",
    "parse_tcp",
    "zmq_endpoint",
]


# The stream's default address; the command port is the next one.
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# Port pairs tried after the default one when it is in use (another trainer started with defaults).
DEFAULT_PORT_SEARCH = 20


class TransportError(RuntimeError):
    """The stream could not be set up as asked."""


class BindError(TransportError, OSError):
    """Binding failed (port in use, bad address); raised only under ``strict=True``."""


class InsecureBindError(TransportError):
    """A non-loopback bind without CURVE: refused, always (it would fail open)."""


class Endpoints(NamedTuple):
    pub: str
    cmd: str


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; False for wildcards, interfaces and names."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_tcp(endpoint: str, what: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); port 0 or ``*`` means an ephemeral port (returned 0)."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        raise ValueError(f"{what} must look like 'tcp://127.0.0.1:5555', got {endpoint!r}")
    host, sep, port_text = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} must name a host and a port, got {endpoint!r}")
    if port_text == "*":
        return host, 0
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{what} has a port that is not a number: {endpoint!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} has a port outside 0-65535: {endpoint!r}")
    return host, port


def zmq_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port if port else '*'}"
