"""Colour roles on a real terminal's depth: what the escape codes say, healthy and alarmed.

The dashboard is drawn from the fixture recording and its frame printed the way Textual's driver
prints it (a Rich Console of the terminal's colour system), so these are the codes a terminal gets.
On 16 colours (TERM=xterm) the default theme's orange would be downgraded to bright red; the roles
keep red and yellow for alarms only, the data cyan and the focus magenta.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from simic_tui.app import SimicApp
from simic_tui.palette import ANSI16_ROLES, ROLES_256, role_variables

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import states

pytestmark = [pytest.mark.usefixtures("deterministic_terminal"), pytest.mark.timeout(120)]

SGR = re.compile(r"\x1b\[([0-9;]*)m([^\x1b]*)")
# foreground codes of the 16-colour alarm roles: red, yellow and their bright forms
ALARM_16 = {"31", "33", "91", "93"}


def frame(app: SimicApp, color_system: str) -> list[tuple[set[str], str]]:
    """(the SGR codes, the text) of every styled run of the screen, as the terminal gets them."""
    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=color_system
    )
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens, simplify=True)
    )
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return [(set(codes.split(";")), text) for codes, text in SGR.findall(out) if text.strip()]


def foreground_16(codes: set[str]) -> set[str]:
    return {c for c in codes if c in {str(n) for n in (*range(30, 38), *range(90, 98))}}


async def drawn(state: str, keys: tuple[str, ...], color_system: str) -> list[tuple[set[str], str]]:
    app = states.build(state)
    assert app.console.color_system == color_system  # the depth came from TERM, as in a terminal
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()
        return frame(app, color_system)


async def test_sixteen_colours_a_healthy_screen_shows_no_alarm_colour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    runs = await drawn("healthy", (), "standard")
    alarms = [text for codes, text in runs if foreground_16(codes) & ALARM_16]
    assert not alarms, alarms
    # the series are cyan (36), one hue for every chart
    sparks = [codes for codes, text in runs if set(text) <= set("▁▂▃▄▅▆▇█ ") and len(text.strip()) >= 5]
    assert sparks and all(foreground_16(c) == {"36"} for c in sparks)


async def test_sixteen_colours_alarms_stay_red_and_yellow_and_focus_is_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    runs = await drawn("kl_spike", ("right", "1"), "standard")
    by_text = {text.strip(): foreground_16(codes) for codes, text in runs}
    spike = next(c for t, c in by_text.items() if "SPIKE" in t and "✖" in t)
    assert spike == {"91"}  # critical: bright red, bold
    warn = next(c for t, c in by_text.items() if "EXPLODING" in t and "▲" in t)
    assert warn == {"93"}  # warning: bright yellow
    # the focused Policy panel (heavy: it has a critical incident) is drawn in the focus colour; the
    # incident strip's heavy border, unfocused, in the critical one
    corners = [foreground_16(c) for c, t in runs if "┏" in t]
    assert corners[0] == {"95"} and {"91"} in corners[1:]
    # the KL sparkline beside the spike is data, not alarm
    assert any(foreground_16(c) == {"36"} and "█" in t for c, t in runs)


async def test_256_colours_data_focus_and_alarms_have_their_own_colours() -> None:
    runs = await drawn("kl_spike", ("right", "1"), "256")
    # ROLES_256["series"] is 256-colour 74
    sparks = [c for c, t in runs if set(t.strip()) <= set("▁▂▃▄▅▆▇█") and len(t.strip()) >= 5]
    assert sparks and all({"38", "5", "74"} <= c for c in sparks)
    # the alarm word is not the data colour and the data never takes the warning orange (214)
    spike = next(c for c, t in runs if "SPIKE" in t)
    assert "74" not in spike and "214" not in {x for c in sparks for x in c}


def test_the_roles_are_exact_palette_entries_and_a_theme_keeps_its_own() -> None:
    from rich._palettes import STANDARD_PALETTE
    from rich.color import Color, ColorSystem

    for name, value in ANSI16_ROLES.items():  # downgrading an exact entry lands on that entry
        colour = Color.parse(value)
        assert STANDARD_PALETTE[colour.downgrade(ColorSystem.STANDARD).number] == colour.triplet, name
    warning, error, series, focus = (
        Color.parse(ANSI16_ROLES[k]).downgrade(ColorSystem.STANDARD).number
        for k in ("warning", "error", "series", "focus")
    )
    assert len({warning, error, series, focus}) == 4
    assert {series, focus}.isdisjoint({1, 3, 9, 11})  # never red or yellow
    # 256 colours: the theme's own roles win; the default theme's orange accent is replaced
    assert role_variables("256", {"series": "#123456", "accent": "#FFA62B", "warning": "#ffa62b"}) == {
        "series-dim": ROLES_256["series-dim"],
        "focus": ROLES_256["focus"],
        "accent": ROLES_256["focus"],
        "footer-key-foreground": ROLES_256["focus"],
    }
    assert role_variables("truecolor", {"accent": "#00FF00", "warning": "#FFA62B"}) == ROLES_256
