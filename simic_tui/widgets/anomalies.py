"""The incident strip on the dashboard: one row per incident, newest group first; ``a`` opens the log.

A group (incidents that opened together) is headed by its most upstream incident, its consequences
indented under it, so one cause reads as one alarm. Kind, scope, severity, count, steps and state
come first and are never cut; the message follows in what width is left (the log's detail pane
shows it whole).
"""

from __future__ import annotations

from simic_tui.fmt import clip_words
from simic_tui.judge import Verdict, incident_verdict
from simic_tui.widgets.base import Line, Panel, Rows, View
from simic_tui.widgets.incidents import kind_scope, record_state, severity_style, steps_text

__all__ = ["AnomalyPanel"]


class AnomalyPanel(Panel):
    NUMBER = 0
    TITLE = "Incidents"
    KEY = "anomalies"
    can_focus = False

    def data_key(self, view: View) -> object:
        """The strip changes when an incident or the cursor's position does, not every update."""
        return (view.store.incidents.version, view.store.session)

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        log = view.store.incidents
        shown = log.rows(include_ahead=False)
        heads = sum(1 for r in shown if not r.consequence)
        title = f"Incidents ({len(shown)} in {heads} groups)"
        if width >= 60:
            title += "  a: log · X: acknowledge all"
        self.border_title = title
        if not shown:
            rows.add(Line().label("none so far"), 1)
            return []
        wide = width >= 70
        kind_w = min(max(len(kind_scope(r.record.incident)) for r in shown) + 2, 40) if wide else 0
        for i, row in enumerate(shown):
            inc = log.view(row.record)
            active = row.record.id in log.active_ids
            glyph, style = severity_style(inc.severity if active else inc.peak_severity)
            if not active:  # history: alarm colours are for what is wrong now
                style = "$text-muted"
            line = Line()
            line.add(("  └ " if wide else "└") if row.consequence else "", "$text-muted")
            line.add(f"{glyph} ", style)
            name = kind_scope(inc)
            state = record_state(log, row.record)
            state_style = "bold" if "new" in state else "$text-muted"
            if not wide:
                # narrow: the kind whole, then the state shortened by rule until the row fits
                # ("40 cleared at 43 · new" -> "40 cleared 43 · new" -> "40 cleared at 43" -> ... "cleared");
                # the log has the rest
                line.add(name + " ", style)
                steps = steps_text(inc) + " "
                short = state.split(" · ")[0]
                options = (
                    steps + state,
                    steps + state.replace(" at ", " "),
                    steps + short,
                    short.replace(" at ", " "),
                    short.split(" ")[0],
                )
                # none fits beside a long kind and scope: no state rather than a word cut mid-way
                # (the glyph's colour still tells active from history)
                fits = next((o for o in options if line.width + len(o) <= width), "")
                rows.add(line.add(fits, state_style), 1 + i / 1000)
                continue
            line.add(name.ljust(max(kind_w - (4 if row.consequence else 0), len(name) + 1)), style)
            line.label(f"×{inc.updates_active} ".rjust(6)).add(steps_text(inc).ljust(10))
            line.add(state.ljust(22), state_style)
            message = inc.message or inc.peak_message
            if message:  # prose: cut after a word, the log's detail pane has it whole
                line.add(clip_words(message, width - line.width))
            rows.add(line, 1 + i / 1000)
        return []

    def _set_state(self, view: View, verdicts: list[Verdict]) -> None:
        active = view.alarms.of_kinds(view.alarms.by_kind)
        state = incident_verdict(active[0]) if active else Verdict.OK
        self.set_class(state == Verdict.WARN, "-warn")
        self.set_class(state == Verdict.CRIT, "-crit")
