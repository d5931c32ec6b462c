"""Replay of a recording through the same store and widgets as a live stream.

The recording is read with :func:`telemetry_core.record.read_recording` (it stops cleanly at a
truncated tail and skips corrupt records); what could not be read is reported, never hidden.
Frames are decoded once up front; the cursor then moves through them: forward by ingesting, back
by rolling the store's ring back (or rebuilding it when the rows have been overwritten).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from simic_tui.store import TelemetryStore, decode_checked
from telemetry_core.protocol import FrameError, IncompatibleVersion
from telemetry_core.record import Recording, RecordingError, read_recording
from telemetry_core.schema import RUN_FINISHED, SCHEMA_MAJOR, SCHEMA_MINOR, Envelope, Snapshot

__all__ = ["SPEEDS", "LoadedRecording", "ReplayError", "ReplaySource", "load_recording"]

SPEEDS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


class ReplayError(ValueError):
    """The file cannot be replayed at all (not a recording, unreadable, incompatible schema)."""


@dataclass
class LoadedRecording:
    path: Path
    session: str
    frames: list[tuple[Envelope, Snapshot]] = field(default_factory=list)
    heartbeats: int = 0
    bad_frames: dict[str, int] = field(default_factory=dict)
    finished: Snapshot | None = None  # the closing frame, when the recorded run ended cleanly
    problems: str = ""  # damage found by the reader ('' when intact)

    def notice(self) -> str:
        """Plain words about what could not be read, for the banner and the CLI ('' when intact)."""
        parts = []
        if self.problems:
            parts.append(self.problems)
        bad = sum(self.bad_frames.values())
        if bad:
            codes = ", ".join(f"{code} {n}" for code, n in sorted(self.bad_frames.items()))
            parts.append(f"{bad} undecodable frame(s) skipped ({codes})")
        if not parts:
            return ""
        return f"Recording {self.path.name} is damaged: {'; '.join(parts)}. Showing the {len(self.frames)} snapshot(s) that could be read."


def load_recording(path: str | Path) -> LoadedRecording:
    """Read and decode a recording; ReplayError only when nothing usable can come out of it."""
    path = Path(path)
    if not path.exists():
        raise ReplayError(f"recording {path} does not exist")
    try:
        rec: Recording = read_recording(path)
    except RecordingError as exc:
        raise ReplayError(str(exc)) from None
    if rec.schema_major != SCHEMA_MAJOR:
        raise ReplayError(
            f"{path} was recorded with schema {rec.schema_major}.x; this simic-tui reads schema "
            f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}: replay it with a matching simic-tui release"
        )
    loaded = LoadedRecording(path=path, session=rec.session, problems=rec.problems)
    last_seq = -math.inf
    for data in rec.frames:
        try:
            env, body = decode_checked(data, ("snapshot", "heartbeat"))
            if env.kind == "heartbeat":
                loaded.heartbeats += 1
                continue
        except IncompatibleVersion as exc:
            raise ReplayError(
                f"{path} holds frames of schema {exc.major}.{exc.minor}; this simic-tui reads "
                f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
            ) from None
        except FrameError as exc:
            loaded.bad_frames[exc.code] = loaded.bad_frames.get(exc.code, 0) + 1
            continue
        assert isinstance(body, Snapshot)
        if env.seq <= last_seq and env.session == loaded.session:
            loaded.bad_frames["out_of_order"] = loaded.bad_frames.get("out_of_order", 0) + 1
            continue
        last_seq = env.seq
        if body.run_state == RUN_FINISHED:  # the trainer closed: not a position of its own
            loaded.finished = body
            continue
        loaded.finished = None  # a later session appended to the same file
        loaded.frames.append((env, body))
    return loaded


class ReplaySource:
    """A cursor over a loaded recording that feeds a store; played by the app's timer."""

    def __init__(self, loaded: LoadedRecording, store: TelemetryStore, *, speed: float = 10.0) -> None:
        self.loaded = loaded
        self.store = store
        self.position = 0  # snapshots applied to the store (0 .. len(frames))
        self.playing = False
        self.speed = min(SPEEDS, key=lambda s: abs(s - speed))
        self._due = 0.0  # accumulated replay time not yet turned into frames
        for code, n in loaded.bad_frames.items():
            for _ in range(n):
                store.counters.note_bad(code)
        # the log lists the whole recording's incidents; the cursor decides which are active now
        store.incidents.preload(snap for _, snap in loaded.frames)
        self.onsets = [
            i + 1
            for i, (_, snap) in enumerate(loaded.frames)
            if any(e.event == "onset" for e in snap.incident_events)
        ]  # positions whose latest snapshot opens an incident

    @property
    def total(self) -> int:
        return len(self.loaded.frames)

    def seek(self, position: int, *, quiet: bool = True) -> None:
        """Show the first ``position`` snapshots (clamped); going back rolls the store back."""
        position = max(0, min(position, self.total))
        frames = self.loaded.frames
        if position == self.position:
            return
        if position > self.position:
            for env, snap in frames[self.position : position]:
                self.store.ingest(env, snap, quiet=quiet)
        else:
            latest = frames[position - 1] if position > 0 else None
            previous = frames[position - 2][1] if position > 1 else None
            if position == 0 or not self.store.truncate(position, latest, previous):
                self.store.reset(self.loaded.session)
                start = max(0, position - self.store.capacity)
                for env, snap in frames[start:position]:
                    self.store.ingest(env, snap, quiet=True)
            self.store.latest_debug = next(
                ((s.step, s.debug) for _, s in reversed(frames[:position]) if s.debug is not None), None
            )
        # At the end of a run that ended cleanly the header says so, as it did live.
        self.store.finished = self.loaded.finished if position == self.total else None
        self.position = position

    def next_onset(self, direction: int) -> int | None:
        """The position of the next (``direction`` > 0) or previous incident onset, or None."""
        if direction > 0:
            return next((p for p in self.onsets if p > self.position), None)
        return next((p for p in reversed(self.onsets) if p < self.position), None)

    def position_of_step(self, step: int) -> int:
        """The position whose latest snapshot is the first at or after ``step`` (clamped to the ends)."""
        for i, (_, snap) in enumerate(self.loaded.frames):
            if snap.step >= step:
                return i + 1
        return self.total

    @property
    def steps(self) -> tuple[int, int]:
        frames = self.loaded.frames
        return (frames[0][1].step, frames[-1][1].step) if frames else (0, 0)

    def step(self, delta: int) -> None:
        """One update forward (its anomalies notify, as they would live) or back."""
        self.playing = False
        self.seek(self.position + delta, quiet=False)

    def advance(self, seconds: float) -> None:
        """Play: move on by the recorded pace times ``speed``; stops at the end."""
        if not self.playing:
            return
        if self.position >= self.total:
            self.playing = False
            return
        self._due += seconds * self.speed
        frames = self.loaded.frames
        target = self.position
        while target < self.total:
            prev_wall = frames[target - 1][1].wall_time if target > 0 else frames[0][1].wall_time
            gap = frames[target][1].wall_time - prev_wall
            gap = gap if math.isfinite(gap) and 0 < gap < 3600 else 1.0
            if self._due < gap:
                break
            self._due -= gap
            target += 1
        if target != self.position:
            self.seek(target, quiet=False)
        if self.position >= self.total:
            self.playing = False

    def toggle(self) -> None:
        if not self.playing and self.position >= self.total:
            self.seek(1)
        self.playing = not self.playing
        self._due = 0.0

    def change_speed(self, direction: int) -> float:
        i = SPEEDS.index(self.speed)
        self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + direction))]
        return self.speed
