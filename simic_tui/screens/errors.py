"""The trainer's telemetry errors (``e``): the latest messages whole, wrapped, newest first.

The hub swallows an exception inside telemetry so that training goes on, and counts it; each
snapshot carries the count and the latest message (one line). The header shows the count; this
screen shows the last few distinct messages in full, so a run whose panels look broken (NaN markers
from a mask the statistics could not apply) can be told apart from a run that really blew up.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from simic_tui.fmt import fmt_count
from simic_tui.sanitize import clean_text
from simic_tui.store import TelemetryStore
from simic_tui.widgets.footer import FittedFooter

__all__ = ["TelemetryErrorsScreen", "error_lines"]


def error_lines(store: TelemetryStore) -> Content:
    """The count, what it means, then each recent message (sanitised: trainer text is never markup)."""
    snap = store.latest
    total = snap.counters.telemetry_errors if snap is not None else 0
    notes = store.telemetry_error_notes()
    if not total and not notes:
        return Content.styled("No telemetry errors: the trainer has reported none.", "bold")
    parts: list[Content] = [
        Content.assemble(
            (f"⚠ {fmt_count(total)} telemetry error{'s' if total != 1 else ''}", "bold $warning"),
            (" swallowed by the trainer so that training goes on.", "bold"),
        ),
        Content.styled(
            "Statistics whose computation failed are missing or NaN on the panels: that is telemetry "
            "failing, not training diverging. Latest message first:",
            "$text-muted",
        ),
    ]
    for note in notes:
        parts.append(Content(""))
        parts.append(
            Content.styled(
                f"at step {note.step} ({fmt_count(note.count)} error{'s' if note.count != 1 else ''} by then)",
                "$text-muted",
            )
        )
        parts.append(Content(clean_text(note.message)))  # wraps in the Static, whole
    return Content("\n").join(parts)


class TelemetryErrorsScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [
        Binding(
            "escape,e,q", "dismiss", "Close", id="telemetry_errors_close", tooltip="Close the error messages"
        ),
    ]

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self._shown: object = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="errors-body", classes="modal-body"):
            yield Static(Content.styled("Telemetry errors  (Esc closes)", "bold"), id="errors-title")
            yield Static(id="errors-text")
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        self.refresh_view()

    def refresh_view(self) -> None:
        snap = self.store.latest
        key = (
            snap.counters.telemetry_errors if snap is not None else 0,
            tuple(self.store.telemetry_error_notes()),
        )
        if key != self._shown:
            self._shown = key
            self.query_one("#errors-text", Static).update(error_lines(self.store))

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
