"""The dashboard's incident log: the trainer's incidents by id, and what the operator has acknowledged.

The trainer's incident layer decides what an alarm is, when it started, how bad it got and when it
ended (``Snapshot.incidents`` / ``Snapshot.incident_events``); this log only remembers those
incidents across updates, so a cleared one stays listed, and adds the one state the dashboard owns:
attention. An incident is *new* until the operator acknowledges it; an upgrade (warning -> critical)
makes it new again, because it is news.

Live, the log is fed by every ingested snapshot (backfill included). A replay preloads the whole
recording (:meth:`IncidentLog.preload`), so its log lists every incident of the run while the cursor
decides which are active *now* and which lie ahead.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from telemetry_core.schema import Incident, IncidentEvent, Snapshot

__all__ = ["DEFAULT_INCIDENT_CAPACITY", "IncidentLog", "IncidentRecord", "Row", "scope_label"]

DEFAULT_INCIDENT_CAPACITY = 2_000
_RANK = {"warning": 1, "critical": 2}


def scope_label(scope: str) -> str:
    """``head:force`` -> ``force``; ``rank:3`` -> ``rank 3``; the whole run -> ``run``."""
    if scope.startswith("head:"):
        return scope[5:]
    if scope.startswith("rank:"):
        return "rank " + scope[5:]
    return scope or "run"


@dataclass
class IncidentRecord:
    """One incident as last reported, and whether the operator has seen it."""

    incident: Incident
    seen: int  # order in which the log first heard of it (stable sort key)
    acknowledged: bool = False

    @property
    def id(self) -> int:
        return self.incident.id


@dataclass(frozen=True)
class Row:
    """One line of a grouped listing: the record and whether it is a consequence under its head."""

    record: IncidentRecord
    consequence: bool


class IncidentLog:
    """Incidents by id, bounded, with acknowledgements; ``version`` changes with anything shown."""

    def __init__(self, capacity: int = DEFAULT_INCIDENT_CAPACITY) -> None:
        self.capacity = max(1, capacity)
        self.records: collections.OrderedDict[int, IncidentRecord] = collections.OrderedDict()
        self.active_ids: frozenset[int] = frozenset()
        self.active_now: dict[int, Incident] = {}  # the active incidents as the positioned snapshot has them
        self.step: int | None = None  # step of the snapshot the log was last positioned at
        self.preloaded = False  # a replay: the records are the whole recording's
        self.total = 0  # incidents ever heard of (evicted ones included)
        self.evicted = 0
        self.version = 0
        self._seen = 0

    # -- feeding ---------------------------------------------------------------------------------------
    def _upsert(self, incident: Incident) -> IncidentRecord:
        rec = self.records.get(incident.id)
        if rec is None:
            rec = IncidentRecord(incident, self._seen)
            self._seen += 1
            self.total += 1
            self.records[incident.id] = rec
            self._bound()
        elif incident.last_step >= rec.incident.last_step or incident.state != rec.incident.state:
            rec.incident = incident
        return rec

    def _bound(self) -> None:
        """Over capacity: forget the oldest cleared incident (acknowledged ones first), else the oldest."""
        while len(self.records) > self.capacity:
            victim = next(
                (i for i, r in self.records.items() if r.incident.state != "active" and r.acknowledged),
                None,
            )
            if victim is None:
                victim = next((i for i, r in self.records.items() if r.incident.state != "active"), None)
            if victim is None:
                victim = next(iter(self.records))
            del self.records[victim]
            self.evicted += 1

    def update(self, snap: Snapshot) -> list[IncidentEvent]:
        """Take in one snapshot; returns its onsets and upgrades (what the operator is told of)."""
        news = [e for e in snap.incident_events if e.event in ("onset", "upgrade")]
        if not self.preloaded:
            for event in snap.incident_events:
                rec = self._upsert(event.incident)
                if event.event == "upgrade":
                    rec.acknowledged = False  # critical now: news again
            for incident in snap.incidents:
                self._upsert(incident)
            now = {i.id for i in snap.incidents}
            for gone in self.active_ids - now:
                # a clear whose event was lost (a missed frame): the active list is the truth
                rec = self.records.get(gone)
                if rec is not None and rec.incident.state == "active":
                    rec.incident = msgspec.structs.replace(
                        rec.incident, state="cleared", cleared_step=snap.step
                    )
        self.position(snap)
        return news

    def position(self, snap: Snapshot | None) -> None:
        """Which incidents are active at this snapshot (replay: where the cursor stands)."""
        self.active_now = {i.id: i for i in snap.incidents} if snap is not None else {}
        self.active_ids = frozenset(self.active_now)
        self.step = snap.step if snap is not None else None
        self.version += 1

    def preload(self, snapshots: Iterable[Snapshot]) -> None:
        """A replay: learn every incident of the recording up front (acknowledgements are kept)."""
        acked = {i for i, r in self.records.items() if r.acknowledged}
        self.records.clear()
        self.preloaded = False
        self.active_ids = frozenset()
        self.total = self.evicted = self._seen = 0
        for snap in snapshots:
            self.update(snap)
        for i in acked & self.records.keys():
            self.records[i].acknowledged = True
        self.preloaded = True
        self.position(None)

    def clear(self) -> None:
        self.records.clear()
        self.active_ids = frozenset()
        self.active_now = {}
        self.step = None
        self.preloaded = False
        self.total = self.evicted = self._seen = 0
        self.version += 1

    # -- attention ----------------------------------------------------------------------------------
    def reached(self, rec: IncidentRecord) -> bool:
        """False for an incident a replay has not reached yet (its onset lies after the cursor)."""
        if not self.preloaded:
            return True
        return self.step is not None and rec.incident.onset_step <= self.step

    def is_new(self, rec: IncidentRecord) -> bool:
        return not rec.acknowledged and self.reached(rec)

    def acknowledge(self, ids: Iterable[int]) -> int:
        """Mark incidents seen (and every consequence they head); returns how many changed."""
        wanted = set(ids)
        changed = 0
        for rec in self.records.values():
            mine = rec.id in wanted or rec.incident.group in wanted
            if mine and not rec.acknowledged and self.reached(rec):
                rec.acknowledged = True
                changed += 1
        if changed:
            self.version += 1
        return changed

    def acknowledge_all(self) -> int:
        return self.acknowledge([r.id for r in self.records.values() if self.reached(r)])

    # -- reading ------------------------------------------------------------------------------------
    def view(self, rec: IncidentRecord) -> Incident:
        """The incident as it stands at the cursor: an active one as this snapshot has it (a replay's
        record is the recording's last word on it, which may lie in the cursor's future)."""
        return self.active_now.get(rec.id, rec.incident)

    def active(self) -> list[Incident]:
        return [self.view(r) for r in self.records.values() if r.id in self.active_ids]

    def state_of(self, rec: IncidentRecord) -> str:
        """``active``, ``cleared at S``, or ``ahead`` (a replay's later incident)."""
        inc = rec.incident
        if rec.id in self.active_ids:
            return "active"
        if not self.reached(rec):
            return "ahead"
        if inc.cleared_step is not None and (self.step is None or inc.cleared_step <= self.step):
            return f"cleared at {inc.cleared_step}"
        return "cleared"

    def badge(self) -> tuple[int, int, str] | None:
        """(active, new, worst severity among them) or None when nothing asks for attention."""
        active = [r for r in self.records.values() if r.id in self.active_ids]
        new = [r for r in self.records.values() if self.is_new(r)]
        if not active and not new:
            return None
        worst = max(
            [_RANK.get(self.view(r).severity, 1) for r in active]
            + [_RANK.get(self.view(r).peak_severity, 1) for r in new],
            default=1,
        )
        return len(active), len(new), "critical" if worst >= 2 else "warning"

    def recently_cleared(self, kinds: Iterable[str], within: int) -> list[Incident]:
        """Incidents of ``kinds`` cleared in the last ``within`` steps (and not active again), newest first."""
        if self.step is None:
            return []
        wanted = set(kinds)
        active_keys = {(i.kind, i.scope) for i in self.active()}
        out = [
            r.incident
            for r in self.records.values()
            if r.incident.kind in wanted
            and r.id not in self.active_ids
            and (r.incident.kind, r.incident.scope) not in active_keys
            and r.incident.cleared_step is not None
            and 0 <= self.step - r.incident.cleared_step <= within
        ]
        return sorted(out, key=lambda i: -(i.cleared_step or 0))

    def rows(
        self,
        severity: str | None = None,
        kind: str | None = None,
        *,
        include_ahead: bool = True,
    ) -> list[Row]:
        """Every record, grouped: newest group first (a replay: the reached ones before those ahead),
        its head first, its consequences under it.

        A filter keeps a group's head when any member matches (so a consequence never appears without
        the cause it belongs to); consequences that do not match are left out.
        """

        def keep(rec: IncidentRecord) -> bool:
            inc = self.view(rec)
            if severity is not None and inc.peak_severity != severity:
                return False
            if kind is not None and inc.kind != kind:
                return False
            return include_ahead or self.reached(rec)

        groups: dict[int, list[IncidentRecord]] = {}
        for rec in self.records.values():
            head = rec.incident.group if rec.incident.group in self.records else rec.id
            groups.setdefault(head, []).append(rec)
        # a replay lists what the cursor has reached first; the groups ahead of it follow
        ordered = sorted(
            groups.items(),
            key=lambda kv: (
                any(self.reached(r) for r in kv[1]),
                max(r.incident.onset_step for r in kv[1]),
                max(r.seen for r in kv[1]),
            ),
            reverse=True,
        )
        out: list[Row] = []
        for head_id, members in ordered:
            matching = [r for r in members if keep(r)]
            if not matching:
                continue
            head = self.records[head_id]
            out.append(Row(head, False))
            rest = sorted(
                (r for r in matching if r is not head), key=lambda r: (r.incident.onset_step, r.seen)
            )
            out.extend(Row(r, True) for r in rest)
        return out

    def kinds(self) -> list[str]:
        return sorted({r.incident.kind for r in self.records.values()})

    def get(self, incident_id: int) -> IncidentRecord | None:
        return self.records.get(incident_id)

    def group_of(self, rec: IncidentRecord) -> list[IncidentRecord]:
        """The other members of this record's group (its head, or its consequences)."""
        head = rec.incident.group if rec.incident.group in self.records else rec.id
        return [
            r for r in self.records.values() if r is not rec and (r.id == head or r.incident.group == head)
        ]
