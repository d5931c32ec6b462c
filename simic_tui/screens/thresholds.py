"""The thresholds in force: the values the trainer sent, each with its reason."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Static

from simic_tui.fmt import fmt_limit, fmt_num
from simic_tui.judge import phase_of_snapshot
from simic_tui.store import TelemetryStore
from simic_tui.widgets.footer import FittedFooter
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
    """One row per threshold; the reason wraps in its column, so every row reads whole at any width."""

    BINDINGS: ClassVar = [
        Binding("escape,t", "app.pop_screen", "Back", id="thresholds_back", tooltip="Back to the dashboard"),
        # the table's own Home/End scroll sideways; here nothing is wider than the screen
        Binding("home", "first", "First", show=False, priority=True, id="thresholds_first"),
        Binding("end", "last", "Last", show=False, priority=True, id="thresholds_last"),
    ]

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self._shown: tuple[object, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(id="thresholds-title")
        yield DataTable(id="thresholds-table", cursor_type="row", zebra_stripes=True)
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        self.refresh_view()
        self.query_one(DataTable).focus()

    def on_resize(self) -> None:
        if self.is_mounted and self.query(DataTable):
            self.refresh_view()

    def action_first(self) -> None:
        self.query_one(DataTable).move_cursor(row=0)

    def action_last(self) -> None:
        table = self.query_one(DataTable)
        table.move_cursor(row=max(table.row_count - 1, 0))

    def refresh_view(self) -> None:
        snap = self.store.latest
        title = self.query_one("#thresholds-title", Static)
        table = self.query_one(DataTable)
        if snap is None:
            title.update(
                Content.styled(" Thresholds: none received yet (they arrive with the first snapshot)", "bold")
            )
            return
        thr = snap.thresholds
        values = [(f.name, _value(getattr(thr, f.name))) for f in dataclasses.fields(thr)]
        phase = phase_of_snapshot(snap)
        # every snapshot carries its own Thresholds object: rebuild (and lose the cursor's place) only
        # when a value or the width changed
        key = (tuple(values), phase, self.size.width)
        if key == self._shown:
            return
        self._shown = key
        title.update(
            Content.assemble(
                (" Thresholds in force", "bold"),
                (
                    f"  sent by the trainer (session {(self.store.session or '')[:8]}, step {snap.step}); ",
                    "$text-muted",
                ),
                (f"phase {phase.value}: explained-variance limit {fmt_num(thr.ev_limit(phase))}", "$focus"),
            )
        )
        reasons = threshold_reasons()
        name_w = max(len(n) for n, _ in values)
        value_w = min(max(len(v) for _, v in values), 24 if self.size.width >= 120 else 12)
        # three columns of one cell of padding either side, and the scrollbar
        why_w = max(self.size.width - name_w - value_w - 6 - 3, 16)
        cursor = table.cursor_row
        table.clear(columns=True)
        table.add_column("threshold", key="name", width=name_w)
        table.add_column("value", key="value", width=value_w)
        table.add_column("why", key="why", width=why_w)
        for name, value in values:
            # height None: as many lines as the wrapped reason (and value) need
            table.add_row(Text(name), Text(value), Text(reasons.get(name, "")), key=name, height=None)
        if 0 <= cursor < table.row_count:
            table.move_cursor(row=cursor, animate=False)
