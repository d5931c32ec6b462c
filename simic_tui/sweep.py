"""A sweep: many trainers at once, one client and one store each, summarised one row per trainer.

``simic-tui attach H1:P1 H2:P2 ...`` (or ``--scan``: every trainer whose connection file is in the
runtime directory) builds one :class:`SweepRun` per trainer: the same
:class:`~simic_tui.client.TelemetryClient` and :class:`~simic_tui.store.TelemetryStore` a single
dashboard uses, so drilling into a run shows its full dashboard and its commands (a DEBUG lease) go to
that trainer only. Nothing here draws: :func:`row_of` reads a run's store and link into a
:class:`SweepRow`, which the sweep screen turns into a table row; sorting and filtering work on rows.

Memory is bounded per run: a sweep's stores keep ``SWEEP_CAPACITY`` updates of history each (the
drill-in dashboard's charts and sparklines need far fewer), so sixteen trainers stay well inside the
dashboard's memory budget however long they run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from simic_tui.client import LinkState, LinkStatus, TelemetryClient
from simic_tui.incidents import scope_label
from simic_tui.judge import kind_title
from simic_tui.store import TelemetryStore
from simic_tui.target import AttachTarget, TargetError, endpoint_port, resolve_target
from telemetry_core.protocol import connection_dir, read_connection_file

__all__ = [
    "BACKGROUND_RECEIVE_INTERVAL",
    "MAX_SWEEP_RUNS",
    "PANEL_INTERVAL",
    "SORT_KEYS",
    "SWEEP_CAPACITY",
    "SweepRow",
    "SweepRun",
    "filter_rows",
    "make_run",
    "row_of",
    "scan_targets",
    "sort_rows",
]

SWEEP_CAPACITY = 2_000
# Trainers one sweep holds (a client and a store each: about 7 MB apiece with a full history).
MAX_SWEEP_RUNS = 64
# Seconds between redraws of a drilled-in run's panels and header while its snapshots arrive faster
# (SimicApp.panel_interval): a full panel rebuild costs tens of ms, and at 10 updates/s a rebuild on
# every tick is most of a core once the other trainers' clients take their share (BENCHMARKS.md:
# about three times the CPU of two redraws a second). Two a second keeps a panel at most half a
# second behind its store.
PANEL_INTERVAL = 0.5
# Seconds between drains of the sockets of a run not on screen (TelemetryClient.receive_interval):
# every frame is still taken, in batches, without a poller woken per frame. Sixteen trainers at ten
# updates a second cost less than half as much CPU this way (BENCHMARKS.md); the table, redrawn once
# a second, is at most this much later. A batch of five updates stays inside the socket's receive
# queue; a longer stall backs up into the kernel's buffers and the trainer's send queue, and no
# frame is lost until that queue is full. The run drilled into is woken by each frame.
BACKGROUND_RECEIVE_INTERVAL = 0.5
_SEVERITY_RANK = {"": 0, "warning": 1, "critical": 2}
_LINK_RANK = {
    LinkState.INCOMPATIBLE: 0,
    LinkState.DISCONNECTED: 1,
    LinkState.STALE: 2,
    LinkState.CONNECTING: 3,
    LinkState.LIVE: 4,
    LinkState.REPLAY: 5,
    LinkState.FINISHED: 6,  # ended cleanly: sorts after the runs still training
}


@dataclass
class SweepRun:
    """One trainer of the sweep: where it is, its client and its store."""

    label: str  # the address as the operator gave it (or as the scan found it)
    target: AttachTarget
    store: TelemetryStore
    client: TelemetryClient
    key: str = ""  # identity for the table and the scan: the PUB endpoint
    started: bool = False  # its network worker runs


def make_run(
    target: AttachTarget,
    label: str | None = None,
    *,
    clock: Callable[[], float] | None = None,
    capacity: int = SWEEP_CAPACITY,
) -> SweepRun:
    kwargs = {"clock": clock} if clock is not None else {}
    store = TelemetryStore(capacity, **kwargs)  # type: ignore[arg-type]
    client = TelemetryClient(target, store, **kwargs)  # type: ignore[arg-type]
    client.receive_interval = BACKGROUND_RECEIVE_INTERVAL  # until it is drilled into
    return SweepRun(label or f"{target.host}:{target.port}", target, store, client, key=target.pub)


@dataclass(frozen=True)
class SweepRow:
    """What the table shows of one run (None: not known yet / not measured)."""

    key: str
    name: str
    link: str  # the link state: live, stale, disconnected, ...
    link_rank: int
    step: int | None
    planned: int | None
    level: str
    episode_return: float | None
    entropy: dict[str, float | None] = field(default_factory=dict)  # per head, normalised
    kl: float | None = None
    ev: float | None = None
    grad_norm: float | None = None
    active: int = 0
    worst: str = ""  # "", "warning", "critical"
    active_kinds: tuple[str, ...] = ()
    new: int = 0  # incidents the operator has not acknowledged
    link_detail: str = ""  # e.g. "no heartbeat for 4 s"
    label: str = ""  # the address

    @property
    def progress(self) -> float:
        if self.step is None:
            return -1.0
        return (self.step + 1) / self.planned if self.planned else float(self.step)


def _num(v: float | None) -> float | None:
    return None if v is None else float(v)


def row_of(run: SweepRun, status: LinkStatus | None = None) -> SweepRow:
    """The table row of one run, from its store and its link (never raises on a partial snapshot)."""
    store = run.store
    status = status or run.client.status
    snap = store.latest
    hb = store.last_heartbeat
    name = (snap.run.name if snap is not None else "") or (hb.run_name if hb is not None else "") or run.label
    link = status.state.value
    detail = status.detail if status.state != LinkState.LIVE else ""
    if snap is None:
        return SweepRow(
            key=run.key,
            name=name,
            link=link,
            link_rank=_LINK_RANK.get(status.state, 0),
            link_detail=detail,
            label=run.label,
            step=hb.step if hb is not None else None,
            planned=None,
            level=hb.level if hb is not None else "",
            episode_return=None,
        )
    ret = None
    if snap.episodes is not None and snap.episodes.count > 0:
        ret = snap.episodes.return_mean
    else:  # the latest update finished no episode: the last one that did
        series = store.series("episodes.return_mean", 200)
        present = store.present("episodes.return_mean", 200)
        finite = [v for v, p in zip(series.tolist(), present.tolist()) if p and math.isfinite(v)]
        ret = finite[-1] if finite else None
    pol, val, grad = snap.policy, snap.value, snap.gradients
    active = store.incidents.active()
    worst = max((i.severity for i in active), key=lambda s: _SEVERITY_RANK.get(s, 1), default="")
    kinds = tuple(
        dict.fromkeys(
            kind_title(i.kind).lower() + (f" ({scope_label(i.scope)})" if i.scope else "") for i in active
        )
    )
    badge = store.incidents.badge()
    return SweepRow(
        key=run.key,
        name=name,
        link=link,
        link_rank=_LINK_RANK.get(status.state, 0),
        link_detail=detail,
        label=run.label,
        step=snap.step,
        planned=snap.run.planned_updates,
        level=snap.level.level,
        episode_return=_num(ret),
        entropy=dict(pol.entropy_normalized) if pol is not None else {},
        kl=_num(pol.kl_k3_mean) if pol is not None else None,
        ev=_num(val.explained_variance) if val is not None else None,
        grad_norm=_num(grad.total_norm) if grad is not None else None,
        active=len(active),
        worst=worst,
        active_kinds=kinds,
        new=badge[1] if badge is not None else 0,
    )


def _k(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# The table's sortable columns: key -> (title, sort key; None: unknown, listed last either way).
SORT_KEYS: dict[str, tuple[str, Callable[[SweepRow], object]]] = {
    "name": ("run", lambda r: r.name.lower()),
    "link": ("link", lambda r: r.link_rank),
    "step": ("step", lambda r: None if r.step is None else r.progress),
    "level": ("level", lambda r: r.level or None),
    "return": ("return", lambda r: _k(r.episode_return)),
    "entropy": ("entropy", lambda r: _k(min((v for v in r.entropy.values() if v is not None), default=None))),
    "kl": ("KL", lambda r: _k(r.kl)),
    "ev": ("EV", lambda r: _k(r.ev)),
    "grad": ("grad", lambda r: _k(r.grad_norm)),
    "incidents": ("incidents", lambda r: (_SEVERITY_RANK.get(r.worst, 1), r.active, r.new)),
}


def sort_rows(rows: Iterable[SweepRow], key: str, descending: bool = False) -> list[SweepRow]:
    """Rows ordered by ``key`` (a SORT_KEYS name); unknown values last; ties keep the name order."""
    _, fn = SORT_KEYS[key]
    ordered = sorted(rows, key=lambda r: r.name.lower())
    known = [r for r in ordered if fn(r) is not None]
    unknown = [r for r in ordered if fn(r) is None]
    return sorted(known, key=fn, reverse=descending) + unknown  # type: ignore[arg-type]


def filter_rows(rows: Iterable[SweepRow], text: str) -> list[SweepRow]:
    """Rows whose name, link, level or active incident kinds contain every word of ``text``.

    ``!`` alone keeps the runs with an active incident; ``!!`` those with a critical one.
    """
    words = text.lower().split()
    out = []
    for r in rows:
        hay = " ".join([r.name, r.link, r.level, *r.active_kinds]).lower()
        ok = True
        for w in words:
            if w == "!":
                ok = ok and r.active > 0
            elif w == "!!":
                ok = ok and r.worst == "critical"
            else:
                ok = ok and w in hay
        if ok:
            out.append(r)
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # a file that names no process: let the link say whether anyone is there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scan_targets(directory: Path | None = None) -> list[tuple[str, AttachTarget]]:
    """Every trainer whose connection file is in the runtime directory (one of a live process).

    Files that cannot be read, that name another user's key material unsafely, or whose writer
    process is gone are skipped: a scan must not fill the table with every trainer that ever ran.
    A wildcard or loopback bind is attached on 127.0.0.1.
    """
    directory = directory or connection_dir()
    found: list[tuple[str, AttachTarget]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            info = read_connection_file(path)
        except (ValueError, OSError):
            continue
        if not _alive(info.pid):
            continue
        port = endpoint_port(info.pub)
        if port is None:
            continue
        host = info.pub.split("://", 1)[-1].rpartition(":")[0].strip("[]")
        if host in ("*", "0.0.0.0", "::", "", "localhost"):
            host = "127.0.0.1"
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            target = resolve_target(address, path)
        except (TargetError, PermissionError):
            continue
        found.append((info.run_name or address, target))
    return found
