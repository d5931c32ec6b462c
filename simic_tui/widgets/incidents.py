"""How an incident reads everywhere: the header badge, the dashboard's strip, the log and its detail.

Trainer text (messages, actions) is untrusted: it is only ever placed in ``Content``/``Text`` as
plain text, never parsed as markup.
"""

from __future__ import annotations

from simic_tui.incidents import IncidentLog, IncidentRecord, scope_label
from simic_tui.judge import GLYPH, STYLE, Verdict, kind_title
from telemetry_core.schema import Incident, IncidentEvent

__all__ = [
    "badge_parts",
    "incident_toast",
    "kind_scope",
    "record_state",
    "severity_cell",
    "severity_style",
    "steps_text",
]


def severity_style(severity: str) -> tuple[str, str]:
    """Glyph and style of a severity (readable without colour)."""
    v = Verdict.CRIT if severity == "critical" else Verdict.WARN
    return GLYPH[v], STYLE[v]


def severity_cell(severity: str) -> tuple[str, str]:
    """Glyph + word and style of a severity."""
    glyph, style = severity_style(severity)
    return f"{glyph} {severity}", style


def kind_scope(incident: Incident) -> str:
    """``entropy_collapse (force)``; the whole run's incidents carry no scope."""
    return incident.kind + (f" ({scope_label(incident.scope)})" if incident.scope else "")


def steps_text(incident: Incident) -> str:
    """First–last step of the incident (one step when it lasted one update)."""
    if incident.last_step > incident.onset_step:
        return f"{incident.onset_step}–{incident.last_step}"
    return str(incident.onset_step)


def badge_parts(log: IncidentLog) -> list[tuple[str, str]]:
    """``✖ 2 active · 1 new``: in the worst severity's colour, until everything is acknowledged."""
    badge = log.badge()
    if badge is None:
        return []
    active, new, worst = badge
    glyph, style = severity_style(worst)
    if not active:  # only history is unacknowledged: no alarm colour while nothing is wrong
        glyph, style = "✓", "bold"
    text = f"{glyph} {active} active"
    if new:
        text += f" · {new} new"
    return [(text, f"{style} reverse" if new and active else style)]


def record_state(log: IncidentLog, rec: IncidentRecord) -> str:
    """The state column: active / cleared at S / ahead, with ``new`` while unacknowledged."""
    state = log.state_of(rec)
    return f"{state} · new" if log.is_new(rec) else state


def incident_toast(events: list[IncidentEvent]) -> tuple[str, str]:
    """One toast for onsets/upgrades that arrived together: (message, textual severity).

    One event names its incident and the first line of its message; several are summarised by
    group (the head's words and how many consequences came with it)."""
    critical = any(e.incident.severity == "critical" for e in events)
    severity = "error" if critical else "warning"
    glyph = severity_style("critical" if critical else "warning")[0]
    if len(events) == 1:
        e = events[0]
        inc = e.incident
        what = "now critical" if e.event == "upgrade" else inc.severity
        where = f" ({scope_label(inc.scope)})" if inc.scope else ""
        message = _first_words(inc.message or inc.peak_message, 100)
        return f"{glyph} {kind_title(inc.kind)}{where} {what} at step {e.step}: {message}  (a: log)", severity
    ids = {e.incident.id for e in events}
    heads: dict[int, list[IncidentEvent]] = {}
    for e in events:
        group = e.incident.group if e.incident.group in ids else e.incident.id
        heads.setdefault(group, []).append(e)
    parts = []
    for group, members in heads.items():
        head = next((m for m in members if m.incident.id == group), members[0]).incident
        where = f" ({scope_label(head.scope)})" if head.scope else ""
        more = f" +{len(members) - 1} consequence(s)" if len(members) > 1 else ""
        parts.append(f"{kind_title(head.kind)}{where}{more}")
    steps = sorted({e.step for e in events})
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    return f"{glyph} {len(events)} incidents at {at}: {', '.join(parts)}  (a: log)", severity


def _first_words(text: str, limit: int) -> str:
    """The start of a message for a toast, cut at a word (the log's detail pane has it whole)."""
    line = text.split("\n", 1)[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " …"
