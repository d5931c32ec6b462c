"""Recording files: round trip, truncated and bit-flipped files, and a recorder thread on a slow or
failing disk (a FIFO nobody reads, /dev/full) that drops and counts but never blocks ``put``."""

from __future__ import annotations

import os
import random
import stat
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_transport import full_snapshot  # noqa: E402

from telemetry_core import protocol  # noqa: E402
from telemetry_core.record import (  # noqa: E402
    FILE_MAGIC,
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    Recorder,
    RecordingError,
    RecordWriter,
    encode_record,
    read_recording,
)
from telemetry_core.schema import SCHEMA_MAJOR  # noqa: E402

SESSION = "feedfacecafebeef"


def _frames(n: int, *, debug_every: int = 4) -> list[bytes]:
    """Real snapshot envelopes of varying size, as the publisher sends them."""
    return [
        protocol.encode_envelope(
            "snapshot",
            full_snapshot(i, debug=i % debug_every == 0, n_params=10 + i % 7),
            session=SESSION,
            seq=i + 1,
            step=i,
        )
        for i in range(n)
    ]


def _write(path: Path, frames: list[bytes]) -> tuple[int, list[int]]:
    """Write a recording; return the header size and each record's start offset."""
    with RecordWriter(path, session=SESSION) as writer:
        for frame in frames:
            writer.write(frame)
    data = path.read_bytes()
    header = 8 + 6 + len(SESSION)
    starts, pos = [], header
    for frame in frames:
        starts.append(pos)
        pos += len(encode_record(frame))
    assert pos == len(data)
    return header, starts


def _is_subsequence(sub: list[bytes], full: list[bytes]) -> bool:
    it = iter(full)
    return all(any(x == y for y in it) for x in sub)


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_frame_and_the_header(tmp_path: Path) -> None:
    frames = _frames(25)
    path = tmp_path / "run.simrec"
    _write(path, frames)
    rec = read_recording(path)
    assert rec.frames == frames
    assert (rec.format_version, rec.schema_major, rec.session) == (FORMAT_VERSION, SCHEMA_MAJOR, SESSION)
    assert rec.corrupt_records == 0 and not rec.truncated and rec.problems == ""
    assert [protocol.decode_envelope(f).seq for f in rec.frames] == list(range(1, 26))


def test_empty_recording_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "empty.simrec"
    _write(path, [])
    rec = read_recording(path)
    assert rec.frames == [] and rec.problems == ""


def test_truncated_tail_stops_cleanly_at_every_cut(tmp_path: Path) -> None:
    frames = _frames(6)
    path = tmp_path / "full.simrec"
    header, starts = _write(path, frames)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.simrec"
    # Around every record boundary, through the last record's header, and a seeded sample elsewhere.
    near = {s + d for s in [*starts, len(data)] for d in range(-3, 4)}
    cuts = sorted(
        {c for c in near if header <= c <= len(data)}
        | set(range(starts[-1], starts[-1] + 16))
        | set(random.Random(0).sample(range(header, len(data)), 300))
    )
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        rec = read_recording(cut_path)
        complete = sum(1 for s, f in zip(starts, frames) if s + len(encode_record(f)) <= cut)
        assert rec.frames == frames[:complete], cut
        assert rec.truncated is (cut not in [*starts, len(data)]), cut
        assert rec.corrupt_records == 0
        if rec.truncated:
            assert "truncated" in rec.problems


@pytest.mark.parametrize("cut", [0, 3, 8, 12, 8 + 6 + len(SESSION) - 1])
def test_truncated_or_foreign_header_is_a_clear_error(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "run.simrec"
    _write(path, _frames(2))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(RecordingError, match=r"not a simic-tui recording|truncated header"):
        read_recording(path)


def test_wrong_magic_version_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "run.simrec"
    _write(path, _frames(2))
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.simrec"
    bad.write_bytes(b"NOTSIMIC" + bytes(data[8:]))
    with pytest.raises(RecordingError, match="bad magic"):
        read_recording(bad)
    data[8:10] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="format"):
        read_recording(bad)
    with pytest.raises(RecordingError, match="cannot read"):
        read_recording(tmp_path / "missing.simrec")
    assert data[:8] == FILE_MAGIC


def test_a_single_bit_flip_anywhere_loses_exactly_one_record(tmp_path: Path) -> None:
    frames = _frames(12)
    path = tmp_path / "run.simrec"
    _, starts = _write(path, frames)
    data = path.read_bytes()
    rng = random.Random(1)
    flipped = tmp_path / "flipped.simrec"
    # Flips in the length, the length CRC, the payload and the payload CRC of random records.
    for _ in range(60):
        index = rng.randrange(len(frames))
        start = starts[index]
        size = len(encode_record(frames[index]))
        where = rng.choice(
            [
                start + rng.randrange(8),
                start + 8 + rng.randrange(4),
                start + 12 + rng.randrange(size - 16),
                start + size - 1,
            ]
        )
        damaged = bytearray(data)
        damaged[where] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(damaged))
        rec = read_recording(flipped)
        assert rec.frames == frames[:index] + frames[index + 1 :], (index, where - start)
        assert rec.corrupt_records == 1 and "corrupt" in rec.problems
        assert not rec.truncated


def test_many_bit_flips_never_yield_a_damaged_frame(tmp_path: Path) -> None:
    frames = _frames(30)
    path = tmp_path / "run.simrec"
    header, _ = _write(path, frames)
    data = path.read_bytes()
    rng = random.Random(2)
    flipped = tmp_path / "flipped.simrec"
    for _ in range(40):
        damaged = bytearray(data)
        flips = rng.randrange(1, 20)
        for _ in range(flips):
            damaged[rng.randrange(header, len(damaged))] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(damaged))
        rec = read_recording(flipped)
        assert _is_subsequence(rec.frames, frames), "a frame that was never written came back"
        assert len(rec.frames) >= len(frames) - flips
        assert rec.corrupt_records >= 1 or rec.truncated


def test_absurd_length_is_corruption_not_an_allocation(tmp_path: Path) -> None:
    frames = _frames(3)
    path = tmp_path / "run.simrec"
    _, starts = _write(path, frames)
    data = bytearray(path.read_bytes())
    # A record claiming more than the cap, with a *valid* length CRC.
    bogus = (MAX_RECORD_BYTES + 1).to_bytes(8, "little")
    bogus += (zlib.crc32(bogus) & 0xFFFFFFFF).to_bytes(4, "little")
    data[starts[1] : starts[1]] = bogus
    path.write_bytes(bytes(data))
    rec = read_recording(path)
    assert rec.frames == frames and rec.corrupt_records == 1


# ------------------------------------------------------------------------------------------------
# Recorder thread
# ------------------------------------------------------------------------------------------------


def test_recorder_writes_everything_on_a_healthy_disk(tmp_path: Path) -> None:
    frames = _frames(200)
    path = tmp_path / "live.simrec"
    recorder = Recorder(path, session=SESSION)
    for frame in frames:
        recorder.put(frame)
    recorder.close(timeout=10)
    assert recorder.error is None and recorder.dropped == 0 and recorder.written == 200
    assert read_recording(path).frames == frames


def _run_with_deadline(fn: object, seconds: float) -> bool:
    """Run ``fn`` in a thread; True if it finished (a blocked put would never finish)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_slow_disk_drops_and_counts_and_put_never_blocks(tmp_path: Path) -> None:
    """A FIFO that nobody reads is a disk that stopped: the writer thread blocks in write()."""
    path = tmp_path / "stalled.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # present, but never reading (yet)
    try:
        frames = _frames(40)
        recorder = Recorder(path, session=SESSION, max_queue=64)
        n = 5000

        def training() -> None:
            for i in range(n):
                recorder.put(frames[i % len(frames)])

        assert _run_with_deadline(training, 30), "put() blocked behind the stalled disk"
        time.sleep(0.2)
        assert recorder.dropped > 0
        assert recorder.written < n and recorder.error is None
        assert len(recorder._queue) <= 64  # bounded memory
        # The disk stays stalled until close() returns: a close that waited on it would never return.
        assert _run_with_deadline(lambda: recorder.close(timeout=0.5), 60), "close() waited on the stalled disk"
        # The disk recovers: what was written is a valid recording of frames in order.
        received = bytearray()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                if not recorder._thread.is_alive():
                    break
                time.sleep(0.01)
                continue
            if not chunk:
                break
            received += chunk
    finally:
        os.close(reader)
    recorder._thread.join(5)
    assert not recorder._thread.is_alive()
    out = tmp_path / "received.simrec"
    out.write_bytes(bytes(received))
    rec = read_recording(out)
    assert rec.problems == ""
    assert len(rec.frames) == recorder.written
    assert recorder.written + recorder.dropped == n
    assert all(frame in frames for frame in rec.frames)


def test_failing_disk_stops_recording_counts_every_drop_and_never_raises(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("needs /dev/full")
    frames = _frames(20)
    recorder = Recorder("/dev/full", session=SESSION, max_queue=128)
    n = 3000

    def training() -> None:
        for i in range(n):
            recorder.put(frames[i % len(frames)])
            if i % 100 == 0:
                time.sleep(0.001)

    assert _run_with_deadline(training, 30)
    assert wait_until(lambda: recorder.error is not None)
    assert "No space left" in recorder.error
    recorder.close()
    assert not recorder._thread.is_alive()
    # Nothing reached the disk, and every frame is accounted for.
    assert recorder.written == 0
    assert recorder.dropped == n
    recorder.put(frames[0])  # after the failure: still no exception, still counted
    assert recorder.dropped == n + 1


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_recorder_in_a_forked_child_writes_nothing(tmp_path: Path) -> None:
    frames = _frames(5)
    path = tmp_path / "parent.simrec"
    recorder = Recorder(path, session=SESSION)
    recorder.put(frames[0])
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for frame in frames:
                recorder.put(frame)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    recorder.put(frames[1])
    recorder.close(timeout=5)
    assert read_recording(path).frames == frames[:2]


def test_the_disk_error_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    if not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("needs /dev/full")
    frames = _frames(5)
    with caplog.at_level("WARNING", logger="telemetry_core.record"):
        recorder = Recorder("/dev/full", session=SESSION, max_queue=16)
        for i in range(500):
            recorder.put(frames[i % len(frames)])
        assert wait_until(lambda: recorder.error is not None)
        for frame in frames * 20:
            recorder.put(frame)
        recorder.close()
    said = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(said) == 1 and recorder.dropped == 600 - recorder.written


def test_a_crafted_length_never_hides_the_records_after_it(tmp_path: Path) -> None:
    """A length field with a valid CRC that points past the end, or over the records that follow
    (its payload CRC then fails): the reader skips that one record and reads on."""
    frames = _frames(8)
    path = tmp_path / "crafted.simrec"
    _, starts = _write(path, frames)
    data = bytearray(path.read_bytes())
    for bogus in (len(data) * 4, starts[6] - starts[2]):  # past the end; over records 3-5
        length = bogus.to_bytes(8, "little")
        crafted = bytearray(data)
        crafted[starts[2] : starts[2] + 12] = length + zlib.crc32(length).to_bytes(4, "little")
        path.write_bytes(bytes(crafted))
        rec = read_recording(path)
        assert rec.frames == frames[:2] + frames[3:], bogus
        assert rec.corrupt_records == 1 and not rec.truncated


def test_a_zero_filled_region_is_skipped_fast_and_the_records_after_it_are_read(tmp_path: Path) -> None:
    frames = _frames(6)
    path = tmp_path / "holes.simrec"
    _, starts = _write(path, frames)
    data = path.read_bytes()
    hole = b"\x00" * (32 * 2**20)  # a filesystem hole after a crash
    path.write_bytes(data[: starts[3]] + hole + data[starts[3] :])
    # CPU time of this thread, not wall time: other processes cannot inflate it. A byte-by-byte
    # resynchronisation spent ~10 s of CPU on this hole (~3.4 MB/s); a block scan spends well under 1 s.
    t0 = time.thread_time()
    rec = read_recording(path)
    cpu = time.thread_time() - t0
    assert rec.frames == frames and rec.corrupt_records == 1
    assert rec.skipped_bytes == len(hole)
    assert cpu < 3.0, f"{len(hole) / max(cpu, 1e-9) / 2**20:.1f} MB/s of CPU"
