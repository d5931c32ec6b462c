"""Help: every key (from the same Binding lists as the Footer and the palette), glyphs and colours."""

from __future__ import annotations

import textwrap
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from simic_tui.baseline import BAND_HALF_WIDTH, BAND_MARGIN
from simic_tui.keys import (
    APP_BINDINGS,
    DASHBOARD_BINDINGS,
    DEBUG_BINDINGS,
    INCIDENT_LOG_BINDINGS,
    LIVE_ONLY,
    PALETTE_TITLES,
    REPLAY_BINDINGS,
)
from simic_tui.widgets.base import BAND_STYLE, OFF_BASELINE, OFF_STYLE

__all__ = ["GLYPHS", "HelpScreen", "key_name", "key_table", "legend"]


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


def _hanging(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells, broken at spaces (a continuation column)."""
    return textwrap.wrap(text, max(width, 12), break_long_words=False, break_on_hyphens=False) or [""]


def key_table(title: str, bindings: list[Binding], width: int = 94) -> Content:
    """Key | name | what it does, in columns; a long description wraps in its own column."""
    lines: list[Content] = [Content.styled(title, "bold $focus")]
    names = [PALETTE_TITLES.get(b.id or "", b.description) for b in bindings]
    key_w = max((len(key_name(b)) for b in bindings), default=4) + 2
    name_w = max((len(n) for n in names), default=10) + 2  # columns never run together
    for b, name in zip(bindings, names):
        tip = _hanging(b.tooltip, width - 2 - key_w - name_w)
        lines.append(
            Content.assemble(
                (f"  {key_name(b):<{key_w}}", "bold"), (f"{name:<{name_w}}", ""), (tip[0], "$text-muted")
            )
        )
        lines += [Content.styled(" " * (2 + key_w + name_w) + more, "$text-muted") for more in tip[1:]]
    return Content("\n").join(lines)


# (sample, its style, what it means): the sample column is as wide as the widest sample
GLYPHS: list[tuple[str, str, str]] = [
    ("0.82", "", "healthy: inside every threshold"),
    ("0.31▲", "$warning", "past a limit the t screen lists, or a warning incident of this panel"),
    ("0.04✖ COLLAPSE", "bold $error", "a critical incident is active; the panel's border turns heavy"),
    ("✓ KL SPIKE cleared at 44", "$text-muted", "in a panel title: its incident ended (shown for 10 updates)"),
    (
        "✖ 2 active · 1 new",
        "bold reverse $error",
        "header: incidents active now, and those not yet acknowledged (X)",
    ),
    (
        "⚠ telemetry errors 3",
        "bold $warning",
        "header: errors the trainer's telemetry swallowed so training goes on (e shows their messages)",
    ),
    ("—", "$text-muted", "undefined (e.g. explained variance of constant returns)"),
    (
        "NaN✖",
        "bold $error",
        "not a number while numerical_instability is active; unmeasured values say so",
    ),
    ("▁▃▅█", "$series", "a series (sparkline or chart); every series has this colour"),
    ("×", "$series", "in a sparkline or chart: an update whose value was NaN or inf"),
    ("·", "$series-dim", "in the episode-return chart: no episode finished in that update"),
    ("blank", "$text-muted", "in a sparkline or chart: not measured in that update"),
    ("ˆ", "$series-dim", "under the KL sparkline: a target-KL early stop"),
    ("┈", "$text-muted", "in a chart: a limit, named in the chart's legend"),
    (
        "▃▅▆ tinted",
        f"$series {BAND_STYLE}",
        "with --baseline: behind a sparkline or chart, the known-good run's band at that update (its "
        f"range over ±{BAND_HALF_WIDTH} updates, +{BAND_MARGIN:.0%}); context, not a limit",
    ),
    ("▅ underlined", "underline $series", "with --baseline: that update's value left the baseline's band"),
    (
        OFF_BASELINE,
        OFF_STYLE,
        "with --baseline: after a sparkline, its latest value differs from the baseline (outside the "
        "band); under a chart, each update that did. A difference, not an alarm: limits (t) and "
        "incidents are unchanged",
    ),
]
NOTES = (
    "Colours have one meaning each: data in one hue, yellow/amber for warnings and red for critical "
    "alarms only, the focused panel in the focus colour. Every limit comes from the Thresholds the "
    "trainer sends with each snapshot (t lists them); every alarm (✖, a word, a border) is one of the "
    "trainer's incidents, listed by a."
)
LINK: list[tuple[str, str, str]] = [
    ("● live", "bold $success", "frames arrive"),
    ("○ stale", "bold $warning", "no heartbeat for 3 s"),
    ("✖ disconnected", "bold $error", "reconnecting"),
    ("◌ connecting…", "bold $warning", "waiting for the trainer"),
    ("bad frames", "", "refused frames (counted, never drawn)"),
    ("missed", "", "sequence gaps the backfill could not fill"),
    ("dropped", "", "snapshots the trainer's queue dropped"),
]


def legend(title: str, entries: list[tuple[str, str, str]], width: int = 94, notes: str = "") -> Content:
    """Sample | meaning, in two columns; a long meaning wraps in its own column."""
    sample_w = max(len(sample) for sample, _, _ in entries) + 2
    lines: list[Content] = [Content.styled(title, "bold $focus")]
    for sample, style, meaning in entries:
        text = _hanging(meaning, width - 2 - sample_w)
        pad = " " * (sample_w - len(sample))
        lines.append(Content.assemble(("  ", ""), (sample, style), (pad, ""), (text[0], "$text-muted")))
        lines += [Content.styled(" " * (2 + sample_w) + more, "$text-muted") for more in text[1:]]
    if notes:
        lines += [Content.styled("  " + line, "$text-muted") for line in _hanging(notes, width - 2)]
    return Content("\n").join(lines)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar = [
        Binding("escape,question_mark,q", "dismiss", "Close", id="help_close", tooltip="Close the help"),
    ]

    def __init__(self, replay: bool) -> None:
        super().__init__()
        self.replay = replay

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body", classes="modal-body"):
            yield Static(Content.styled("simic-tui help  (Esc closes)", "bold"), id="help-title")
            for i in range(len(self.sections(94))):
                yield Static(id=f"help-section-{i}", classes="help-section")

    def sections(self, width: int) -> list[Content]:
        keys = [*DASHBOARD_BINDINGS, *APP_BINDINGS]
        if self.replay:  # commands go to a live trainer only
            keys = [b for b in keys if b.action.split("(")[0] not in LIVE_ONLY]
        out = [key_table("Keys", keys, width)]
        if self.replay:
            out.append(key_table("Replay", REPLAY_BINDINGS, width))
        out.append(key_table("Incident log (a)", INCIDENT_LOG_BINDINGS, width))
        out.append(key_table("DEBUG screen", DEBUG_BINDINGS, width))
        out.append(legend("Colours and glyphs", GLYPHS, width, NOTES))
        out.append(legend("Link", LINK, width))
        out.append(legend("Command palette", [("ctrl+p", "bold", "lists every action above by name")], width))
        return out

    def on_resize(self) -> None:
        """The columns wrap to the body's width: laid out again when the terminal changes size."""
        # the body (app.tcss: 96 wide at most) less its border, padding and scrollbar
        width = min(96, self.size.width) - 2 - 2 - 2
        for i, section in enumerate(self.sections(width)):
            self.query_one(f"#help-section-{i}", Static).update(section)

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
