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
import functools
import math
import operator
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

from simic_tui.incidents import DEFAULT_INCIDENT_CAPACITY, IncidentLog
from simic_tui.sanitize import sanitize
from telemetry_core.protocol import FrameError, IncompatibleVersion, decode_body, decode_envelope
from telemetry_core.schema import (
    RUN_FINISHED,
    Anomaly,
    DebugReport,
    Envelope,
    Heartbeat,
    IncidentEvent,
    Snapshot,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_COLUMNS",
    "TELEMETRY_ERROR_NOTES",
    "AnomalyEntry",
    "FrameCounters",
    "StoreEvent",
    "TelemetryErrorNote",
    "TelemetryStore",
    "decode_checked",
    "flatten_snapshot",
]

DEFAULT_CAPACITY = 10_000
# Distinct history columns kept (each costs capacity x 9 bytes: 90 MB at 1024). A real trainer
# uses a few hundred; a hostile one inventing keys in every frame gets its extras counted and
# dropped instead of growing the dashboard without bound.
DEFAULT_MAX_COLUMNS = 1024
TELEMETRY_ERROR_NOTES = 8  # distinct telemetry error messages kept for the ``e`` screen
_INITIAL_COLUMNS = 160
_SECTIONS = ("policy", "value", "gradients", "lstm", "episodes")


@dataclass(frozen=True)
class AnomalyEntry:
    """One row of the anomaly log: the anomaly and when it arrived in the stream."""

    index: int  # absolute ingest index of the snapshot that carried it
    seq: int
    wall_time: float  # the trainer's wall time of that snapshot
    anomaly: Anomaly


class TelemetryErrorNote(NamedTuple):
    """One telemetry error message as the trainer reported it: the update it arrived with and how
    many errors the trainer had swallowed by then."""

    step: int
    count: int
    message: str


@dataclass(frozen=True)
class StoreEvent:
    """Something the operator should be told once (drained by the UI on its timer)."""

    kind: str  # "incident" | "profile" | "reset" | "info"
    message: str
    severity: str = "information"  # textual notify severities: information | warning | error
    anomaly: Anomaly | None = None
    incident: IncidentEvent | None = None  # an onset or upgrade (the app rate-limits their toasts)


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
    columns_dropped: int = 0  # values not kept because the store holds max_columns distinct columns

    def note_bad(self, code: str) -> None:
        self.bad_frames += 1
        self.bad_by_code[code] += 1


# ---------------------------------------------------------------------------------------------
# Flattening: Struct -> (column, float) with per-type plans resolved to column indices once
# ---------------------------------------------------------------------------------------------

_PLANS: dict[type, tuple[tuple[int, str, bool, bool], ...]] = {}
_NAN = math.nan


def _plan(struct_type: type) -> tuple[tuple[int, str, bool, bool], ...]:
    """(position in astuple, field name, is a dict of scalars, may be None) per numeric field."""
    plan = _PLANS.get(struct_type)
    if plan is not None:
        return plan
    out: list[tuple[int, str, bool, bool]] = []
    for pos, f in enumerate(msgspec.structs.fields(struct_type)):
        ftype = _bare(f.type)
        text = str(ftype)
        if ftype in (float, int, bool):
            out.append((pos, f.name, False, False))
        elif text in ("float | None", "int | None", "bool | None"):
            out.append((pos, f.name, False, True))
        elif text.startswith(("dict[str, float", "dict[str, int")):
            out.append((pos, f.name, True, True))
    plan = tuple(out)
    _PLANS[struct_type] = plan
    return plan


class _StructPlan:
    """One Struct type under one prefix: its columns, resolved once, and how to read them fast."""

    __slots__ = ("dicts", "get_optional", "get_plain", "optional_cols", "plain_cols")

    def __init__(self, flat: _Flattener, prefix: str, struct_type: type) -> None:
        plain = [
            (pos, name) for pos, name, is_dict, optional in _plan(struct_type) if not is_dict and not optional
        ]
        optional = [(pos, name) for pos, name, is_dict, opt in _plan(struct_type) if not is_dict and opt]
        self.plain_cols = [flat.col(f"{prefix}.{name}") for _, name in plain]
        self.optional_cols = [flat.col(f"{prefix}.{name}") for _, name in optional]
        self.get_plain = _getter([pos for pos, _ in plain])
        self.get_optional = _getter([pos for pos, _ in optional])
        self.dicts = [
            (pos, f"{prefix}.{name}", "None" in str(ftype))
            for (pos, name, is_dict, _), ftype in zip(_plan(struct_type), _types(struct_type))
            if is_dict
        ]


def _types(struct_type: type) -> list[Any]:
    """The declared type of each planned field, in plan order (constraints stripped)."""
    fields = msgspec.structs.fields(struct_type)
    return [_bare(fields[pos].type) for pos, _, _, _ in _plan(struct_type)]


def _bare(tp: Any) -> Any:
    """``tp`` without its ``Annotated`` constraints, unions written ``a | b`` (as declared)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _bare(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_bare(a) for a in typing.get_args(tp)])
    if origin in (dict, list):
        return origin[tuple(_bare(a) for a in typing.get_args(tp))]
    return tp


def _getter(positions: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    if not positions:
        return lambda t: ()
    if len(positions) == 1:
        (p,) = positions
        return lambda t: (t[p],)
    return operator.itemgetter(*positions)


class _Flattener:
    """Turns snapshots into (column indices, values); column names are resolved once each.

    At most ``max_columns`` distinct columns: a new one beyond that resolves to -1, and its values
    are dropped and counted in ``dropped``.
    """

    def __init__(self, max_columns: int = DEFAULT_MAX_COLUMNS) -> None:
        self.columns: dict[str, int] = {}
        self.max_columns = max_columns
        self.dropped = 0
        self._plans: dict[tuple[str, type], _StructPlan] = {}
        self._keyed: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    def col(self, name: str) -> int:
        j = self.columns.get(name)
        if j is None:
            if len(self.columns) >= self.max_columns:
                return -1
            j = self.columns[name] = len(self.columns)
        return j

    def _struct(self, prefix: str, obj: Any, idx: list[int], vals: list[Any]) -> None:
        plan = self._plans.get((prefix, type(obj)))
        if plan is None:
            plan = self._plans[(prefix, type(obj))] = _StructPlan(self, prefix, type(obj))
        t = msgspec.structs.astuple(obj)
        idx.extend(plan.plain_cols)
        vals.extend(plan.get_plain(t))
        if plan.optional_cols:
            idx.extend(plan.optional_cols)
            vals.extend([_NAN if v is None else v for v in plan.get_optional(t)])
        for pos, name, nullable in plan.dicts:
            mapping = t[pos]
            if not mapping:
                continue
            keys = tuple(mapping)
            cols = self._keyed.get((name, keys))
            if cols is None:
                if len(self._keyed) >= 4 * self.max_columns:  # key sets that keep changing
                    self._keyed.clear()
                cols = self._keyed[(name, keys)] = [self.col(f"{name}.{k}") for k in keys]
            values = [_NAN if v is None else v for v in mapping.values()] if nullable else mapping.values()
            if -1 in cols:
                kept = [(j, v) for j, v in zip(cols, values) if j >= 0]
                self.dropped += len(cols) - len(kept)
                idx.extend(j for j, _ in kept)
                vals.extend(v for _, v in kept)
            else:
                idx.extend(cols)
                vals.extend(values)

    def flatten(self, snap: Snapshot) -> tuple[list[int], list[Any]]:
        idx = [self.col("update_seconds"), self.col("anomalies")]
        vals: list[Any] = [snap.update_seconds, len(snap.anomalies)]
        for section in _SECTIONS:
            obj = getattr(snap, section, None)
            if obj is not None:
                self._struct(section, obj, idx, vals)
        adv = snap.advantage
        if adv is not None:
            self._struct("advantage.raw", adv.raw, idx, vals)
            self._struct("advantage.normalized", adv.normalized, idx, vals)
            self._struct("advantage.returns", adv.returns, idx, vals)
        return idx, vals


def decode_checked(data: bytes, kinds: tuple[str, ...] | None = None) -> tuple[Envelope, Any]:
    """Decode, range-check and clean one frame; FrameError (or IncompatibleVersion) when refused.

    What :meth:`TelemetryStore.decode_frame` (the stream) and the replay (a recording) both use.
    """
    env = decode_envelope(data)
    if kinds is not None and env.kind not in kinds:
        raise FrameError("unexpected_kind", f"a {env.kind[:32]!r} frame where {'/'.join(kinds)} belongs")
    return sanitize(env), sanitize(decode_body(env))


def flatten_snapshot(snap: Snapshot) -> list[tuple[str, float]]:
    """Every scalar of a snapshot as ``(column, value)``; None becomes NaN (a gap in the history)."""
    flat = _Flattener()
    idx, vals = flat.flatten(snap)
    names = {j: name for name, j in flat.columns.items()}
    return [(names[j], float(v)) for j, v in zip(idx, vals)]


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
        max_columns: int = DEFAULT_MAX_COLUMNS,
        anomaly_capacity: int = 10_000,
        incident_capacity: int = DEFAULT_INCIDENT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.max_columns = max_columns
        self.anomaly_capacity = anomaly_capacity
        self.incidents = IncidentLog(incident_capacity)
        self.clock = clock
        self.counters = FrameCounters()
        self.events: collections.deque[StoreEvent] = collections.deque(maxlen=256)
        self.version = 0
        # Ingest counts per tenth of a second of the store's clock (bounded), for the header's rate.
        self._ingest_buckets: collections.deque[list[int]] = collections.deque(maxlen=600)
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
        self.finished: Snapshot | None = None  # the trainer's closing frame: the run ended
        self.anomalies: collections.deque[AnomalyEntry] = collections.deque(maxlen=self.anomaly_capacity)
        self.anomaly_total = 0
        if self.incidents.preloaded:  # a replay's log is the whole recording's: it outlives a rebuild
            self.incidents.position(None)
        else:
            self.incidents.clear()
        self.profile_traces: list[tuple[int, str]] = []
        # (step, errors so far, message) each time the trainer's latest swallowed telemetry error
        # changed: a snapshot carries only the latest, the ``e`` screen shows the last few whole
        self.telemetry_errors: collections.deque[TelemetryErrorNote] = collections.deque(
            maxlen=TELEMETRY_ERROR_NOTES
        )
        self._flat = _Flattener(self.max_columns)
        self._cols = self._flat.columns
        self._data = np.full((self.capacity, _INITIAL_COLUMNS), np.nan)
        self._present = np.zeros((self.capacity, _INITIAL_COLUMNS), dtype=np.bool_)
        self._steps = np.zeros(self.capacity, dtype=np.int64)
        self._seqs = np.zeros(self.capacity, dtype=np.int64)
        # The last row's column indices, as given, as an array and as a mask of the row's width.
        self._row_idx: list[int] | None = None
        self._row_cols = np.zeros(0, dtype=np.intp)
        self._row_mask = np.zeros(0, dtype=np.bool_)
        self.version += 1

    def reset(self, session: str | None = None) -> None:
        """Forget the history (a new trainer session); frame counters are kept, they are the link's."""
        self._reset_data()
        self.session = session

    # -- ingest ----------------------------------------------------------------------------------
    def decode_frame(self, data: bytes, kinds: tuple[str, ...] | None = None) -> tuple[Envelope, Any] | None:
        """The one way a frame from the stream, a reply or a recording enters the dashboard.

        Decodes the envelope and its body (sizes, types and integer ranges checked by the schema),
        refuses a kind outside ``kinds``, and cleans every string for the terminal. A bad frame is
        counted here (and nowhere else) and None returned; :class:`IncompatibleVersion` is counted
        and re-raised: it is a state of the link, not one bad frame.
        """
        try:
            return decode_checked(data, kinds)
        except IncompatibleVersion:
            self.counters.note_bad("incompatible")
            self.version += 1
            raise
        except FrameError as exc:
            self.note_bad(exc.code)
            return None

    def note_bad(self, code: str) -> None:
        """Count a frame refused before decoding (wrong frame count, topic, signature, ...)."""
        self.counters.note_bad(code)
        self.version += 1

    def ingest_bytes(self, data: bytes, *, quiet: bool = False, backfill: bool = False) -> Envelope | None:
        """Decode one published frame and ingest it; a bad frame is counted, never raised.

        Returns the envelope for frames that decoded (snapshots and heartbeats), else None.
        :class:`IncompatibleVersion` is re-raised: it is a state of the link, not one bad frame.
        """
        decoded = self.decode_frame(data, ("snapshot", "heartbeat"))
        if decoded is None:
            return None
        env, body = decoded
        if isinstance(body, Snapshot):
            self.ingest(env, body, quiet=quiet, backfill=backfill)
        else:
            self.note_heartbeat(env, body)
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
        if snap.run_state == RUN_FINISHED:
            # The closing frame repeats the last update: it ends the run, it adds no row.
            self.finished = snap
            self.version += 1
            return True
        self.finished = None
        pos = self.count % self.capacity
        self._write_row(pos, *self._flat.flatten(snap))
        if self._flat.dropped:
            self.counters.columns_dropped += self._flat.dropped
            self._flat.dropped = 0
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
        self._note_telemetry_error(snap)
        self._log_anomalies(env, snap)
        self._log_incidents(snap, quiet)
        self.counters.snapshots += 1
        if backfill:
            self.counters.backfilled += 1
        else:  # the rate is the trainer's pace: a backfill's burst says nothing about it
            tenth = int(self.clock() * 10)
            buckets = self._ingest_buckets
            if buckets and buckets[-1][0] == tenth:
                buckets[-1][1] += 1
            else:
                buckets.append([tenth, 1])
        self.version += 1
        return True

    def _note_telemetry_error(self, snap: Snapshot) -> None:
        message = snap.counters.last_telemetry_error
        if message and (not self.telemetry_errors or self.telemetry_errors[-1].message != message):
            self.telemetry_errors.append(
                TelemetryErrorNote(snap.step, snap.counters.telemetry_errors, message)
            )

    def telemetry_error_notes(self) -> list[TelemetryErrorNote]:
        """The latest telemetry errors the trainer reported, newest first (the latest snapshot's
        own message always among them)."""
        notes = list(self.telemetry_errors)
        snap = self.latest
        if snap is not None and snap.counters.last_telemetry_error and (
            not notes or notes[-1].message != snap.counters.last_telemetry_error
        ):
            c = snap.counters
            notes.append(TelemetryErrorNote(snap.step, c.telemetry_errors, c.last_telemetry_error))
        return notes[::-1]

    def _write_row(self, pos: int, idx: list[int], vals: list[float]) -> None:
        if len(self._cols) > self._data.shape[1]:
            self._grow(len(self._cols))
        if idx != self._row_idx:  # compared in C: a run sends the same columns update after update
            self._row_idx = idx
            self._row_cols = np.asarray(idx, dtype=np.intp)
            self._row_mask = np.zeros(self._present.shape[1], dtype=np.bool_)
            self._row_mask[self._row_cols] = True
        row = self._data[pos]
        row.fill(np.nan)
        row[self._row_cols] = vals
        self._present[pos] = self._row_mask

    def _grow(self, needed: int) -> None:
        width = self._data.shape[1]
        new_width = max(width * 2, needed)
        grown = np.full((self.capacity, new_width), np.nan)
        grown[:, :width] = self._data
        self._data = grown
        mask = np.zeros((self.capacity, new_width), dtype=np.bool_)
        mask[:, :width] = self._present
        self._present = mask
        self._row_idx = None  # the cached row mask has the old width

    def _log_anomalies(self, env: Envelope, snap: Snapshot) -> None:
        """The detector's per-update judgements, kept for export and the DEBUG view (no toasts: the
        operator is told of incidents, which do not repeat every update)."""
        for anomaly in snap.anomalies:
            self.anomalies.append(AnomalyEntry(self.count - 1, env.seq, env.wall_time, anomaly))
            self.anomaly_total += 1

    def _log_incidents(self, snap: Snapshot, quiet: bool) -> None:
        news = self.incidents.update(snap)
        if quiet:
            return
        for event in news:
            inc = event.incident
            where = f" ({inc.scope})" if inc.scope else ""
            verb = "now critical" if event.event == "upgrade" else inc.severity
            self.events.append(
                StoreEvent(
                    "incident",
                    f"{inc.kind}{where} {verb} at step {event.step}",
                    "error" if inc.severity == "critical" else "warning",
                    incident=event,
                )
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
        self.finished = None
        while self.anomalies and self.anomalies[-1].index >= keep:
            self.anomalies.pop()
            self.anomaly_total -= 1
        if latest is not None:
            self.latest_env, self.latest = latest
            self.last_seq = self.latest_env.seq
        self.previous = previous
        self.incidents.position(self.latest)
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
        oldest = int((self.clock() - window) * 10)
        recent = 0
        for tenth, count in reversed(self._ingest_buckets):
            if tenth <= oldest:
                break
            recent += count
        return recent / window

    def drain_events(self) -> list[StoreEvent]:
        out = list(self.events)
        self.events.clear()
        return out

    def recent_anomalies(self, limit: int | None = None) -> list[AnomalyEntry]:
        """Newest first."""
        items = list(reversed(self.anomalies))
        return items if limit is None else items[:limit]
