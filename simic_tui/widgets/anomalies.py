"""The anomaly log on the dashboard (newest first); ``a`` opens the full, scrollable log."""

from __future__ import annotations

from simic_tui.fmt import fmt_clock
from simic_tui.judge import GLYPH, STYLE, Verdict
from simic_tui.store import AnomalyEntry
from simic_tui.widgets.base import Line, Panel, Rows, View

__all__ = ["AnomalyPanel", "severity_cell"]


def severity_cell(severity: str) -> tuple[str, str]:
    """Glyph + word and style of a severity (readable without colour)."""
    v = Verdict.CRIT if severity == "critical" else Verdict.WARN
    return f"{GLYPH[v]} {severity}", STYLE[v]


class AnomalyPanel(Panel):
    NUMBER = 0
    TITLE = "Anomalies"
    KEY = "anomalies"
    can_focus = False

    def data_key(self, view: View) -> object:
        """The log only changes when anomalies arrive (or a replay rolls back); not every update."""
        snap = view.snap
        return (
            view.store.anomaly_total,
            view.store.session,
            tuple((a.kind, a.severity) for a in snap.anomalies) if snap else (),
        )

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        store = view.store
        entries: list[AnomalyEntry] = store.recent_anomalies(max(self.content_region.height, 1))
        self.border_title = f"Anomalies ({store.anomaly_total})  a: full log"
        if not entries:
            rows.add(Line().label("none so far"), 1)
            return []
        wide = width >= 100
        for entry in entries:
            a = entry.anomaly
            sev, style = severity_cell(a.severity)
            kind = a.kind + (f"({a.head})" if a.head else "")
            line = Line()
            if wide:
                line.label(fmt_clock(entry.wall_time) + " ")
                line.label(f"{a.step:>6} ").add(sev.ljust(11), style).add(kind.ljust(25)[:25] + " ", style)
                line.add(a.message)
                if a.action:
                    line.label(f"  → {a.action}")
            else:
                line.label(f"{a.step:>5} ").add(f"{sev[0]} {kind} ", style).add(a.message)
            rows.add(line, 1)
        return []

    def _set_state(self, view: View, verdicts: list[Verdict]) -> None:
        snap = view.snap
        current = snap.anomalies if snap is not None else []
        crit = any(a.severity == "critical" for a in current)
        self.set_class(bool(current) and not crit, "-warn")
        self.set_class(crit, "-crit")
