"""Help: every key (from the same Binding lists as the Footer and the palette), glyphs and colours."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from simic_tui.keys import (
    APP_BINDINGS,
    DASHBOARD_BINDINGS,
    DEBUG_BINDINGS,
    INCIDENT_LOG_BINDINGS,
    LIVE_ONLY,
    PALETTE_TITLES,
    REPLAY_BINDINGS,
)

__all__ = ["HelpScreen", "key_name", "key_table"]


_NAMES = {
    "question_mark": "?",
    "escape": "Esc",
    "home": "Home",
    "end": "End",
    "space": "Space",
    "left": "←",
    "right": "→",
    "plus": "+",
    "equals_sign": "=",
    "minus": "-",
    "pageup": "PgUp",
    "pagedown": "PgDn",
    "enter": "Enter",
}


def key_name(binding: Binding) -> str:
    """Each key itself (the Footer's shared entries like "1-5" are spelled out here)."""
    return "/".join(_NAMES.get(k, k) for k in binding.key.split(","))


def key_table(title: str, bindings: list[Binding]) -> Content:
    lines: list[Content] = [Content.styled(title, "bold $accent")]
    names = [PALETTE_TITLES.get(b.id or "", b.description) for b in bindings]
    key_w = max((len(key_name(b)) for b in bindings), default=4) + 2
    name_w = max((len(n) for n in names), default=10) + 2  # columns never run together
    for b, name in zip(bindings, names):
        lines.append(
            Content.assemble(
                (f"  {key_name(b):<{key_w}}", "bold"), (f"{name:<{name_w}}", ""), (b.tooltip, "$text-muted")
            )
        )
    return Content("\n").join(lines)


LEGEND = Content("\n").join(
    [
        Content.styled("Colours and glyphs", "bold $accent"),
        Content.assemble(("  0.82  ", ""), ("healthy: inside every threshold", "$text-muted")),
        Content.assemble(
            ("  0.31▲ ", "$warning"),
            ("past a limit the t screen lists, or a warning incident of this panel", "$text-muted"),
        ),
        Content.assemble(
            ("  0.04✖ COLLAPSE ", "bold $error"),
            ("a critical incident is active; the panel's border turns heavy", "$text-muted"),
        ),
        Content.assemble(
            ("  ✓ KL SPIKE cleared at 44 ", "$text-muted"),
            ("in a panel title: its incident ended (shown for 10 updates)", "$text-muted"),
        ),
        Content.assemble(
            ("  ✖ 2 active · 1 new ", "bold reverse $error"),
            ("header: incidents active now, and those not yet acknowledged (X)", "$text-muted"),
        ),
        Content.assemble(
            ("  —     ", "$text-muted"),
            ("undefined (e.g. explained variance of constant returns)", "$text-muted"),
        ),
        Content.assemble(
            ("  NaN✖  ", "bold $error"),
            ("not a number while numerical_instability is active; unmeasured values say so", "$text-muted"),
        ),
        Content.assemble(
            ("  ×     ", "$accent"), ("in a sparkline: a NaN/inf update; blank: not measured", "$text-muted")
        ),
        Content.assemble(
            ("  ˆ     ", "$warning"), ("under the KL sparkline: a target-KL early stop", "$text-muted")
        ),
        Content.styled(
            "  Every limit comes from the Thresholds the trainer sends with each snapshot (t lists them);\n"
            "  every alarm (✖, a word, a border) is one of the trainer's incidents, listed by a.",
            "$text-muted",
        ),
        Content.styled("Link", "bold $accent"),
        Content.styled(
            "  ● live  ○ stale (no heartbeat for 3 s)  ✖ disconnected (reconnecting)  ◌ connecting…\n"
            "  bad frames: refused frames (counted, never drawn); missed: sequence gaps the backfill\n"
            "  could not fill; dropped: snapshots the trainer's queue dropped.",
            "$text-muted",
        ),
        Content.styled("Command palette", "bold $accent"),
        Content.styled("  ctrl+p lists every action above by name.", "$text-muted"),
    ]
)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [
        Binding("escape,question_mark,q", "dismiss", "Close", id="help_close", tooltip="Close the help"),
    ]

    def __init__(self, replay: bool) -> None:
        super().__init__()
        self.replay = replay

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(Content.styled("simic-tui help  (Esc closes)", "bold"), id="help-title")
            keys = [*DASHBOARD_BINDINGS, *APP_BINDINGS]
            if self.replay:  # commands go to a live trainer only
                keys = [b for b in keys if b.action.split("(")[0] not in LIVE_ONLY]
            yield Static(key_table("Keys", keys), classes="help-section")
            if self.replay:
                yield Static(key_table("Replay", REPLAY_BINDINGS), classes="help-section")
            yield Static(key_table("Incident log (a)", INCIDENT_LOG_BINDINGS), classes="help-section")
            yield Static(key_table("DEBUG screen", DEBUG_BINDINGS), classes="help-section")
            yield Static(LEGEND, classes="help-section")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
