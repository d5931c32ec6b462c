"""SVG snapshots of the dashboard's states, fed from the committed recording.

Deterministic by construction: frozen clocks (no ages, no rates that move), fixed terminal sizes,
UTC for wall-clock columns, no cursor blink, colours on. Regenerate after an intended change with
``python -m pytest tests/test_tui_snapshots_dashboard.py --snapshot-update`` and look at the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import states

SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


pytestmark = pytest.mark.usefixtures("deterministic_terminal")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "state",
    [
        "healthy",
        "entropy_collapse",
        "kl_spike",
        "kl_spike_after",  # the header badge, the 'cleared at' / still-active title, the grouped strip
        "nan",
        "debug",
        "stale",
        "disconnected",
        "incompatible",
    ],
)
def test_dashboard_state(snap_compare, state: str, size: str) -> None:  # type: ignore[no-untyped-def]
    """The main screen in each state the issue names, at the compact and the large size."""
    assert snap_compare(states.build(state), press=states.STATES[state].press, terminal_size=SIZES[size])


@pytest.mark.parametrize("size", [(120, 40), (200, 60)])
def test_layout_breakpoints(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """The medium and wide layouts (Textual breakpoints) with the same data."""
    assert snap_compare(states.build("kl_spike"), press=("right",), terminal_size=size)


def test_alarms_read_without_colour(snap_compare, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """NO_COLOR: the entropy collapse still reads as a COLLAPSE word with its glyph, a border and a titled alarm."""
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(states.build("entropy_collapse"), press=("right",), terminal_size=(80, 24))


@pytest.mark.parametrize("state", ["healthy", "kl_spike"])
def test_sixteen_colours(snap_compare, monkeypatch: pytest.MonkeyPatch, state: str) -> None:  # type: ignore[no-untyped-def]
    """TERM=xterm (16 colours): the palette's exact 16-colour entries, data cyan, alarms red and yellow
    only (the other snapshots are drawn for a 256-colour terminal)."""
    monkeypatch.setenv("TERM", "xterm")
    assert snap_compare(states.build(state), press=states.STATES[state].press, terminal_size=(80, 24))
