"""The per-rank spread of a multi-rank run (``Snapshot.ranks``), as the header, the Gradients panel
and the Ranks screen show it.

The trainer judges the ranks (telemetry_core.distributed: ``rank_divergence`` anomalies carry the
rank, ``RankStats.flags`` the statistics each rank was flagged on); this module only words it: one
short tag per flagged rank (``✖ r2 NaN``, ``▲ r3 slow``) with the anomaly's severity, so it reads the
same without colour. Nothing is shown for a single-process run.
"""

from __future__ import annotations

import math

from simic_tui.fmt import fmt_num
from simic_tui.judge import GLYPH, STYLE, Verdict
from simic_tui.widgets.base import Line, Rows
from telemetry_core.schema import RankStats, Snapshot

__all__ = ["RankFlag", "key_label", "rank_flags", "rank_rows", "ranks_of", "span"]

L = 10  # label width, as in the panels

_LABELS = {
    "grad_norm": "‖g‖",
    "grad_nan": "NaN",
    "grad_inf": "Inf",
    "kl": "KL",
    "policy_loss": "π loss",
    "value_loss": "V loss",
    "update_seconds": "update s",
    "rollout_seconds": "rollout s",
}


def key_label(key: str) -> str:
    """Short column name of a RankStats key."""
    if key.startswith("entropy."):
        return "H " + key.removeprefix("entropy.")
    return _LABELS.get(key, key)


def ranks_of(snap: Snapshot | None) -> RankStats | None:
    """The snapshot's rank statistics when it comes from a multi-rank run, else None."""
    if snap is None or snap.ranks is None or snap.ranks.world_size <= 1:
        return None
    return snap.ranks


class RankFlag:
    """One flagged rank: its number, verdict (from its incident's severity) and a one-word reason."""

    __slots__ = ("rank", "verdict", "word")

    def __init__(self, rank: int, verdict: Verdict, word: str) -> None:
        self.rank, self.verdict, self.word = rank, verdict, word

    def text(self) -> str:
        return f"{GLYPH[self.verdict]} r{self.rank} {self.word}"


def rank_flags(snap: Snapshot) -> list[RankFlag]:
    """Flagged ranks, critical first, then by rank."""
    rs = ranks_of(snap)
    if rs is None:
        return []
    # the severity is the rank's active rank_divergence incident's (the panel never raises its own)
    severity = {
        i.scope[5:]: i.severity
        for i in snap.incidents
        if i.kind == "rank_divergence" and i.scope.startswith("rank:")
    }
    flagged = sorted(set(rs.divergent_ranks) | set(rs.straggler_ranks))
    out: list[RankFlag] = []
    for r in flagged:
        keys = [k for k, ranks in rs.flags.items() if r in ranks]
        nonfinite = any(
            not math.isfinite(rs.per_rank[k][r]) for k in keys if k in rs.per_rank and r < len(rs.per_rank[k])
        )
        if "grad_nan" in keys or "grad_inf" in keys or nonfinite:
            word = "NaN"
        elif r in rs.divergent_ranks:
            word = key_label(next((k for k in keys if k != rs.straggle_key), keys[0] if keys else "?"))
        else:
            word = "slow"
        crit = severity.get(str(r)) == "critical"
        out.append(RankFlag(r, Verdict.CRIT if crit else Verdict.WARN, word))
    return sorted(out, key=lambda f: (-f.verdict, f.rank))


def span(rs: RankStats, key: str) -> str:
    """``min…max`` of a statistic over the ranks with a finite value."""
    lo, hi = rs.min.get(key, math.nan), rs.max.get(key, math.nan)
    if lo == hi or not (math.isfinite(lo) and math.isfinite(hi)):
        return fmt_num(hi if math.isfinite(hi) else lo)
    return f"{fmt_num(lo)}…{fmt_num(hi)}"


def rank_rows(rows: Rows, snap: Snapshot, width: int) -> list[Verdict]:
    """The Gradients panel's rank rows: flagged ranks first, then the spread of the key statistics."""
    rs = ranks_of(snap)
    if rs is None:
        return []
    line = Line().label("ranks", L).add(f"{rs.world_size}", "bold")
    if not rs.enabled:
        line.add(f" {GLYPH[Verdict.WARN]} aggregation off: ", STYLE[Verdict.WARN]).label(rs.disabled_reason)
        rows.add(line, 1)
        return [Verdict.WARN]
    flags = rank_flags(snap)
    for f in flags:
        line.add("  ").add(f.text(), STYLE[f.verdict])
    if not flags:
        line.label("  agree")
    line.label("  ‖g‖ ").add(span(rs, "grad_norm"))
    if width >= 70:
        line.label("  r: per rank")
    rows.add(line, 1)
    more = Line().label("", L).label("KL ").add(span(rs, "kl"))
    if rs.straggle_key:
        more.label("  " + key_label(rs.straggle_key).replace(" s", " ")).add(span(rs, rs.straggle_key) + " s")
    rows.add(more, 4)
    return [f.verdict for f in flags]
