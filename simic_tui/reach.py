"""Why a trainer cannot be reached, in one line the header can show (attaching to nothing).

ZeroMQ retries a connection silently; the operator needs the address and the likely reason: a host
name that does not resolve, nothing listening on the port, or (on this machine) no trainer's
connection file for that port either, which says no trainer was started there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from simic_tui.target import AttachTarget
from telemetry_core.protocol import connection_dir

__all__ = ["address_of", "explain_unreachable"]


def address_of(target: AttachTarget) -> str:
    """``host:port`` as the operator typed it (IPv6 in brackets)."""
    return f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}"


async def _resolves(host: str, port: int) -> str:
    """'' when ``host`` resolves (or is an IP address), else the resolver's reason."""
    try:
        ipaddress.ip_address(host)
        return ""
    except ValueError:
        pass
    try:
        await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except OSError as exc:  # pragma: no cover - a resolver failure of another kind
        return exc.strerror or str(exc)
    return ""


async def explain_unreachable(target: AttachTarget, *, refused: bool) -> str:
    """One line: the address and why nothing answers there. ``refused``: ZeroMQ's connect was
    turned down (it reports a refused and an unresolvable address alike, as a retry)."""
    where = address_of(target)
    why = await _resolves(target.host, target.port)
    if why:
        return f"cannot resolve the host name {target.host!r} ({why})"
    parts = [f"nothing is listening on {where}" if refused else f"no answer yet from {where}"]
    if target.loopback and target.connection_file is None:
        try:
            directory = str(connection_dir())
        except Exception:  # a runtime directory that cannot be used: the address alone says enough
            directory = ""
        if directory:
            parts.append(f"no connection file for that port in {directory}")
    return "; ".join(parts)
