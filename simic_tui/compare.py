"""Many recordings side by side: their health series aligned, a summary per run, and an incident diff.

Every recording is read through :func:`simic_tui.replay.load_recording`, the replay's hostile-safe
path (CRC-framed records, schema-checked decode, every string cleaned), so a damaged file compares
on what could be read and says what was skipped. Nothing here judges training health: the series are
the trainer's numbers, the incidents are the trainer's incidents (merged across updates by the same
:class:`~simic_tui.incidents.IncidentLog` the dashboard uses).

Runs are compared on what they share. A series (a statistic, per head or per gate where it has one)
that only some runs carry is left out of the charts and named in :attr:`Comparison.left_out`;
thresholds that differ between runs are listed in :attr:`Comparison.threshold_diffs`, since the same
number can be an incident in one run and not in the other.

The x-axis is the update (``Snapshot.step``) or the environment steps: the training loop's own count
(``Snapshot.timesteps``) when every snapshot carries it, else the sum of each update's rollout size
(``AdvantageStats.raw.count``, the number of advantages GAE computed).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simic_tui.incidents import IncidentLog, scope_label
from simic_tui.replay import LoadedRecording, ReplayError, load_recording
from telemetry_core.schema import Incident, Snapshot

__all__ = [
    "MAX_RUNS",
    "RUN_COLOURS",
    "RUN_LETTERS",
    "STATS",
    "Comparison",
    "IncidentDiff",
    "RunSummary",
    "RunTrace",
    "StatSpec",
    "align",
    "bucket",
    "build_comparison",
    "load_runs",
    "scaled_spark",
    "series_name",
    "trace_of",
    "value_range",
]

MAX_RUNS = 8
# One colour per run, the same everywhere on the screen; the letter says it again without colour.
RUN_COLOURS = ("#4ea1ff", "#ff9f43", "#2ed573", "#ff6b81", "#c56cf0", "#f6e58d", "#7bed9f", "#a4b0be")
RUN_LETTERS = "ABCDEFGH"
_BLOCKS = "▁▂▃▄▅▆▇█"


def _d(v: dict[str, float] | None) -> dict[str, float]:
    return v or {}


@dataclass(frozen=True)
class StatSpec:
    """One health statistic: its label, and how to read its value(s) from a snapshot.

    ``read`` returns ``{suffix: value}``: one entry with suffix ``""`` for a scalar, one per head or
    gate otherwise (each becomes its own series ``label[suffix]``).
    """

    key: str
    label: str
    read: Callable[[Snapshot], dict[str, float | None]]
    column: str  # the live store's column (a dict statistic: its prefix, ``.KEY`` appended)
    higher_is: str = ""  # "better" / "worse" / "": which way is healthy (decides ``worst``)

    @property
    def worst(self) -> str:
        """How a chart column that holds several updates picks one: the least healthy of them."""
        return {"worse": "max", "better": "min"}.get(self.higher_is, "")


def _policy(snap: Snapshot, name: str) -> dict[str, float | None]:
    pol = snap.policy
    return {"": getattr(pol, name)} if pol is not None else {}


def _value(snap: Snapshot, name: str) -> dict[str, float | None]:
    val = snap.value
    return {"": getattr(val, name)} if val is not None else {}


def _lstm(snap: Snapshot, name: str) -> dict[str, float | None]:
    lstm = snap.lstm
    return {"": getattr(lstm, name)} if lstm is not None else {}


def _return(snap: Snapshot) -> dict[str, float | None]:
    ep = snap.episodes
    # an update that finished no episode has no return (not a NaN one)
    return {"": ep.return_mean} if ep is not None and ep.count > 0 else {}


STATS: tuple[StatSpec, ...] = (
    StatSpec(
        "entropy",
        "entropy/log|A|",
        lambda s: dict(s.policy.entropy_normalized) if s.policy is not None else {},
        "policy.entropy_normalized",
        "better",
    ),
    StatSpec("kl", "KL k3", lambda s: _policy(s, "kl_k3_mean"), "policy.kl_k3_mean", "worse"),
    StatSpec("clip", "clip fraction", lambda s: _policy(s, "clip_fraction"), "policy.clip_fraction", "worse"),
    StatSpec(
        "ev",
        "explained var",
        lambda s: _value(s, "explained_variance"),
        "value.explained_variance",
        "better",
    ),
    StatSpec("value_loss", "value loss", lambda s: _value(s, "value_loss"), "value.value_loss"),
    StatSpec(
        "grad_norm",
        "grad norm (pre-clip)",
        lambda s: {"": s.gradients.total_norm} if s.gradients is not None else {},
        "gradients.total_norm",
    ),
    StatSpec("h_norm", "‖h‖", lambda s: _lstm(s, "h_norm"), "lstm.h_norm"),
    StatSpec("c_norm", "‖c‖", lambda s: _lstm(s, "c_norm"), "lstm.c_norm"),
    StatSpec(
        "gates",
        "gate saturation",
        lambda s: dict(_d(s.lstm.gate_saturation)) if s.lstm is not None else {},
        "lstm.gate_saturation",
        "worse",
    ),
    StatSpec("return", "episode return", _return, "episodes.return_mean", "better"),
)


def series_name(spec: StatSpec, suffix: str) -> str:
    return f"{spec.label}[{suffix}]" if suffix else spec.label


@dataclass
class RunTrace:
    """One recording's series, read once: x positions and one float64 array per series."""

    name: str  # the run's name (RunInfo.name), else the file's stem
    path: Path
    session: str
    steps: np.ndarray  # update of each snapshot
    env_steps: np.ndarray  # environment steps consumed up to and including each update (NaN: unknown)
    series: dict[str, np.ndarray]  # series name -> value per snapshot (NaN where absent/undefined)
    present: dict[str, np.ndarray]  # series name -> whether the snapshot carried it
    columns: dict[str, str]  # series name -> the live store's column of the same statistic
    incidents: list[Incident]  # every incident of the run, as last reported
    heads: dict[str, int]
    thresholds: dict[str, object]
    levels: list[str]  # level of each snapshot
    debug_seconds: float
    planned: int | None
    notice: str = ""  # what could not be read ('' when intact)

    @property
    def updates(self) -> int:
        return len(self.steps)


def trace_of(loaded: LoadedRecording) -> RunTrace:
    """Read the series of one loaded recording (every value a float; None and absence are NaN)."""
    frames = [snap for _, snap in loaded.frames]
    n = len(frames)
    series: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    columns: dict[str, str] = {}
    for i, snap in enumerate(frames):
        for spec in STATS:
            for suffix, value in spec.read(snap).items():
                name = series_name(spec, suffix)
                arr = series.get(name)
                if arr is None:
                    arr = series[name] = np.full(n, np.nan)
                    present[name] = np.zeros(n, dtype=np.bool_)
                    columns[name] = f"{spec.column}.{suffix}" if suffix else spec.column
                present[name][i] = True
                arr[i] = np.nan if value is None else float(value)
    if n and all(s.timesteps is not None for s in frames):
        # the training loop's own count (what its logger plots): recordings line up with its curves
        env_steps = np.array([s.timesteps for s in frames], dtype=np.float64)
    else:
        counts = np.array(
            [s.advantage.raw.count if s.advantage is not None else np.nan for s in frames], dtype=np.float64
        )
        # an update whose rollout size was not measured (a lower level) leaves the total unknown from there
        env_steps = np.cumsum(counts) if n else np.zeros(0)
    log = IncidentLog(capacity=100_000)
    for snap in frames:
        log.update(snap)
    last = frames[-1] if frames else None
    name = (last.run.name if last is not None else "") or loaded.path.stem
    return RunTrace(
        name=name,
        path=loaded.path,
        session=loaded.session,
        steps=np.array([s.step for s in frames], dtype=np.int64),
        env_steps=env_steps,
        series=series,
        present=present,
        columns=columns,
        incidents=[r.incident for r in log.records.values()],
        heads=dict(last.run.heads) if last is not None else {},
        thresholds=dataclasses.asdict(last.thresholds) if last is not None else {},
        levels=[s.level.level for s in frames],
        debug_seconds=last.level.debug_seconds if last is not None else 0.0,
        planned=last.run.planned_updates if last is not None else None,
        notice=loaded.notice(),
    )


def load_runs(paths: Sequence[str | Path]) -> list[RunTrace]:
    """Load 1..MAX_RUNS recordings; ReplayError names the first that cannot be compared at all."""
    if not paths:
        raise ReplayError("compare needs at least one recording")
    if len(paths) > MAX_RUNS:
        raise ReplayError(f"compare shows at most {MAX_RUNS} recordings; {len(paths)} were given")
    runs = []
    for p in paths:
        loaded = load_recording(p)
        if not loaded.frames:
            extra = f": {loaded.notice()}" if loaded.notice() else ""
            raise ReplayError(f"{p}: no snapshot could be read{extra}")
        runs.append(trace_of(loaded))
    return runs


# ---------------------------------------------------------------------------------------------
# What the screen shows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    final_return: float
    best_return: float
    updates: int
    incidents_by_kind: dict[str, int]
    debug_updates: int
    debug_seconds: float
    first_critical: Incident | None


@dataclass(frozen=True)
class IncidentDiff:
    """An incident (kind and scope) that only some runs had: where each of them first opened it."""

    kind: str
    scope: str
    onsets: dict[int, tuple[int, str]]  # run index -> (first onset step, peak severity there)
    missing: tuple[int, ...]  # run indices that never had it

    @property
    def label(self) -> str:
        return self.kind + (f" ({scope_label(self.scope)})" if self.scope else "")


@dataclass
class Comparison:
    runs: list[RunTrace]
    shared: list[tuple[StatSpec, list[str]]]  # per statistic, the series every run carries
    left_out: list[tuple[str, tuple[int, ...]]]  # series carried by only some runs: (name, runs with it)
    threshold_diffs: list[tuple[str, tuple[object, ...]]]  # field -> each run's value
    diffs: list[IncidentDiff]
    common: list[str]  # incident labels every run had
    summaries: list[RunSummary] = field(default_factory=list)
    env_steps_known: bool = True  # every run measured its rollout sizes (the env-steps axis is usable)


def _summary(run: RunTrace) -> RunSummary:
    ret = run.series.get("episode return", np.zeros(0))
    finite = ret[np.isfinite(ret)]
    by_kind = Counter(i.kind for i in run.incidents)
    crit = [i for i in run.incidents if i.peak_severity == "critical"]
    first_crit = min(crit, key=lambda i: (i.peak_step, i.id)) if crit else None
    return RunSummary(
        final_return=float(finite[-1]) if finite.size else math.nan,
        best_return=float(finite.max()) if finite.size else math.nan,
        updates=run.updates,
        incidents_by_kind=dict(sorted(by_kind.items())),
        debug_updates=sum(1 for lv in run.levels if lv == "DEBUG"),
        debug_seconds=run.debug_seconds,
        first_critical=first_crit,
    )


def _same(values: Sequence[object]) -> bool:
    first = values[0]
    for v in values[1:]:
        if isinstance(first, float) and isinstance(v, float) and math.isnan(first) and math.isnan(v):
            continue
        if v != first:
            return False
    return True


def build_comparison(runs: list[RunTrace]) -> Comparison:
    """What the runs share, what was left out, their summaries and their incident diff."""
    everyone = set(range(len(runs)))
    shared: list[tuple[StatSpec, list[str]]] = []
    left_out: list[tuple[str, tuple[int, ...]]] = []
    for spec in STATS:
        names: list[str] = []
        for run in runs:
            for name in run.series:
                if (name == spec.label or name.startswith(spec.label + "[")) and name not in names:
                    names.append(name)
        common = []
        for name in names:
            having = tuple(i for i, r in enumerate(runs) if name in r.series and r.present[name].any())
            if set(having) == everyone:
                common.append(name)
            else:
                left_out.append((name, having))
        if common:
            shared.append((spec, common))
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.thresholds if k not in keys)
    threshold_diffs = []
    for k in keys:
        values = tuple(r.thresholds.get(k) for r in runs)
        if not _same(values):
            threshold_diffs.append((k, values))
    first: dict[tuple[str, str], dict[int, tuple[int, str]]] = {}
    for i, run in enumerate(runs):
        for inc in sorted(run.incidents, key=lambda x: x.onset_step):
            key = (inc.kind, inc.scope)
            have = first.setdefault(key, {})
            if i not in have:
                have[i] = (inc.onset_step, inc.peak_severity)
            elif inc.peak_severity == "critical":
                have[i] = (have[i][0], "critical")
    diffs = []
    common_labels = []
    for (kind, scope), onsets in sorted(first.items(), key=lambda kv: min(s for s, _ in kv[1].values())):
        missing = tuple(sorted(everyone - onsets.keys()))
        d = IncidentDiff(kind, scope, dict(sorted(onsets.items())), missing)
        if missing:
            diffs.append(d)
        else:
            common_labels.append(d.label)
    return Comparison(
        runs=runs,
        shared=shared,
        left_out=left_out,
        threshold_diffs=threshold_diffs,
        diffs=diffs,
        common=common_labels,
        summaries=[_summary(r) for r in runs],
        env_steps_known=all(r.updates == 0 or bool(np.isfinite(r.env_steps).all()) for r in runs),
    )


# ---------------------------------------------------------------------------------------------
# Alignment and drawing helpers (pure: the screen turns their output into coloured text)
# ---------------------------------------------------------------------------------------------


def align(xs: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, float, float]:
    """Column edges shared by every run over the union of their x ranges.

    Returns (edges, low, high): ``len(edges) - 1`` columns. When the runs have no more distinct x
    values than ``width``, each value gets its own column (no blank columns between updates);
    otherwise ``width`` equal buckets. Aligning on a common axis (rather than each run's own index)
    is what makes "update 40 in run A" sit above "update 40 in run B".
    """
    finite = [x[np.isfinite(x)] for x in xs]
    finite = [f for f in finite if f.size]
    if not finite or width <= 0:
        return np.zeros(max(width, 0) + 1), 0.0, 0.0
    union = np.unique(np.concatenate(finite))
    lo, hi = float(union[0]), float(union[-1])
    if union.size <= width:
        mids = (union[1:] + union[:-1]) / 2
        return np.r_[union[0], mids, union[-1] + 1.0], lo, hi
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, width + 1), lo, hi


def bucket(
    x: np.ndarray, values: np.ndarray, have: np.ndarray, edges: np.ndarray, worst: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Each column's value and whether any snapshot fell in it.

    Where several updates share a column, ``worst`` decides which one stands for them: "max" (a
    statistic where higher is worse: one KL spike must not vanish between two calm updates), "min"
    (higher is better: an entropy dip), else the latest. A non-finite value wins its column (drawn
    ``×``: a NaN gradient must show); an empty column is ``filled`` False (drawn blank).
    """
    width = len(edges) - 1
    out = np.full(max(width, 0), np.nan)
    filled = np.zeros(max(width, 0), dtype=np.bool_)
    if width <= 0 or x.size == 0:
        return out, filled
    ok = np.isfinite(x) & have
    xs, vals = x[ok], values[ok].astype(np.float64)
    if xs.size == 0:
        return out, filled
    order = np.argsort(xs, kind="stable")
    xs, vals = xs[order], vals[order]
    vals[~np.isfinite(vals)] = np.nan  # +-inf and NaN alike: "not a number the chart can place"
    cols = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, width - 1)
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    used = cols[starts]
    if worst == "max":
        out[used] = np.maximum.reduceat(vals, starts)  # NaN propagates: a NaN in the column shows
    elif worst == "min":
        out[used] = np.minimum.reduceat(vals, starts)
    else:
        ends = np.r_[starts[1:], len(vals)] - 1
        last = vals[ends]
        has_nan = np.maximum.reduceat(np.isnan(vals).astype(np.int8), starts) > 0
        last[has_nan] = np.nan
        out[used] = last
    filled[used] = True
    return out, filled


def value_range(columns: Sequence[np.ndarray]) -> tuple[float, float]:
    """The finite min/max over every run's columns (one scale per statistic: runs are comparable)."""
    vals = [c[np.isfinite(c)] for c in columns]
    vals = [v for v in vals if v.size]
    if not vals:
        return 0.0, 0.0
    return float(min(v.min() for v in vals)), float(max(v.max() for v in vals))


def scaled_spark(columns: np.ndarray, filled: np.ndarray, lo: float, hi: float) -> str:
    """Block characters on a given scale: ``×`` a non-finite value, blank a column with no snapshot."""
    out = []
    span = hi - lo
    top = len(_BLOCKS) - 1
    for v, here in zip(columns.tolist(), filled.tolist()):
        if not here:
            out.append(" ")
        elif not math.isfinite(v):
            out.append("×")
        elif span <= 0:
            out.append(_BLOCKS[top // 2])
        else:
            out.append(_BLOCKS[max(0, min(top, round((v - lo) / span * top)))])
    return "".join(out)
