"""The full anomaly log: every anomaly the store holds, newest first, scrollable."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from simic_tui.fmt import fmt_clock, fmt_num
from simic_tui.store import TelemetryStore
from simic_tui.widgets.anomalies import severity_cell
from simic_tui.widgets.cells import rich_cell

__all__ = ["AnomalyLogScreen"]


class AnomalyLogScreen(Screen):
    BINDINGS: ClassVar = [
        Binding("escape,a", "app.pop_screen", "Back", id="anomalies_back", tooltip="Back to the dashboard")
    ]

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self._shown: tuple[int, int] = (-1, -1)

    def compose(self) -> ComposeResult:
        yield Static(id="anomalies-title")
        yield DataTable(id="anomalies-table", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, key in (
            ("time", "time"),
            ("step", "step"),
            ("severity", "severity"),
            ("kind", "kind"),
            ("value / limit", "value"),
            ("message", "message"),
            ("suggested action", "action"),
        ):
            table.add_column(label, key=key)
        self.refresh_view()
        table.focus()

    def refresh_view(self) -> None:
        store = self.store
        key = (store.anomaly_total, store.count)
        if key == self._shown:
            return
        self._shown = key
        entries = store.recent_anomalies()
        title = self.query_one("#anomalies-title", Static)
        title.update(
            Content.assemble(
                (f" Anomaly log: {len(entries)}", "bold"),
                (f" held (of {store.anomaly_total} seen), newest first", "$text-muted"),
            )
        )
        table = self.query_one(DataTable)
        table.clear()
        for entry in entries:
            a = entry.anomaly
            sev, style = severity_cell(a.severity)
            value = "" if a.value is None else fmt_num(a.value)
            if a.threshold is not None:
                value += f" / {fmt_num(a.threshold)}"
            table.add_row(
                fmt_clock(entry.wall_time),
                str(a.step),
                rich_cell(self.app, sev, style),
                rich_cell(self.app, a.kind + (f" ({a.head})" if a.head else ""), style),
                value,
                a.message,
                a.action,
            )
