"""Replay: go to a step (``g``). A small modal with one input; Enter jumps, Esc cancels."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

__all__ = ["GotoStepScreen", "parse_step"]


def parse_step(text: str) -> int | None:
    """A step number the operator typed (spaces and thousands separators allowed), or None."""
    cleaned = text.strip().replace(",", "").replace("_", "").replace(" ", "")
    if not cleaned or not cleaned.lstrip("-").isdigit():
        return None
    return int(cleaned)


class GotoStepScreen(ModalScreen[int | None]):
    BINDINGS: ClassVar = [
        Binding("escape", "cancel", "Cancel", id="goto_cancel", tooltip="Close without moving")
    ]

    def __init__(self, first: int, last: int) -> None:
        super().__init__()
        self.first, self.last = first, last

    def compose(self) -> ComposeResult:
        with Vertical(id="goto-body", classes="modal-body"):
            yield Static(f"Go to step ({self.first}–{self.last}), Enter jumps, Esc cancels", id="goto-title")
            yield Input(placeholder=str(self.first), id="goto-input", type="integer")
            yield Static("", id="goto-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        step = parse_step(event.value)
        if step is None:
            self.query_one("#goto-error", Static).update(f"not a step number: {event.value!r}")
            return
        self.dismiss(step)

    def action_cancel(self) -> None:
        self.dismiss(None)
