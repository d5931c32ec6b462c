"""The thresholds in force: the values the trainer sent, each with its reason."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from simic_tui.fmt import fmt_limit, fmt_num
from simic_tui.judge import phase_of_snapshot
from simic_tui.store import TelemetryStore
from telemetry_core.config import threshold_reasons

__all__ = ["ThresholdsScreen"]


def _value(value: object) -> str:
    if isinstance(value, float):
        return fmt_limit(value)
    if isinstance(value, (tuple, list)):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "{}"
    return str(value)


class ThresholdsScreen(Screen):
    BINDINGS: ClassVar = [
        Binding("escape,t", "app.pop_screen", "Back", id="thresholds_back", tooltip="Back to the dashboard")
    ]

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self._version = -1

    def compose(self) -> ComposeResult:
        yield Static(id="thresholds-title")
        yield DataTable(id="thresholds-table", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("threshold", key="name")
        table.add_column("value", key="value")
        table.add_column("why", key="why")
        self.refresh_view()
        table.focus()

    def refresh_view(self) -> None:
        snap = self.store.latest
        title = self.query_one("#thresholds-title", Static)
        table = self.query_one(DataTable)
        if snap is None:
            title.update(
                Content.styled(" Thresholds: none received yet (they arrive with the first snapshot)", "bold")
            )
            return
        key = id(snap.thresholds)
        if key == self._version:
            return
        self._version = key
        phase = phase_of_snapshot(snap)
        thr = snap.thresholds
        title.update(
            Content.assemble(
                (" Thresholds in force", "bold"),
                (
                    f"  sent by the trainer (session {(self.store.session or '')[:8]}, step {snap.step}); ",
                    "$text-muted",
                ),
                (f"phase {phase.value}: explained-variance limit {fmt_num(thr.ev_limit(phase))}", "$accent"),
            )
        )
        reasons = threshold_reasons()
        table.clear()
        for f in dataclasses.fields(thr):
            table.add_row(f.name, _value(getattr(thr, f.name)), reasons.get(f.name, ""), key=f.name)
