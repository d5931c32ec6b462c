"""The incident layer: turns the detector's per-update judgements into what an operator is told.

The :class:`~telemetry_core.anomaly.AnomalyDetector` judges one update at a time: an ``Anomaly`` per
kind (per head, per rank) that fires *in this update*. Shown as they are, judgements flash for one
update, repeat every update a condition lasts, and say nothing when a warning becomes critical. This
module keeps the state across updates, on the trainer side so that every dashboard, every recording
and the escalation policy agree:

* one :class:`~telemetry_core.schema.Incident` per (kind, scope), opened by the first judgement
  (an ``onset`` event), followed while judgements keep coming, ``upgrade``-d when its severity rises
  from warning to critical, and ``clear``-ed only after ``Thresholds.incident_clear_updates``
  updates without a judgement (hysteresis: an intermittent condition stays one incident instead of
  flapping); a judgement after that opens a new incident with a new id;
* incidents that open in the same update, or within ``Thresholds.incident_group_updates`` of each
  other, form one group headed by the most upstream signal (``kinds.upstream_rank``): a learning-rate
  spike that raises KL, ratio, value and entropy alarms at once reads as one KL-spike incident with
  its consequences listed under it.

Torch-free: it reads Structs, so a recording can be re-judged offline with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from telemetry_core.kinds import SPECS, upstream_rank
from telemetry_core.schema import Anomaly, Incident, IncidentEvent

__all__ = ["IncidentTracker", "escalates", "scope_of", "upstream_rank"]

_STATE_VERSION = 1
_SEVERITY = {"warning": 1, "critical": 2}


def escalates(event: IncidentEvent) -> bool:
    """Whether an event asks for automatic DEBUG: a critical onset or an upgrade to critical, never
    a warning (healthy runs raise warnings now and then, and DEBUG costs far more than NORMAL)."""
    return event.event == "upgrade" or (event.event == "onset" and event.incident.severity == "critical")


def _lower_is_worse(kind: str) -> bool:
    spec = SPECS.get(kind)
    return spec is not None and spec.worse == "lower"


def scope_of(anomaly: Anomaly) -> str:
    """The scope an anomaly judges: a head, a rank, or the whole run ("")."""
    if anomaly.head is not None:
        return f"head:{anomaly.head}"
    if anomaly.rank is not None:
        return f"rank:{anomaly.rank}"
    return ""


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


class _Open:
    """An active incident and its quiet counter (updates since its last judgement)."""

    __slots__ = ("incident", "quiet")

    def __init__(self, incident: Incident) -> None:
        self.incident = incident
        self.quiet = 0


class IncidentTracker:
    """Keeps the active incidents; :meth:`update` takes one update's judgements and returns its events.

    ``clear_updates``: updates without a judgement after which an incident clears (>= 1).
    ``group_updates``: incidents whose onsets lie within this many updates of each other are grouped.
    """

    def __init__(self, *, clear_updates: int = 3, group_updates: int = 1) -> None:
        if isinstance(clear_updates, bool) or not isinstance(clear_updates, int) or clear_updates < 1:
            raise ValueError(f"clear_updates must be an int >= 1, got {clear_updates!r}")
        if isinstance(group_updates, bool) or not isinstance(group_updates, int) or group_updates < 0:
            raise ValueError(f"group_updates must be an int >= 0, got {group_updates!r}")
        self.clear_updates = clear_updates
        self.group_updates = group_updates
        self.reset()

    @classmethod
    def from_thresholds(cls, thresholds: Any) -> IncidentTracker:
        return cls(
            clear_updates=int(thresholds.incident_clear_updates),
            group_updates=int(thresholds.incident_group_updates),
        )

    def reset(self) -> None:
        self._open: dict[tuple[str, str], _Open] = {}
        self._next_id = 1
        self.events: list[IncidentEvent] = []

    # ------------------------------------------------------------------------------------------
    def active(self) -> list[Incident]:
        """The active incidents (copies), grouped: each group's head first, groups by onset."""
        incidents = [o.incident for o in self._open.values()]
        heads = {i.group: i for i in incidents if i.id == i.group}

        def order(i: Incident) -> tuple[int, int, int, int]:
            head = heads.get(i.group)
            head_onset = head.onset_step if head is not None else i.onset_step
            return (head_onset, i.group, 0 if i.id == i.group else 1, upstream_rank(i.kind) * 10**6 + i.id)

        return [_copy(i) for i in sorted(incidents, key=order)]

    def update(self, anomalies: Iterable[Anomaly], step: int) -> list[IncidentEvent]:
        """Fold one update's judgements in; return (and keep in ``self.events``) its events."""
        step = int(step)
        events: list[IncidentEvent] = []
        judged: set[tuple[str, str]] = set()
        opened: list[Incident] = []
        for a in anomalies:
            key = (a.kind, scope_of(a))
            if key in judged:  # one judgement per kind and scope per update: keep the worse
                self._fold(self._open[key].incident, a, step, events, repeat=True)
                continue
            judged.add(key)
            current = self._open.get(key)
            if current is None:
                inc = self._new(a, key[1], step)
                self._open[key] = _Open(inc)
                opened.append(inc)
            else:
                current.quiet = 0
                self._fold(current.incident, a, step, events, repeat=False)
        for key in [k for k in self._open if k not in judged]:
            o = self._open[key]
            o.quiet += 1
            if o.quiet >= self.clear_updates:
                inc = o.incident
                inc.state = "cleared"
                inc.cleared_step = step
                del self._open[key]
                events.append(IncidentEvent(event="clear", step=step, incident=_copy(inc)))
        if opened:
            self._group(opened, step)
            # Onsets are reported after grouping, so each carries its group; heads first.
            for inc in sorted(opened, key=lambda i: (i.id != i.group, upstream_rank(i.kind), i.id)):
                events.append(IncidentEvent(event="onset", step=step, incident=_copy(inc)))
        order = {"onset": 0, "upgrade": 1, "clear": 2}
        events.sort(key=lambda e: order[e.event])
        self.events = events
        return events

    # ------------------------------------------------------------------------------------------
    def _new(self, a: Anomaly, scope: str, step: int) -> Incident:
        inc = Incident(
            id=self._next_id,
            kind=a.kind,
            scope=scope,
            severity=a.severity,
            peak_severity=a.severity,
            state="active",
            onset_step=step,
            last_step=step,
            peak_step=step,
            updates_active=1,
            value=a.value,
            threshold=a.threshold,
            last_value=a.value,
            last_threshold=a.threshold,
            message=a.message,
            peak_message=a.message,
            action=a.action,
            group=self._next_id,
        )
        self._next_id += 1
        return inc

    def _fold(
        self, inc: Incident, a: Anomaly, step: int, events: list[IncidentEvent], *, repeat: bool
    ) -> None:
        """Fold a judgement into an active incident: last values, peak, and an upgrade event."""
        sev, peak = _SEVERITY.get(a.severity, 1), _SEVERITY.get(inc.peak_severity, 1)
        if not repeat:
            inc.updates_active += 1
            inc.last_step = step
        if not repeat or sev > _SEVERITY.get(inc.severity, 1):
            inc.severity = a.severity
            inc.last_value, inc.last_threshold, inc.message = a.value, a.threshold, a.message
            inc.action = a.action or inc.action
        if sev > peak or (sev == peak and self._worse(inc.kind, a.value, inc.value)):
            upgraded = sev > peak
            inc.peak_severity = a.severity
            inc.value, inc.threshold, inc.peak_message = a.value, a.threshold, a.message
            if upgraded:
                inc.peak_step = step
                events.append(IncidentEvent(event="upgrade", step=step, incident=_copy(inc)))

    @staticmethod
    def _worse(kind: str, new: float | None, old: float | None) -> bool:
        n, o = _finite(new), _finite(old)
        if n is None:
            return False
        if o is None:
            return True
        return n < o if _lower_is_worse(kind) else n > o

    def _group(self, opened: list[Incident], step: int) -> None:
        """Group this update's onsets with each other and with the groups of incidents that opened
        within ``group_updates`` before; the most upstream member heads the merged group."""
        recent = [
            o.incident
            for o in self._open.values()
            if o.incident not in opened and step - o.incident.onset_step <= self.group_updates
        ]
        groups = {i.group for i in recent}
        members = opened + [o.incident for o in self._open.values() if o.incident.group in groups]
        members = list({id(i): i for i in members}.values())
        head = min(members, key=lambda i: (upstream_rank(i.kind), i.onset_step, i.id))
        for inc in members:
            inc.group = head.id

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The active incidents and the id counter, JSON-safe, for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "next_id": self._next_id,
            "open": [
                {"incident": msgspec.to_builtins(o.incident), "quiet": o.quiet} for o in self._open.values()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"incident state must be a mapping with version {_STATE_VERSION}")
        self.reset()
        try:
            self._next_id = int(state["next_id"])
            for entry in state["open"]:
                inc = msgspec.convert(entry["incident"], Incident)
                o = _Open(inc)
                o.quiet = int(entry["quiet"])
                self._open[(inc.kind, inc.scope)] = o
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            self.reset()
            raise ValueError(f"malformed incident state: {exc!r}") from exc


def _copy(inc: Incident) -> Incident:
    return msgspec.structs.replace(inc)
