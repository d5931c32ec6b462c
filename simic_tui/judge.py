"""Verdicts (ok / warning / critical) for every value the dashboard colours.

Every limit comes from the :class:`~telemetry_core.config.Thresholds` that travel inside each
snapshot, so the dashboard and the trainer's anomaly detector can never disagree; this module holds
no number of its own. Besides colour, each verdict has a glyph and, for alarms, a word, so the screen
reads the same with ``NO_COLOR`` set.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable

from telemetry_core.config import Phase, Thresholds
from telemetry_core.kinds import panel_kinds
from telemetry_core.schema import Anomaly, Snapshot

__all__ = [
    "GLYPH",
    "PANEL_KINDS",
    "STYLE",
    "Verdict",
    "anomaly_verdict",
    "grad_total",
    "judge_entropy",
    "judge_ev",
    "judge_high",
    "judge_kl",
    "judge_low",
    "judge_nonfinite_count",
    "judge_ratio_max",
    "judge_ratio_min",
    "kind_panel",
    "max_grad_norm_of",
    "panel_anomalies",
    "phase_of_snapshot",
    "worst",
]


class Verdict(enum.IntEnum):
    NA = -1  # not measured / undefined
    OK = 0
    WARN = 1
    CRIT = 2


STYLE = {Verdict.NA: "$text-muted", Verdict.OK: "", Verdict.WARN: "$warning", Verdict.CRIT: "bold $error"}
GLYPH = {Verdict.NA: "", Verdict.OK: "", Verdict.WARN: "▲", Verdict.CRIT: "✖"}

# Which panel an anomaly kind belongs to (its border changes while the kind fires): each kind's
# spec in the registry says it.
PANEL_KINDS: dict[str, tuple[str, ...]] = panel_kinds()


def kind_panel(kind: str) -> str | None:
    for panel, kinds in PANEL_KINDS.items():
        if kind in kinds:
            return panel
    return None


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, default=Verdict.NA)


def _bad(value: float | None) -> Verdict | None:
    """NA for missing, CRIT for non-finite (a NaN statistic is always a broken update), else None."""
    if value is None:
        return Verdict.NA
    if not math.isfinite(value):
        return Verdict.CRIT
    return None


def judge_high(value: float | None, warn: float | None = None, crit: float | None = None) -> Verdict:
    """Higher is worse: critical above ``crit``, warning above ``warn``."""
    bad = _bad(value)
    if bad is not None:
        return bad
    assert value is not None
    if crit is not None and value > crit:
        return Verdict.CRIT
    if warn is not None and value > warn:
        return Verdict.WARN
    return Verdict.OK


def judge_low(value: float | None, warn: float | None = None, crit: float | None = None) -> Verdict:
    """Lower is worse: critical below ``crit``, warning below ``warn``."""
    bad = _bad(value)
    if bad is not None:
        return bad
    assert value is not None
    if crit is not None and value < crit:
        return Verdict.CRIT
    if warn is not None and value < warn:
        return Verdict.WARN
    return Verdict.OK


def judge_nonfinite_count(count: int | None) -> Verdict:
    if count is None:
        return Verdict.NA
    return Verdict.CRIT if count > 0 else Verdict.OK


def alarm_word(value: float | None, verdict: Verdict, word: str) -> str:
    """``word`` (SPIKE, COLLAPSE, EXPLOSION...) for a finite value judged critical, else "".

    A NaN or infinite statistic is red too, but it is numerical instability, not the alarm its
    panel names: the panel must not say more than the detector does.
    """
    return word if verdict == Verdict.CRIT and value is not None and math.isfinite(value) else ""


def judge_entropy(thr: Thresholds, head: str, value: float | None) -> Verdict:
    """Normalised entropy of one head against its collapse limit and the common warning level."""
    return judge_low(value, warn=thr.entropy_warning, crit=thr.entropy_limit(head))


def judge_kl(thr: Thresholds, value: float | None) -> Verdict:
    return judge_high(value, warn=thr.kl_spike_warning, crit=thr.kl_spike_critical)


def judge_ratio_max(thr: Thresholds, value: float | None) -> Verdict:
    """The detector's own limits: yellow past ``ratio_explosion`` (its warning), red past
    ``ratio_explosion_critical``. A healthy recurrent PPO with 4 epochs routinely reaches a max ratio
    of 2 on some sample, so a tighter display-only limit would paint healthy runs yellow."""
    return judge_high(value, warn=thr.ratio_explosion, crit=thr.ratio_explosion_critical)


def judge_ratio_min(thr: Thresholds, value: float | None) -> Verdict:
    """Yellow below ``ratio_collapse`` (the detector's warning), red below ``ratio_collapse_critical``."""
    return judge_low(value, warn=thr.ratio_collapse, crit=thr.ratio_collapse_critical)


def anomaly_verdict(anomaly: Anomaly) -> Verdict:
    return Verdict.CRIT if anomaly.severity == "critical" else Verdict.WARN


def phase_of_snapshot(snap: Snapshot) -> Phase:
    try:
        return Phase(snap.phase)
    except ValueError:
        return Phase.MID


def judge_ev(thr: Thresholds, snap: Snapshot, value: float | None) -> Verdict:
    """Explained variance below the current phase's limit is a warning (ev_low is never critical)."""
    return judge_low(value, warn=thr.ev_limit(phase_of_snapshot(snap)))


def max_grad_norm_of(snap: Snapshot) -> float | None:
    """The loop's clipping cap, from the gradient stats or the run info."""
    for value in (
        getattr(snap.gradients, "max_grad_norm", None) if snap.gradients else None,
        snap.run.max_grad_norm,
    ):
        if value is not None and math.isfinite(value) and value > 0:
            return value
    return None


def grad_total(thr: Thresholds, snap: Snapshot, value: float | None) -> Verdict:
    """Pre-clip total norm relative to the cap: exploding (warning/critical) or vanishing (warning)."""
    bad = _bad(value)
    if bad is not None:
        return bad
    cap = max_grad_norm_of(snap)
    if cap is None:
        return Verdict.OK
    high = judge_high(
        value, warn=thr.grad_total_exploding_rel * cap, crit=thr.grad_total_exploding_critical_rel * cap
    )
    if high != Verdict.OK:
        return high
    return judge_low(value, warn=thr.grad_total_vanishing_rel * cap)


def panel_anomalies(snap: Snapshot | None, panel: str) -> list[Anomaly]:
    """Anomalies of this snapshot that belong to ``panel``, critical first."""
    if snap is None:
        return []
    kinds = PANEL_KINDS.get(panel, ())
    found = [a for a in snap.anomalies if a.kind in kinds]
    return sorted(found, key=lambda a: a.severity != "critical")
