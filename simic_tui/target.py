"""Where to attach: ``HOST:PORT`` parsing and the trainer's connection file.

The connection file (written 0600 by the trainer) carries the command endpoint, the session, the
HMAC key and the CURVE keys of the encrypted link. For a local run it is found by port; for a remote
run the operator copies it and passes ``--connection-file``. Without one, a trainer started the
default way refuses the dashboard's handshake (the dashboard says so, and keeps looking for the file);
only a ``curve=False`` trainer can be watched without it, and never commanded.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path

from telemetry_core.protocol import ConnectionInfo, find_connection_file, read_connection_file

__all__ = ["AttachTarget", "TargetError", "endpoint_port", "parse_address", "resolve_target"]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class TargetError(ValueError):
    """An address or connection file the dashboard cannot use; the message is for the operator."""


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); TargetError with an example otherwise."""
    example = "expected HOST:PORT, e.g. 127.0.0.1:5555 or [::1]:5555"
    raw = text.strip()
    if raw.startswith("tcp://"):
        raw = raw[len("tcp://") :]
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise TargetError(f"malformed address {text!r}: {example}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TargetError(f"malformed address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise TargetError(f"malformed address {text!r}: {example}")
        if ":" in host:
            raise TargetError(f"malformed address {text!r}: write IPv6 hosts in brackets, e.g. [::1]:5555")
        if not _HOSTNAME.match(host):
            raise TargetError(f"malformed address {text!r}: {host!r} is not a host name or IP address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TargetError(f"malformed address {text!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def endpoint_port(endpoint: str) -> int | None:
    _, _, port = endpoint.rpartition(":")
    return int(port) if port.isdigit() else None


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass(frozen=True)
class AttachTarget:
    """Everything the client needs to connect, plus where its key material came from."""

    host: str
    port: int
    pub: str  # SUB connects here
    cmd: str | None = None  # DEALER connects here (None: watch only)
    session: str | None = None  # the session the connection file was written for
    key: bytes | None = None  # HMAC key for commands and replies
    curve_server_public: str | None = None
    curve_client_public: str | None = None
    curve_client_secret: str | None = None
    connection_file: Path | None = None
    explicit_file: bool = False  # the operator named the file (re-read it on a trainer restart)
    note: str = ""  # why commands are unavailable, when they are
    require_pid: int | None = None  # only accept a connection file written by this process (demo)
    allow_plaintext: bool = False  # send commands over a non-loopback link without CURVE anyway

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def loopback(self) -> bool:
        return self.host in _LOOPBACK or self.host.startswith("127.")

    @property
    def can_command(self) -> bool:
        return self.cmd is not None and self.key is not None

    @property
    def curve(self) -> bool:
        return bool(self.curve_server_public and self.curve_client_public and self.curve_client_secret)

    def with_info(self, info: ConnectionInfo, path: Path | None) -> AttachTarget:
        """This target with the endpoints and keys of a connection file (host stays the operator's)."""
        cmd_port = endpoint_port(info.cmd)
        return replace(
            self,
            cmd=_endpoint(self.host, cmd_port) if cmd_port else None,
            session=info.session,
            key=info.key_bytes,
            curve_server_public=info.curve_server_public,
            curve_client_public=info.curve_client_public,
            curve_client_secret=info.curve_client_secret,
            connection_file=path,
            note="" if cmd_port else f"connection file {path} names no command endpoint",
        )

    def reload(self) -> AttachTarget:
        """Re-read the connection file (a restarted trainer writes a new session and key)."""
        path = self.connection_file
        if path is None and self.loopback:
            path = find_connection_file(self.host, self.port)
        if path is None:
            return self
        try:
            info = read_connection_file(path)
        except ValueError:
            return self
        pub_port = endpoint_port(info.pub)
        if pub_port is not None and pub_port != self.port:
            return self
        if self.require_pid is not None and info.pid != self.require_pid:
            return self  # a stale file from an earlier trainer on this port
        return self.with_info(info, path)


def resolve_target(address: str, connection_file: str | Path | None = None) -> AttachTarget:
    """Parse the address and load key material; TargetError names what is wrong and what to do."""
    host, port = parse_address(address)
    target = AttachTarget(host=host, port=port, pub=_endpoint(host, port))
    if connection_file is not None:
        path = Path(connection_file).expanduser()
        try:
            info = read_connection_file(path)
        except ValueError as exc:
            raise TargetError(f"{exc}") from None
        except OSError as exc:
            raise TargetError(f"cannot read connection file {path}: {exc.strerror or exc}") from None
        pub_port = endpoint_port(info.pub)
        if pub_port is not None and pub_port != port:
            raise TargetError(
                f"connection file {path} is for a trainer publishing on port {pub_port}, not {port}: "
                f"attach to {host}:{pub_port}, or pass the file of the trainer on port {port}"
            )
        return replace(target.with_info(info, path), explicit_file=True)
    found = find_connection_file(host, port) if target.loopback else None
    if found is None:
        where = "on this machine" if target.loopback else f"for remote host {host}"
        return replace(
            target,
            note=f"no connection file {where} for port {port}: commands disabled, and a trainer started "
            "the default way refuses the link without its keys (pass --connection-file FILE from the "
            "trainer's machine)",
        )
    try:
        info = read_connection_file(found)
    except ValueError as exc:
        raise TargetError(f"{exc}") from None
    return target.with_info(info, found)
