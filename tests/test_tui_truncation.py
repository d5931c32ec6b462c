"""Truncation audit: every screen, from the real fixture recording, at 80x24, 120x40, 160x48 and 200x60.

What must never be cut: alarm words (``SPIKE``, ``COLLAPSE``...), incident kinds and their scopes,
limits (``limit 0.3``, ``≥0.05``, ``┈ critical 0.15``), numbers, names (parameters, heads) and the
advice of an incident. The rest may wrap, abbreviate by rule or move to a detail view; when prose is
cut, it is cut after a whole word (`` …``). The screen's text is read the way a terminal gets it: the
compositor's full frame, printed to a recording Console.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from rich.console import Console
from textual.app import App
from textual.screen import ModalScreen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from simic_tui.app import SimicApp
from simic_tui.compare import build_comparison, load_runs
from simic_tui.incidents import scope_label
from simic_tui.judge import kind_title
from simic_tui.replay import ReplaySource, load_recording
from simic_tui.screens.compare import CompareApp
from simic_tui.store import TelemetryStore
from telemetry_core.kinds import SPECS

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import states
import sweep_states

pytestmark = [pytest.mark.usefixtures("deterministic_terminal"), pytest.mark.timeout(300)]

SIZES = [(80, 24), (120, 40), (160, 48), (200, 60)]
# (state of tests/fixtures/states.py, keys): every screen the dashboard has
SCREENS = {
    "dashboard healthy": ("healthy", ()),
    "dashboard kl spike": ("kl_spike", ("right",)),
    "dashboard NaN": ("nan", ("right",)),
    "dashboard entropy collapse": ("entropy_collapse", ("right",)),
    "incident log": ("kl_spike_after", ("a",)),
    "incident detail": ("kl_spike_after", ("a", "enter")),
    "thresholds": ("healthy", ("t",)),
    "help": ("healthy", ("question_mark",)),
    "DEBUG": ("debug", ("d",)),
    "zoom": ("kl_spike", ("right", "1", "1")),
    "ranks": ("ranks", ("r",)),
}
ALARM_WORDS = (
    "COLLAPSE",
    "SPIKE",
    "EXPLOSION",
    "EXPLODING",
    "EXPLODED",
    "VANISHING",
    "NaN GRADIENTS",
    "DRIFT",
    "SATURATED",
    "CONFLICT",
    "NON-FINITE",
    "LOW",
)
# names a column or an edge may clip silently (kinds are matched too: any word with "_")
CLIPPABLE = {*ALARM_WORDS, "direction", "force", "ENTROPY", "RATIO", "GRAD", "SPIKE"}
# words always followed by their value (a limit, a head's share)
LABELS = {"limit", "cap", "spike", "critical", "direction", "force"}
BORDERS = "│┃╭╮╰╯┏┓┗┛─━▏▕"


def protected_tokens() -> set[str]:
    """Words that are cut only at the cost of their meaning."""
    tokens: set[str] = set(ALARM_WORDS)
    for kind in SPECS:
        tokens.add(kind)
        tokens.update(kind_title(kind).split())
    tokens.update({"direction", "force", "limit", "critical", "warning", "spike", "cap"})
    tokens.update(scope_label(s) for s in ("head:direction", "head:force"))
    return {t for t in tokens if len(t) >= 3}


def screen_text(app: App[None], whole: bool = False) -> str:
    """The active screen as text; of a modal screen, its body only (what it covers is not its text)
    unless ``whole``."""
    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False
    )
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens, simplify=True)
    )
    lines = console.export_text(styles=False).splitlines()
    if isinstance(app.screen, ModalScreen) and not whole:
        body = app.screen.query_one(".modal-body").region
        lines = [line[body.x : body.right] for line in lines[body.y : body.bottom]]
    return "\n".join(lines)


def ranks_app() -> SimicApp:
    loaded = load_recording(Path(__file__).parent / "fixtures" / "ranks_run.simrec")
    frames = [s for _, s in loaded.frames]
    position = next(i for i, s in enumerate(frames) if any(x.kind == "rank_divergence" for x in s.incidents))
    store = TelemetryStore(clock=lambda: states.FROZEN)
    replay = ReplaySource(loaded, store)
    replay.seek(position + 1)
    return SimicApp(store, replay=replay, clock=lambda: states.FROZEN)


def cuts(text: str, protected: set[str]) -> list[str]:
    """Every place where ``text`` cuts a protected token or a number."""
    found: list[str] = []
    for lineno, line in enumerate(text.splitlines()):
        for m in re.finditer("…", line):
            before = line[: m.start()]
            after = line[m.end() :]
            fragment = re.split(rf"[\s{BORDERS}]", before)[-1]
            where = f"line {lineno}: {line.strip()!r}"
            bare = fragment.strip("([,;:")
            if bare and any(t != bare and t.startswith(bare) for t in protected):
                found.append(f"a protected word cut at {bare!r}…  ({where})")
            # a number cut: a digit, a point or a sign before the ellipsis, no number after it (a
            # range such as 1e-3…1e-2 or 0.1…0.5 is not a cut)
            if re.search(r"[\d.\-−]$", fragment) and not re.match(r"[\d\-−]", after):
                found.append(f"a number cut at {fragment!r}…  ({where})")
            if re.search(r"(limit|≥|cap|spike|critical)\s*$", before) or bare in LABELS:
                found.append(f"a limit or a named value cut  ({where})")
        # a table column or a panel edge clipping a name without any ellipsis: a partial kind
        # (``kl_sp``), a partial scope (``(directio``) or a name running into an edge
        for m in re.finditer(r"[A-Za-z_]{4,}", line):
            word, rest = m.group(), line[m.end() :]
            if word in protected or not any(
                t.startswith(word) and len(t) > len(word) and not t.startswith(word + "_")
                for t in protected
                if t in CLIPPABLE or "_" in t
            ):
                continue
            at_edge = not rest.strip() or rest[0] in BORDERS
            if at_edge or "_" in word or line[: m.start()].endswith("("):
                found.append(f"{word!r} clipped  (line {lineno}: {line.strip()!r})")
    return found


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", SCREENS)
async def test_nothing_protected_is_cut(screen: str, size: tuple[int, int]) -> None:
    state, keys = SCREENS[screen]
    app = ranks_app() if state == "ranks" else states.build(state)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()
        await pilot.pause()
        text = screen_text(app)
        footer = footer_cuts(app)
        advice = ""
        if screen == "incident detail":
            from simic_tui.screens.anomaly_log import IncidentDetailScreen

            assert isinstance(app.screen, IncidentDetailScreen)
            log = app.store.incidents
            rec = log.get(app.screen.incident_id)
            assert rec is not None
            inc = log.view(rec)
            advice = " ".join(inc.action.split())
    problems = cuts(text, protected_tokens()) + footer
    assert not problems, f"{screen} at {size}:\n" + "\n".join(problems) + "\n\n" + text
    if advice:  # the advice is shown whole, wrapped
        flat = " ".join(re.sub(rf"[{BORDERS}]", " ", text).split())
        assert advice[:60] in flat, advice


def test_the_audit_finds_the_cuts_it_is_meant_to_find() -> None:
    protected = protected_tokens()
    for bad in (
        "│ explained variance  ┈ limit -0.… │",
        "│ KL k3 mean  ┈ spike 0.05  ┈ c… │",
        "┏━ 1 Policy ✖ RATIO EXPLOSION (direction), KL SPI… ━┓",
        " ✖ critical  entropy_collapse (directio  24  107–130",
        "│ clip     36%▲ limit 0.3  direction 27%  force… │",
        "│ gates    input 30% forget 0% output 4… │",
    ):
        assert cuts(bad, protected), bad
    for fine in (
        "│ |g| hist  0  ▂▂▄▆▇██▇▆▄ ≥1e0 peak 1e-3…1e-2 │",
        "│ ◌ connecting… │",
        "│ ▲ ev_low 35 cleared  The critic explains too little of the …",
    ):
        assert not cuts(fine, protected), fine


def footer_cuts(app: App[None]) -> list[str]:
    """Every footer entry of the active screen that is not on screen whole: ``key description``
    inside the terminal's width, on the footer's line, in full."""
    found: list[str] = []
    width = app.size.width
    lines = screen_text(app, whole=True).splitlines()
    for footer in app.screen.query(Footer):
        line = lines[footer.region.y] if footer.region.y < len(lines) else ""
        keys = list(footer.query(FooterKey))
        if not keys:
            found.append("the footer shows no key at all")
        for key in keys:
            entry = f"{key.key_display} {key.description}".strip()
            if key.region.right > width or key.region.width < len(entry):
                found.append(f"footer entry {entry!r} cut (at {key.region}, width {width})")
            elif entry not in line:
                found.append(f"footer entry {entry!r} not whole on its line {line!r}")
    return found


COMPARE = {
    "two runs": ["cmp_healthy.simrec", "cmp_klspike.simrec"],
    "four runs": ["cmp_healthy.simrec", "cmp_klspike.simrec", "cmp_entropy.simrec", "cmp_nangrad.simrec"],
}
FOOTER_SIZES = [(80, 24), (160, 48)]


@pytest.mark.parametrize("size", FOOTER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("runs", COMPARE)
async def test_the_compare_screen_cuts_nothing_protected_and_no_footer_entry(
    runs: str, size: tuple[int, int]
) -> None:
    fixtures = Path(__file__).parent / "fixtures"
    app = CompareApp(build_comparison(load_runs([fixtures / name for name in COMPARE[runs]])))
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.pause()
        text = screen_text(app)
        problems = cuts(text, protected_tokens()) + footer_cuts(app)
        assert "Updates/env steps" in text.splitlines()[-1]  # the screen's own key stays at 80 columns
    assert not problems, f"compare {runs} at {size}:\n" + "\n".join(problems) + "\n\n" + text


@pytest.mark.parametrize("size", FOOTER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("keys", [(), ("enter",)], ids=["table", "a run's dashboard"])
async def test_the_sweep_screens_cut_nothing_protected_and_no_footer_entry(keys: tuple[str, ...], size: tuple[int, int]) -> None:
    app = sweep_states.build()
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press(*keys)
        await pilot.pause()
        await pilot.pause()
        text = screen_text(app)
        footer = text.splitlines()[-1]
        problems = footer_cuts(app)
        if not keys:
            assert "Open" in footer and "? Help" in footer
        else:  # a run's dashboard, from another recording than the fixture's
            problems += cuts(text, protected_tokens())
    assert not problems, f"sweep {keys} at {size}:\n" + "\n".join(problems) + "\n\n" + text


async def test_the_footer_audit_finds_a_cut_entry() -> None:
    """Textual's own Footer at 80 columns, given more keys than fit, runs them off the edge and under
    its palette entry; the audit must say so."""
    from textual.binding import Binding
    from textual.widgets import Static

    class Crowded(App[None]):
        BINDINGS: ClassVar = [Binding(k, f"notify('{k}')", f"Description{k}") for k in "abcdefghij"]

        def compose(self):  # type: ignore[no-untyped-def]
            yield Static("body")
            yield Footer(compact=True)

    app = Crowded()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert footer_cuts(app)
