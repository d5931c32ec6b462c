"""Recording files: every published frame, framed so a reader survives truncation and bit flips.

Layout (little-endian)::

    header  = b"SIMICREC" | u16 format_version | u16 schema_major | u16 len(session) | session utf-8
    record* = u64 length | u32 crc32(length bytes) | payload (length bytes) | u32 crc32(payload)

Each payload is one encoded :class:`~telemetry_core.schema.Envelope`, exactly as it went over the
wire. The framing follows TensorBoard's event files: a reader stops cleanly at a truncated tail
and, on a corrupt record, scans forward for the next record whose length CRC checks out.

:class:`Recorder` writes from its own thread through a bounded queue that drops (and counts) when
the disk is slow, so recording never stalls training. Torch-free: replay and export use the
:func:`read_recording` reader from the dashboard side.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from telemetry_core.schema import RUN_FINISHED, SCHEMA_MAJOR, Snapshot

log = logging.getLogger(__name__)

__all__ = [
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "RecordWriter",
    "Recorder",
    "Recording",
    "RecordingError",
    "iter_records",
    "read_recording",
    "read_updates",
]

FILE_MAGIC = b"SIMICREC"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024 * 1024
_HEAD = struct.Struct("<8sHHH")
_LEN = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_ZEROS = bytes(65536)


class RecordingError(ValueError):
    """The file is not a recording at all (bad magic, unknown format version, unreadable header)."""


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + _CRC.pack(_crc(length)) + payload + _CRC.pack(_crc(payload))


class RecordWriter:
    """Synchronous writer (used by :class:`Recorder`'s thread and by tools that build recordings)."""

    def __init__(self, path: str | Path, *, session: str, schema_major: int = SCHEMA_MAJOR) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 - lifetime is the writer's
        encoded = session.encode()
        self._fh.write(_HEAD.pack(FILE_MAGIC, FORMAT_VERSION, schema_major, len(encoded)) + encoded)
        self.records = 0

    def write(self, payload: bytes) -> None:
        self._fh.write(encode_record(payload))
        self.records += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Recording:
    """What a reader got out of a file, and what it had to skip."""

    path: Path
    format_version: int
    schema_major: int
    session: str
    frames: list[bytes] = field(default_factory=list)
    corrupt_records: int = 0  # records skipped because a CRC failed
    skipped_bytes: int = 0  # bytes passed over while resynchronising
    truncated: bool = False  # the file ended inside a record

    @property
    def problems(self) -> str:
        """Plain words for what could not be read ('' when the file is intact)."""
        parts = []
        if self.corrupt_records:
            parts.append(f"{self.corrupt_records} corrupt record(s) skipped")
        if self.truncated:
            parts.append("file truncated: the last record is incomplete")
        return "; ".join(parts)


def _read_header(data: bytes, path: Path) -> tuple[int, int, str, int]:
    if len(data) < _HEAD.size or data[:8] != FILE_MAGIC:
        raise RecordingError(f"{path} is not a simic-tui recording (bad magic)")
    _magic, version, major, slen = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise RecordingError(f"{path} has recording format {version}; this reader knows {FORMAT_VERSION}")
    end = _HEAD.size + slen
    if len(data) < end:
        raise RecordingError(f"{path} has a truncated header")
    return version, major, data[_HEAD.size : end].decode("utf-8", "replace"), end


def _zeros_end(data: bytes, pos: int) -> int:
    """The first offset at or after ``pos`` that is not a zero byte (``len(data)`` if none)."""
    view = memoryview(data)
    n = len(data)
    size = len(_ZEROS)
    while pos + size <= n and view[pos : pos + size] == _ZEROS:
        pos += size
    while pos < n and data[pos] == 0:
        pos += 1
    return pos


def iter_records(data: bytes, start: int, rec: Recording) -> Iterator[bytes]:
    """Yield intact payloads from ``data[start:]``, updating ``rec``'s corruption counters.

    A record is trusted only when both its length CRC and its payload CRC check out. Anything else
    (a flipped bit, or a crafted length whose CRC passes but that points past the end or over
    other records) is skipped by scanning forward from the next byte, so one bad record never
    hides the records after it. Zero-filled regions (a crashed filesystem's holes) are skipped in
    one step: a record header is never all zeros.
    """
    pos = start
    n = len(data)
    resyncing = False
    tail = False  # resyncing from a length that ran past the end: truncated, unless a record follows
    while pos < n:
        if n - pos < _LEN.size:
            if resyncing:
                rec.truncated = rec.truncated or tail  # a corrupt last record is corrupt, not truncated
            else:
                rec.truncated = True
            return
        length, lcrc = _LEN.unpack_from(data, pos)
        ok = lcrc == _crc(data[pos : pos + 8]) and length <= MAX_RECORD_BYTES
        end = pos + _LEN.size + length + _CRC.size
        past_end = ok and end > n
        if ok and not past_end:
            (pcrc,) = _CRC.unpack_from(data, end - _CRC.size)
            ok = pcrc == _crc(data[pos + _LEN.size : end - _CRC.size])
        if not ok or past_end:
            # The writer died mid-record, or a crafted length: keep scanning from the next byte.
            if not resyncing:
                resyncing = True
                tail = past_end
                if not tail:
                    rec.corrupt_records += 1
            step = 1
            if data[pos] == 0:
                # Skip a run of zeros: a header starting inside it must end past it.
                step = max(1, _zeros_end(data, pos) - pos - (_LEN.size - 1))
            pos += step
            rec.skipped_bytes += step
            continue
        if resyncing and tail:
            rec.corrupt_records += 1  # a record follows: that length was corrupt, not a cut tail
        resyncing = tail = False
        yield data[pos + _LEN.size : end - _CRC.size]
        pos = end
    if resyncing and tail:
        rec.truncated = True


def read_recording(path: str | Path) -> Recording:
    """Read every intact frame. Raises :class:`RecordingError` only when the header is unusable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror or exc}") from None
    version, major, session, start = _read_header(data, path)
    rec = Recording(path=path, format_version=version, schema_major=major, session=session)
    rec.frames = list(iter_records(data, start, rec))
    return rec


def read_updates(path: str | Path) -> list[Snapshot]:
    """The recording's snapshots, one per update, in order.

    Frames that are not snapshots (replies, acks) are skipped, and so is the trainer's closing
    frame: it repeats the last update's statistics to say the run finished, so counting it would
    add an update that never ran. A frame that does not decode raises ``FrameError``: the callers
    (calibration and matrix tools) must not judge a run with updates silently missing.
    """
    from telemetry_core.protocol import decode_body, decode_envelope

    out: list[Snapshot] = []
    for frame in read_recording(path).frames:
        env = decode_envelope(frame)
        if env.kind != "snapshot":
            continue
        snap = decode_body(env)
        if snap.run_state != RUN_FINISHED:
            out.append(snap)
    return out

class Recorder:
    """Writes frames from its own thread; :meth:`put` never blocks (drops the oldest and counts)."""

    def __init__(self, path: str | Path, *, session: str, max_queue: int = 4096) -> None:
        self.path = Path(path)
        self._writer = RecordWriter(self.path, session=session)
        self._queue: collections.deque[bytes] = collections.deque()
        self._max_queue = max_queue
        self._cv = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.written = 0
        self.error: str | None = None
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="simic-recorder", daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> None:
        if os.getpid() != self._pid:
            return
        with self._cv:
            if self._closed:
                if self.error is not None:  # recording stopped on a disk error: count what is lost
                    self.dropped += 1
                return
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(frame)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait(0.5)
                if not self._queue and self._closed:
                    break
                batch = list(self._queue)
                self._queue.clear()
            try:
                for frame in batch:
                    self._writer.write(frame)
                self._writer.flush()
                self.written += len(batch)  # counted once flushed: buffered is not written
            except OSError as exc:  # disk full, file removed: stop writing, keep training
                self.error = f"recording to {self.path} stopped: {exc}"
                # Said once, here; every frame lost from now on is counted in records_dropped
                # (every snapshot carries it, and the dashboard adds it to "dropped").
                log.warning(
                    "telemetry: %s; training continues, further frames are counted as dropped", self.error
                )
                with self._cv:
                    # The failed batch counts as dropped (part of it may have reached the disk;
                    # the reader recovers those), and so does everything still queued.
                    self.dropped += len(batch) + len(self._queue)
                    self._queue.clear()
                    self._closed = True
                break
        with contextlib.suppress(OSError):
            self._writer.close()

    def close(self, timeout: float = 1.0) -> None:
        """Flush what is queued (up to ``timeout`` seconds) and close the file."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)
