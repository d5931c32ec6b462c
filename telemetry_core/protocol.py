"""Framing, signing and connection files: the torch-free half of the transport.

Both sides use these functions, so trainer and dashboard agree on the bytes by construction.

Sockets and frames
  * PUB -> SUB, two frames: ``[topic, envelope]`` with topic ``b"snap"`` or ``b"hb"``.
  * DEALER -> ROUTER (commands), two frames after the routing id: ``[mac, envelope]``.
  * ROUTER -> DEALER (replies), two frames: ``[mac, envelope]`` (Ack / Nack / History).
  ``mac`` is the hex HMAC-SHA256 of the envelope bytes under the key from the connection file.
  It is checked with :func:`hmac.compare_digest` on the raw bytes *before* anything is decoded.

Decoding is typed (msgspec) with a size cap; a pickle, a wrong magic, a wrong major version, a
truncated or oversize frame all raise :class:`FrameError` with a stable ``code``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from telemetry_core.schema import (
    BODY_TYPES,
    MAGIC,
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    Command,
    Envelope,
)

__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_LEASE_UPDATES",
    "MAX_PROFILE_UPDATES",
    "TOPIC_HEARTBEAT",
    "TOPIC_SNAPSHOT",
    "ConnectionInfo",
    "FrameError",
    "IncompatibleVersion",
    "client_curve",
    "connection_dir",
    "connection_path",
    "decode_body",
    "decode_envelope",
    "encode_envelope",
    "find_connection_file",
    "new_command",
    "new_session_id",
    "read_connection_file",
    "sign",
    "verify",
    "write_connection_file",
]

TOPIC_SNAPSHOT = b"snap"
TOPIC_HEARTBEAT = b"hb"
MAX_FRAME_BYTES = 8 * 1024 * 1024  # a snapshot or history frame; larger is refused
MAX_COMMAND_BYTES = 4096  # a command envelope; larger is refused before decoding
# Command arguments the trainer's hub applies; the command gate refuses anything beyond them, so a
# command it accepts is never refused later for its range.
MAX_LEASE_UPDATES = 100_000
MAX_PROFILE_UPDATES = 100

_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)
_BODY_DECODERS = {kind: msgspec.msgpack.Decoder(t) for kind, t in BODY_TYPES.items()}


class FrameError(ValueError):
    """A frame that is refused. ``code`` is stable (counted and shown by both sides)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class IncompatibleVersion(FrameError):
    def __init__(self, major: int, minor: int) -> None:
        super().__init__(
            "incompatible",
            f"schema {major}.{minor} is incompatible with this side's {SCHEMA_MAJOR}.{SCHEMA_MINOR}",
        )
        self.major = major
        self.minor = minor


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def encode_envelope(
    kind: str, body: msgspec.Struct, *, session: str, seq: int, step: int, wall_time: float | None = None
) -> bytes:
    """Encode ``body`` inside an :class:`Envelope` of this side's schema version."""
    env = Envelope(
        magic=MAGIC,
        major=SCHEMA_MAJOR,
        minor=SCHEMA_MINOR,
        session=session,
        seq=seq,
        step=step,
        wall_time=time.time() if wall_time is None else wall_time,
        kind=kind,
        body=msgspec.Raw(_ENCODER.encode(body)),
    )
    return _ENCODER.encode(env)


def decode_envelope(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Decode and check an envelope (size, type, magic, major version, kind). Body stays raw."""
    if len(data) > max_bytes:
        raise FrameError("oversize", f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data:
        raise FrameError("empty", "empty frame")
    if data[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO: never unpickled, named for the log
        raise FrameError("malformed", "pickle payload refused (frames are msgpack, never pickle)")
    try:
        env = _ENVELOPE_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise FrameError("malformed", f"not an envelope: {exc}") from None
    except RecursionError:  # msgspec refuses deep nesting (even inside the raw body) this way
        raise FrameError("malformed", "not an envelope: nested too deeply") from None
    if env.magic != MAGIC:
        raise FrameError("bad_magic", f"wrong magic {env.magic[:16]!r}")
    if env.major != SCHEMA_MAJOR:
        raise IncompatibleVersion(env.major, env.minor)
    if env.kind not in _BODY_DECODERS:
        raise FrameError("unknown_kind", f"unknown message kind {env.kind[:32]!r}")
    return env


def decode_body(env: Envelope) -> Any:
    """Decode an envelope's body into the Struct its ``kind`` names."""
    try:
        return _BODY_DECODERS[env.kind].decode(env.body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise FrameError("malformed", f"bad {env.kind} body: {exc}") from None
    except RecursionError:
        raise FrameError("malformed", f"bad {env.kind} body: nested too deeply") from None


def sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


def verify(key: bytes, mac: bytes, payload: bytes) -> bool:
    """Constant-time check of ``mac`` over the raw payload, before any decoding."""
    return hmac.compare_digest(sign(key, payload), mac)


def new_command(action: str, *, session: str, client: str = "", ttl: float = 10.0, **fields: Any) -> Command:
    now = time.time()
    return Command(
        id=uuid.uuid4().hex,
        session=session,
        issued=now,
        expires=now + ttl,
        action=action,
        client=client,
        **fields,
    )


# --------------------------------------------------------------------------------------------
# Connection files
# --------------------------------------------------------------------------------------------


@dataclass
class ConnectionInfo:
    """What a dashboard needs to attach: endpoints, session and key material. Written 0600."""

    pub: str  # e.g. tcp://127.0.0.1:5555
    cmd: str  # e.g. tcp://127.0.0.1:5556
    session: str
    key: str  # hex HMAC key for commands and replies
    run_name: str = ""
    pid: int = 0
    created: float = 0.0
    # CURVE (non-loopback binds): the server's public key and one allowed client key pair.
    curve_server_public: str | None = None
    curve_client_public: str | None = None
    curve_client_secret: str | None = None
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)

    @staticmethod
    def new_key() -> str:
        return secrets.token_hex(32)


def connection_dir() -> Path:
    """The user's runtime directory for connection files (created 0700)."""
    base = os.environ.get("SIMIC_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    if base:
        path = Path(base) / "simic-tui"
    else:
        path = Path(tempfile.gettempdir()) / f"simic-tui-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"the runtime directory {path} exists but is not this user's own directory (owner uid "
            f"{st.st_uid}, you are {os.getuid()}): another user may have created it to read or plant "
            "connection files. Remove it, or set SIMIC_RUNTIME_DIR to a private directory."
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(
            f"the runtime directory {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"simic-tui keeps its keys there. Run chmod 700 {path}, or set SIMIC_RUNTIME_DIR."
        )
    return path


def _endpoint_key(endpoint: str) -> str:
    # tcp://127.0.0.1:5555 -> 127.0.0.1-5555 (localhost and 127.0.0.1 are the same file)
    hostport = endpoint.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        host = "127.0.0.1"
    return f"{host.replace('*', 'all')}-{port}"


def connection_path(endpoint: str) -> Path:
    return connection_dir() / f"{_endpoint_key(endpoint)}.json"


def write_connection_file(info: ConnectionInfo, path: Path | None = None) -> Path:
    """Write atomically with mode 0600 (never readable by other users, even briefly)."""
    path = path or connection_path(info.pub)
    data = json.dumps(info.__dict__, indent=2, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_connection_file(path: str | Path) -> ConnectionInfo:
    """Read a connection file; raise ValueError with a plain reason when it is unusable."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"connection file {path} does not exist") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ValueError(f"connection file {path} is readable by other users; expected mode 0600")
    try:
        raw = json.loads(path.read_text())
        known = {k: raw[k] for k in ConnectionInfo.__dataclass_fields__ if k in raw}
        info = ConnectionInfo(**known)
        bytes.fromhex(info.key)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"connection file {path} is not valid: {exc}") from None
    if len(info.key_bytes) < 16:
        raise ValueError(f"connection file {path} holds a key that is too short")
    return info


def client_curve(sock: Any, info: ConnectionInfo) -> None:
    """Give a dashboard's SUB or DEALER socket the connection file's CURVE keys (before connect).

    A trainer binds with CURVE by default, loopback included: without these keys a socket never
    completes the handshake. A no-op for a file without CURVE keys (a ``curve=False`` trainer).
    """
    if info.curve_server_public and info.curve_client_public and info.curve_client_secret:
        sock.curve_serverkey = info.curve_server_public.encode()
        sock.curve_publickey = info.curve_client_public.encode()
        sock.curve_secretkey = info.curve_client_secret.encode()


def find_connection_file(host: str, port: int, search: Sequence[Path] | None = None) -> Path | None:
    """The connection file a local trainer wrote for ``host:port``, if any."""
    name = f"{_endpoint_key(f'tcp://{host}:{port}')}.json"
    for directory in search or [connection_dir()]:
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate
    return None
