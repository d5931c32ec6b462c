"""The incident log: one row per incident, grouped by cause, filterable, with a detail pane.

Rows are incidents (not per-update judgements): a group's head first, its consequences indented
under it, newest group first. The cursor stays on the same incident while rows arrive or change.
``s`` / ``k`` filter by severity / kind, ``x`` acknowledges the incident under the cursor (and its
consequences), ``X`` every incident, Enter opens the detail pane. In a replay the log lists the whole
recording's incidents; those after the cursor read ``ahead``.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Static

from simic_tui.fmt import chart, clip_words, fmt_num
from simic_tui.incidents import IncidentRecord, scope_label
from simic_tui.judge import kind_column, kind_title
from simic_tui.keys import INCIDENT_LOG_BINDINGS
from simic_tui.store import TelemetryStore
from simic_tui.widgets.cells import rich_cell
from simic_tui.widgets.footer import FittedFooter
from simic_tui.widgets.incidents import kind_scope, record_state, severity_cell, severity_style, steps_text
from telemetry_core.schema import Incident

__all__ = ["AnomalyLogScreen", "IncidentDetailScreen", "value_text"]

SEVERITIES: tuple[str | None, ...] = (None, "critical", "warning")


def value_text(value: float | None, threshold: float | None) -> str:
    """``0.41 / limit 0.15`` (either side may be missing)."""
    out = "" if value is None else fmt_num(value)
    if threshold is not None:
        out += f"{' / ' if out else ''}limit {fmt_num(threshold)}"
    return out


class AnomalyLogScreen(Screen):
    BINDINGS: ClassVar = INCIDENT_LOG_BINDINGS

    HEADERS: ClassVar[tuple[str, ...]] = (
        "severity",
        "kind (scope)",
        "count",
        "steps",
        "state",
        "peak value / limit",
        "message (Enter: whole, with what to try)",
    )
    KEYS: ClassVar[tuple[str, ...]] = ("severity", "kind", "count", "steps", "state", "value", "message")

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self.severity: str | None = None
        self.kind: str | None = None
        self._shown: tuple[object, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(id="anomalies-title")
        yield DataTable(id="anomalies-table", cursor_type="row", zebra_stripes=True)
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, key in zip(self.HEADERS, self.KEYS):
            table.add_column(label, key=key)
        self.refresh_view()
        table.focus()

    # -- drawing -------------------------------------------------------------------------------------
    def refresh_view(self) -> None:
        log = self.store.incidents
        key = (log.version, self.severity, self.kind, self.store.session)
        if key == self._shown:
            return
        self._shown = key
        rows = log.rows(self.severity, self.kind)
        heads = sum(1 for r in rows if not r.consequence)
        title = self.query_one("#anomalies-title", Static)
        filters = f"severity {self.severity or 'all'} · kind {self.kind or 'all'}"
        title.update(
            Content.assemble(
                (f" Incidents: {len(rows)}", "bold"),
                (f" in {heads} groups (of {log.total} seen), newest first · ", "$text-muted"),
                (filters, "$series"),
            )
        )
        table = self.query_one(DataTable)
        current = self.cursor_id()
        table.clear()
        app = self.app
        cells = []
        for row in rows:
            rec = row.record
            inc = log.view(rec)
            sev, style = severity_cell(inc.peak_severity if rec.id not in log.active_ids else inc.severity)
            state = record_state(log, rec)
            indent = "└ " if row.consequence else ""
            fixed = (sev, indent + kind_scope(inc), str(inc.updates_active), steps_text(inc), state)
            cells.append((rec, inc, style, (*fixed, value_text(inc.value, inc.threshold))))
        # the message gets the width the other columns leave (each has a cell of padding either side),
        # cut after a word: Enter shows it whole
        widths = [len(h) for h in self.HEADERS[:6]]
        for *_, texts in cells:
            widths = [max(w, len(t)) for w, t in zip(widths, texts)]
        room = max(self.size.width - sum(w + 2 for w in widths) - 4, 24)
        for rec, inc, style, (sev, kind, count, steps, state, value) in cells:
            table.add_row(
                rich_cell(app, sev, style),
                rich_cell(app, kind, style),
                count,
                steps,
                rich_cell(
                    app, state, "bold" if "new" in state else ("$text-muted" if state == "ahead" else "")
                ),
                value,
                Text(clip_words(inc.message or inc.peak_message, room)),  # trainer text: never markup
                key=str(rec.id),
            )
        if current is not None and str(current) in table.rows:
            table.move_cursor(row=table.get_row_index(str(current)), animate=False)

    def on_resize(self) -> None:
        self._shown = ()  # the message column follows the width
        if self.is_mounted and self.query(DataTable):
            self.refresh_view()

    def cursor_id(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return int(key.value) if key.value is not None else None

    # -- keys --------------------------------------------------------------------------------------------
    def action_detail(self) -> None:
        incident_id = self.cursor_id()
        if incident_id is not None:
            self.app.push_screen(IncidentDetailScreen(self.store, incident_id))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_detail()

    def action_acknowledge(self) -> None:
        incident_id = self.cursor_id()
        if incident_id is None:
            return
        if not self.store.incidents.acknowledge([incident_id]):
            rec = self.store.incidents.get(incident_id)
            if rec is not None and not self.store.incidents.reached(rec):
                self.notify("that incident lies ahead of the replay's cursor", timeout=3)
        self.refresh_view()

    def action_acknowledge_all(self) -> None:
        self.store.incidents.acknowledge_all()
        self.refresh_view()

    def action_filter_severity(self) -> None:
        self.severity = SEVERITIES[(SEVERITIES.index(self.severity) + 1) % len(SEVERITIES)]
        self.refresh_view()

    def action_filter_kind(self) -> None:
        kinds: list[str | None] = [None, *self.store.incidents.kinds()]
        i = kinds.index(self.kind) if self.kind in kinds else 0
        self.kind = kinds[(i + 1) % len(kinds)]
        self.refresh_view()


class IncidentDetailScreen(ModalScreen[None]):
    """One incident whole: message, value against limit, what to try, steps, its statistic's history."""

    BINDINGS: ClassVar = [
        Binding("escape,enter", "app.pop_screen", "Back", id="detail_back", tooltip="Back to the log"),
        *[b for b in INCIDENT_LOG_BINDINGS if b.id == "incident_ack"],
    ]

    def __init__(self, store: TelemetryStore, incident_id: int) -> None:
        super().__init__()
        self.store = store
        self.incident_id = incident_id

    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("happened", "What happened"),
        ("latest-message", "Latest"),
        ("peak", "At the peak"),
        ("now", "Latest value"),
        ("try", "What to try"),
        ("steps", "Steps affected"),
        ("group", "Group"),
    )

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-body", classes="modal-body"):
            yield Static(id="detail-text")
            # label | value rows: a long value wraps inside its own column (a hanging indent)
            with Grid(id="detail-fields"):
                for key, label in self.FIELDS:
                    yield Static(label, id=f"detail-label-{key}", classes="detail-label")
                    yield Static(id=f"detail-{key}", classes="detail-value")
            yield Static(id="detail-chart")
        yield FittedFooter(compact=True)

    def _field(self, key: str, value: Content | str | None) -> None:
        """Show one row (plain text: trainer text is never markup), or hide it when empty."""
        label = self.query_one(f"#detail-label-{key}", Static)
        cell = self.query_one(f"#detail-{key}", Static)
        shown = bool(value)
        label.display = cell.display = shown
        if shown:
            cell.update(value if isinstance(value, Content) else Content(str(value)))

    def on_mount(self) -> None:
        self.refresh_view()

    def on_resize(self) -> None:
        self.refresh_view()

    def action_acknowledge(self) -> None:
        self.store.incidents.acknowledge([self.incident_id])
        self.refresh_view()  # the log's version moved: the state line says it is no longer new

    def record(self) -> IncidentRecord | None:
        return self.store.incidents.get(self.incident_id)

    _drawn: tuple[int, int, int] | None = None

    def refresh_view(self) -> None:
        key = (
            self.store.incidents.version,
            self.store.version,
            self.query_one("#detail-body").content_region.width,
        )
        if key == self._drawn:  # the timer calls this 10 times a second: redraw only on news
            return
        self._drawn = key
        rec = self.record()
        text = self.query_one("#detail-text", Static)
        if rec is None:
            text.update(Content("This incident is no longer held (the log keeps the newest ones)."))
            return
        log = self.store.incidents
        inc = log.view(rec)
        glyph, style = severity_style(inc.severity)
        where = f" ({scope_label(inc.scope)})" if inc.scope else " (whole run)"
        text.update(
            Content.assemble(
                (f"{glyph} {kind_title(inc.kind)}", f"bold {style}"),
                (where, "bold"),
                (
                    f"   {inc.kind} · {inc.severity} (peak {inc.peak_severity}) · {record_state(log, rec)}",
                    "$text-muted",
                ),
            )
        )
        happened = inc.peak_message or inc.message
        self._field("happened", happened)
        self._field("latest-message", inc.message if inc.message and inc.message != happened else "")
        self._field("peak", f"{value_text(inc.value, inc.threshold) or '—'}  (step {inc.peak_step})")
        self._field("now", f"{value_text(inc.last_value, inc.last_threshold) or '—'}  (step {inc.last_step})")
        self._field("try", inc.action or "(the trainer gave no advice for this kind)")
        self._field("steps", self._steps(inc))
        members = log.group_of(rec)
        group: Content | None = None
        if members:
            head = inc.group == inc.id or inc.group not in log.records
            group = Content.assemble(
                ("heads " if head else "a consequence of ", "$text-muted"),
                ", ".join(f"{kind_scope(r.incident)} (#{r.id})" for r in members),
            )
        self._field("group", group)
        self.query_one("#detail-chart", Static).update(self._chart(inc))

    @staticmethod
    def _steps(inc: Incident) -> str:
        out = f"onset {inc.onset_step}, last judged {inc.last_step}, {inc.updates_active} update(s) judged"
        if inc.cleared_step is not None:
            out += f", cleared at {inc.cleared_step}"
        return out

    def _chart(self, inc: Incident) -> Content:
        store = self.store
        spec = kind_column(inc)
        if spec is None or not store.has(spec[0]):
            return Content.styled("\n(no history of this statistic in the store)", "$text-muted")
        column, title = spec
        axis = 8
        width = max(self.query_one("#detail-body").content_region.width - axis - 2, 10)
        values = store.series(column, width)
        present = store.present(column, width)
        steps = store.steps(width)
        limit = inc.last_threshold if inc.last_threshold is not None else inc.threshold
        marks = {limit: "limit"} if limit is not None else {}
        lines, lo, hi = chart(values, width, 6, present, marks)
        end = inc.cleared_step if inc.cleared_step is not None else inc.last_step
        span = "".join("▔" if inc.onset_step <= s <= end else " " for s in steps.tolist())
        head = f"\n{title}, last {len(values)} updates"
        if limit is not None:
            head += f"  ┈ limit {fmt_num(limit)}"
        out: list[tuple[str, str] | str] = [(head + "\n", "bold")]
        for i, row in enumerate(lines):
            tick = fmt_num(hi) if i == 0 else fmt_num(lo) if i == len(lines) - 1 else ""
            out += [(tick.rjust(axis - 1) + " ", "$text-muted"), (row + "\n", "$series")]
        first = f"step {int(steps[0])}" if len(steps) else ""
        last = f"step {int(steps[-1])}" if len(steps) else ""
        out += [
            (" " * axis, ""),
            (span + "\n", "bold $warning"),
            (
                " " * axis + first + last.rjust(max(len(span) - len(first), len(last) + 1)) + "\n",
                "$text-muted",
            ),
            (" " * axis + "▔ the incident's steps (onset to clear)", "$text-muted"),
        ]
        return Content.assemble(*out)
