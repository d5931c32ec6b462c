"""Verdicts (ok / warning / critical) for every value the dashboard colours.

Every limit comes from the :class:`~telemetry_core.config.Thresholds` that travel inside each
snapshot, so the dashboard and the trainer's anomaly detector can never disagree; this module holds
no number of its own. Besides colour, each verdict has a glyph and, for alarms, a word, so the screen
reads the same with ``NO_COLOR`` set.

Alarms come from the trainer's incidents only (:class:`Alarms`): a value is marked critical (✖) or
named with an alarm word only while an incident of its kind is active. Without one, a value past a
limit of the ``Thresholds`` (the numbers the ``t`` screen lists) is marked ▲ at most, and a
non-finite value is plain: the panel never says more than the incident layer does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from telemetry_core.config import Phase, Thresholds
from telemetry_core.kinds import SPECS, panel_kinds
from telemetry_core.schema import Incident, Snapshot

__all__ = [
    "GLYPH",
    "KIND_COLUMNS",
    "PANEL_KINDS",
    "STYLE",
    "Alarms",
    "Mark",
    "Verdict",
    "grad_total",
    "incident_verdict",
    "judge_entropy",
    "judge_ev",
    "judge_high",
    "judge_kl",
    "judge_low",
    "judge_nonfinite_count",
    "judge_ratio_max",
    "judge_ratio_min",
    "kind_column",
    "kind_panel",
    "kind_title",
    "max_grad_norm_of",
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


def kind_title(kind: str) -> str:
    """Panel-title words of a kind (the registry's); an unknown kind (a newer trainer) by its name."""
    spec = SPECS.get(kind)
    return spec.title if spec is not None else kind.replace("_", " ").upper()


# The store column each kind is judged on (the detail pane charts it with the incident's limit).
# "{head}" is the incident's head for head-scoped incidents.
KIND_COLUMNS: dict[str, tuple[str, str]] = {
    "entropy_collapse": ("policy.entropy_normalized.{head}", "normalised entropy ({head})"),
    "std_collapse": ("policy.log_std_mean.{head}", "mean log-std ({head})"),
    "std_explosion": ("policy.log_std_mean.{head}", "mean log-std ({head})"),
    "action_saturation": ("policy.action_saturation_max.{head}", "actions beyond bounds, worst dimension ({head})"),
    "kl_spike": ("policy.kl_k3_mean", "KL k3 mean"),
    "ratio_explosion": ("policy.ratio_max", "max ratio"),
    "ratio_collapse": ("policy.ratio_min", "min ratio"),
    "value_collapse": ("value.value_std", "σ(values)"),
    "ev_low": ("value.explained_variance", "explained variance"),
    "numerical_instability": ("gradients.nan_count", "NaN gradient elements"),
    "gradient_exploding": ("gradients.total_norm", "pre-clip gradient norm"),
    "gradient_vanishing": ("gradients.total_norm", "pre-clip gradient norm"),
    "gradient_drift": ("gradients.ema_drift", "gradient-norm drift"),
    "lstm_unhealthy": ("lstm.c_norm", "‖c‖ (cell state norm)"),
    "performance_degradation": ("episodes.return_mean", "episode return (mean)"),
}


# Kinds judged per head whose whole-run incidents are about another statistic.
RUN_COLUMNS: dict[str, tuple[str, str]] = {"entropy_collapse": ("policy.entropy_coef", "entropy coefficient")}


def kind_column(incident: Incident) -> tuple[str, str] | None:
    """(store column, title) of the statistic an incident is about, or None."""
    spec = KIND_COLUMNS.get(incident.kind)
    if spec is None:
        return None
    column, title = spec
    if "{head}" in column:
        if not incident.scope.startswith("head:"):
            # the whole run's entropy_collapse is the loss's own sign: the coefficient the loop reported
            return RUN_COLUMNS.get(incident.kind)
        head = incident.scope[5:]
        column, title = column.format(head=head), title.format(head=head)
    return column, title


def incident_verdict(incident: Incident) -> Verdict:
    return Verdict.CRIT if incident.severity == "critical" else Verdict.WARN


@dataclass(frozen=True)
class Mark:
    """What a value shows: its verdict (colour and glyph) and an alarm word ("" for none)."""

    verdict: Verdict
    word: str = ""


def _severity_order(incident: Incident) -> tuple[bool, int]:
    return (incident.severity != "critical", -incident.onset_step)


class Alarms:
    """The active incidents of one snapshot by kind: the one source of every alarm a panel shows."""

    def __init__(self, incidents: Iterable[Incident] = ()) -> None:
        self.by_kind: dict[str, list[Incident]] = {}
        for inc in incidents:
            self.by_kind.setdefault(inc.kind, []).append(inc)
        for found in self.by_kind.values():
            found.sort(key=_severity_order)

    @classmethod
    def of(cls, snap: Snapshot | None) -> Alarms:
        return cls(snap.incidents if snap is not None else ())

    def of_kinds(self, kinds: Iterable[str]) -> list[Incident]:
        """Active incidents of these kinds, critical first, then the newest."""
        found = [inc for k in kinds for inc in self.by_kind.get(k, ())]
        return sorted(found, key=_severity_order)

    def find(self, kinds: Iterable[str], head: str | None = None) -> Incident | None:
        """The worst active incident of ``kinds``; with ``head``, only the whole run's or that head's."""
        for inc in self.of_kinds(kinds):
            if head is None or not inc.scope.startswith("head:") or inc.scope == f"head:{head}":
                return inc
        return None

    def mark(
        self,
        verdict: Verdict,
        kinds: Iterable[str] = (),
        *,
        head: str | None = None,
        value: float | None = None,
        word: str = "",
        at_most: Verdict = Verdict.WARN,
        limit: float | None = None,
    ) -> Mark:
        """A value's mark: an active incident of ``kinds`` sets it (and allows ``word`` when the value
        is past its limit too); without one, the limit verdict is capped at ``at_most`` (▲), and
        ``limit`` (the Thresholds number the verdict came from) is shown beside a ▲ the way the ``t``
        screen lists it, so every mark without an incident names the limit it stands for."""
        kinds = tuple(kinds)
        if value is not None and not math.isfinite(value):
            # NaN/inf: red only while an incident stands behind it (numerical_instability or its own)
            inc = self.find((*kinds, "numerical_instability"), head)
            return Mark(incident_verdict(inc) if inc is not None else Verdict.OK)
        inc = self.find(kinds, head) if kinds else None
        if inc is not None:
            return Mark(incident_verdict(inc), word if verdict >= Verdict.WARN else "")
        if verdict == Verdict.NA:
            return Mark(Verdict.NA)
        capped = min(verdict, at_most)
        note = f"limit {limit:g}" if limit is not None and capped >= Verdict.WARN else ""
        return Mark(capped, note)
