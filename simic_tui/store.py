"""The dashboard's memory: bounded per-metric history, the latest snapshot, the anomaly log, counters.

Receive fast, draw slowly: the network worker (or the replay source) calls :meth:`TelemetryStore.ingest`
for every frame; widgets read from here on a timer and never see individual messages. Everything is
bounded: one ring of ``capacity`` rows shared by every metric (a 2-D float64 array, one column per
metric, NaN where a snapshot did not carry it), a bounded anomaly log and a bounded event queue. RSS
therefore stops growing once the ring is full, however long the run.

The store computes nothing about training health: it flattens the trainer's numbers into columns.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from telemetry_core.protocol import FrameError, IncompatibleVersion, decode_body, decode_envelope
from telemetry_core.schema import Anomaly, DebugReport, Envelope, Heartbeat, Snapshot

__all__ = [
    "DEFAULT_CAPACITY",
    "AnomalyEntry",
    "FrameCounters",
    "StoreEvent",
    "TelemetryStore",
    "flatten_snapshot",
]

DEFAULT_CAPACITY = 10_000
_INITIAL_COLUMNS = 160
_SECTIONS = ("policy", "value", "gradients", "lstm", "episodes")


@dataclass(frozen=True)
class AnomalyEntry:
    """One row of the anomaly log: the anomaly and when it arrived in the stream."""

    index: int  # absolute ingest index of the snapshot that carried it
    seq: int
    wall_time: float  # the trainer's wall time of that snapshot
    anomaly: Anomaly


@dataclass(frozen=True)
class StoreEvent:
    """Something the operator should be told once (drained by the UI on its timer)."""

    kind: str  # "anomaly" | "profile" | "reset" | "info"
    message: str
    severity: str = "information"  # textual notify severities: information | warning | error
    anomaly: Anomaly | None = None


@dataclass
class FrameCounters:
    """Everything the dashboard received, refused or found missing; shown in the header."""

    snapshots: int = 0  # snapshots ingested
    heartbeats: int = 0
    bad_frames: int = 0  # refused frames of any kind (total of ``bad_by_code``)
    bad_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    missed: int = 0  # snapshot sequence numbers never seen (gaps the backfill did not fill)
    older_dropped: int = 0  # frames older than what the store holds (backfill overlap), ignored
    backfilled: int = 0  # snapshots that arrived through a history request

    def note_bad(self, code: str) -> None:
        self.bad_frames += 1
        self.bad_by_code[code] += 1


# ---------------------------------------------------------------------------------------------
# Flattening: Struct -> (column name, float) pairs, with per-type plans computed once
# ---------------------------------------------------------------------------------------------

_PLANS: dict[type, tuple[tuple[str, str], ...]] = {}


def _plan(struct_type: type) -> tuple[tuple[str, str], ...]:
    """(field, how) for the scalar and dict-of-scalar fields of a Struct type."""
    plan = _PLANS.get(struct_type)
    if plan is not None:
        return plan
    out: list[tuple[str, str]] = []
    for f in msgspec.structs.fields(struct_type):
        t = f.type
        text = str(t)
        if t in (float, int, bool) or text in ("float | None", "int | None", "bool | None"):
            out.append((f.name, "scalar"))
        elif text.startswith("dict[str, float") or text.startswith("dict[str, int"):
            out.append((f.name, "dict"))
    plan = tuple(out)
    _PLANS[struct_type] = plan
    return plan


def _num(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


def _flatten_struct(prefix: str, obj: Any, out: list[tuple[str, float]]) -> None:
    for name, how in _plan(type(obj)):
        value = getattr(obj, name)
        if how == "scalar":
            out.append((f"{prefix}.{name}", _num(value)))
        else:
            for key, item in value.items():
                out.append((f"{prefix}.{name}.{key}", _num(item)))


def flatten_snapshot(snap: Snapshot) -> list[tuple[str, float]]:
    """Every scalar of a snapshot as ``(column, value)``; None becomes NaN (a gap in the history)."""
    out: list[tuple[str, float]] = [("update_seconds", _num(snap.update_seconds))]
    for section in _SECTIONS:
        obj = getattr(snap, section, None)
        if obj is not None:
            _flatten_struct(section, obj, out)
    adv = snap.advantage
    if adv is not None:
        _flatten_struct("advantage.raw", adv.raw, out)
        _flatten_struct("advantage.normalized", adv.normalized, out)
        _flatten_struct("advantage.returns", adv.returns, out)
    out.append(("anomalies", float(len(snap.anomalies))))
    return out


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class TelemetryStore:
    """Bounded history of one trainer session, fed frame by frame, read by widgets on a timer.

    ``version`` increases on every change, so a widget redraws only when something new arrived.
    ``clock`` is injectable so that rates are deterministic in tests and snapshots.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        anomaly_capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.anomaly_capacity = anomaly_capacity
        self.clock = clock
        self.counters = FrameCounters()
        self.events: collections.deque[StoreEvent] = collections.deque(maxlen=256)
        self.version = 0
        self._ingest_times: collections.deque[float] = collections.deque(maxlen=4096)
        self._reset_data()

    # -- lifecycle -------------------------------------------------------------------------------
    def _reset_data(self) -> None:
        self.session: str | None = None
        self.count = 0  # snapshots ingested since the last reset (absolute ring index)
        self.latest: Snapshot | None = None
        self.latest_env: Envelope | None = None
        self.previous: Snapshot | None = None
        self.latest_debug: tuple[int, DebugReport] | None = None  # (step, report) of the last DEBUG
        self.last_heartbeat: Heartbeat | None = None
        self.last_seq: int | None = None
        self.anomalies: collections.deque[AnomalyEntry] = collections.deque(maxlen=self.anomaly_capacity)
        self.anomaly_total = 0
        self.profile_traces: list[tuple[int, str]] = []
        self._cols: dict[str, int] = {}
        self._data = np.full((self.capacity, _INITIAL_COLUMNS), np.nan)
        self._present = np.zeros((self.capacity, _INITIAL_COLUMNS), dtype=np.bool_)
        self._steps = np.zeros(self.capacity, dtype=np.int64)
        self._seqs = np.zeros(self.capacity, dtype=np.int64)
        self.version += 1

    def reset(self, session: str | None = None) -> None:
        """Forget the history (a new trainer session); frame counters are kept, they are the link's."""
        self._reset_data()
        self.session = session

    # -- ingest ----------------------------------------------------------------------------------
    def ingest_bytes(self, data: bytes, *, quiet: bool = False, backfill: bool = False) -> Envelope | None:
        """Decode one published frame and ingest it; a bad frame is counted, never raised.

        Returns the envelope for frames that decoded (snapshots and heartbeats), else None.
        :class:`IncompatibleVersion` is re-raised: it is a state of the link, not one bad frame.
        """
        try:
            env = decode_envelope(data)
            body = decode_body(env)
        except IncompatibleVersion:
            self.counters.note_bad("incompatible")
            self.version += 1
            raise
        except FrameError as exc:
            self.counters.note_bad(exc.code)
            self.version += 1
            return None
        if isinstance(body, Snapshot):
            self.ingest(env, body, quiet=quiet, backfill=backfill)
        elif isinstance(body, Heartbeat):
            self.note_heartbeat(env, body)
        else:
            self.counters.note_bad("unexpected_kind")
            self.version += 1
            return None
        return env

    def note_heartbeat(self, env: Envelope, hb: Heartbeat) -> None:
        self.counters.heartbeats += 1
        self.last_heartbeat = hb
        self.version += 1

    def ingest(self, env: Envelope, snap: Snapshot, *, quiet: bool = False, backfill: bool = False) -> bool:
        """Append one snapshot. Frames not newer than the last one held are dropped (and counted).

        ``quiet`` suppresses operator events (used for backfill and replay seeks, where hundreds of
        old anomalies would otherwise each raise a notification).
        """
        if self.session is None:
            self.session = env.session
        if self.last_seq is not None and env.seq <= self.last_seq:
            self.counters.older_dropped += 1
            return False
        if self.last_seq is not None and env.seq > self.last_seq + 1:
            self.counters.missed += env.seq - self.last_seq - 1
        self.last_seq = env.seq
        pos = self.count % self.capacity
        self._write_row(pos, flatten_snapshot(snap))
        self._steps[pos] = snap.step
        self._seqs[pos] = env.seq
        self.count += 1
        self.previous = self.latest
        self.latest = snap
        self.latest_env = env
        if snap.debug is not None:
            self.latest_debug = (snap.step, snap.debug)
        if snap.profile_trace and (
            not self.profile_traces or self.profile_traces[-1][1] != snap.profile_trace
        ):
            self.profile_traces.append((snap.step, snap.profile_trace))
            if not quiet:
                self.events.append(
                    StoreEvent("profile", f"profile trace written to {snap.profile_trace}", "information")
                )
        self._log_anomalies(env, snap, quiet)
        self.counters.snapshots += 1
        if backfill:
            self.counters.backfilled += 1
        self._ingest_times.append(self.clock())
        self.version += 1
        return True

    def _write_row(self, pos: int, pairs: list[tuple[str, float]]) -> None:
        cols = self._cols
        idx = []
        vals = []
        for name, value in pairs:
            j = cols.get(name)
            if j is None:
                j = self._add_column(name)
            idx.append(j)
            vals.append(value)
        row = self._data[pos]
        row.fill(np.nan)
        row[idx] = vals
        present = self._present[pos]
        present.fill(False)
        present[idx] = True

    def _add_column(self, name: str) -> int:
        j = len(self._cols)
        if j >= self._data.shape[1]:
            width = self._data.shape[1]
            grown = np.full((self.capacity, width * 2), np.nan)
            grown[:, :width] = self._data
            self._data = grown
            mask = np.zeros((self.capacity, width * 2), dtype=np.bool_)
            mask[:, :width] = self._present
            self._present = mask
        self._cols[name] = j
        return j

    def _log_anomalies(self, env: Envelope, snap: Snapshot, quiet: bool) -> None:
        before = {(a.kind, a.head) for a in self.previous.anomalies} if self.previous else set()
        for anomaly in snap.anomalies:
            self.anomalies.append(AnomalyEntry(self.count - 1, env.seq, env.wall_time, anomaly))
            self.anomaly_total += 1
            if not quiet and (anomaly.kind, anomaly.head) not in before:
                severity = "error" if anomaly.severity == "critical" else "warning"
                where = f" ({anomaly.head})" if anomaly.head else ""
                message = anomaly.message if len(anomaly.message) <= 110 else anomaly.message[:109] + "…"
                self.events.append(
                    StoreEvent("anomaly", f"{anomaly.kind}{where} at step {anomaly.step}: {message}", severity, anomaly)
                )

    def truncate(
        self, keep: int, latest: tuple[Envelope, Snapshot] | None, previous: Snapshot | None
    ) -> bool:
        """Roll the history back to its first ``keep`` snapshots (replay stepping backwards).

        Possible only while those rows are still in the ring; returns False otherwise (the caller
        then rebuilds from its frames).
        """
        if keep > self.count or keep < max(1, self.count - self.capacity + 1):
            return False
        self.count = keep
        while self.anomalies and self.anomalies[-1].index >= keep:
            self.anomalies.pop()
            self.anomaly_total -= 1
        if latest is not None:
            self.latest_env, self.latest = latest
            self.last_seq = self.latest_env.seq
        self.previous = previous
        self.profile_traces = [
            (s, p) for s, p in self.profile_traces if self.latest and s <= self.latest.step
        ]
        if (
            self.latest_debug is not None
            and self.latest is not None
            and self.latest_debug[0] > self.latest.step
        ):
            self.latest_debug = None  # the caller re-derives it when it needs an older report
        self.version += 1
        return True

    # -- reading ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Rows held (at most ``capacity``)."""
        return min(self.count, self.capacity)

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def _order(self, n: int | None) -> np.ndarray:
        size = self.size
        n = size if n is None else max(0, min(n, size))
        start = self.count - n
        return np.arange(start, self.count) % self.capacity

    def series(self, name: str, n: int | None = None) -> np.ndarray:
        """The last ``n`` values of a metric, oldest first (NaN where a snapshot lacked it)."""
        j = self._cols.get(name)
        idx = self._order(n)
        if j is None:
            return np.full(len(idx), np.nan)
        return self._data[idx, j]

    def present(self, name: str, n: int | None = None) -> np.ndarray:
        """Which of the last ``n`` snapshots carried the metric at all (False: not measured)."""
        j = self._cols.get(name)
        idx = self._order(n)
        if j is None:
            return np.zeros(len(idx), dtype=np.bool_)
        return self._present[idx, j]

    def steps(self, n: int | None = None) -> np.ndarray:
        return self._steps[self._order(n)]

    def has(self, name: str) -> bool:
        return name in self._cols

    def columns_with_prefix(self, prefix: str) -> Iterator[str]:
        return (c for c in self._cols if c.startswith(prefix))

    def rate(self, window: float = 5.0) -> float:
        """Snapshots ingested per second over the last ``window`` seconds of the store's clock."""
        now = self.clock()
        recent = 0
        for t in reversed(self._ingest_times):
            if now - t > window:
                break
            recent += 1
        return recent / window

    def drain_events(self) -> list[StoreEvent]:
        out = list(self.events)
        self.events.clear()
        return out

    def recent_anomalies(self, limit: int | None = None) -> list[AnomalyEntry]:
        """Newest first."""
        items = list(reversed(self.anomalies))
        return items if limit is None else items[:limit]
