"""Every key of the dashboard, driven through Pilot on the real app.

Replay keys and screens run from the fixture recording; the live keys (d, n, m, P, p) talk to a real
trainer side over real loopback sockets: telemetry_core's Publisher, answered at update boundaries.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.command import CommandList

from simic_tui.app import SimicApp
from simic_tui.keys import APP_BINDINGS, DASHBOARD_BINDINGS, LIVE_ONLY, REPLAY_BINDINGS
from simic_tui.screens.anomaly_log import AnomalyLogScreen
from simic_tui.screens.debug import DebugScreen
from simic_tui.screens.help import HelpScreen
from simic_tui.screens.thresholds import ThresholdsScreen
from simic_tui.store import TelemetryStore
from simic_tui.widgets.base import Panel
from telemetry_core.config import threshold_reasons

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import states

pytestmark = pytest.mark.timeout(120)
SIZE = (120, 40)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


def text(widget: Panel) -> str:
    return str(widget.content)


async def until(pilot, cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def notes(app: SimicApp) -> list[str]:
    return [n.message for n in app._notifications]


# ---------------------------------------------------------------------------------------------
# Replay: screens, panels, replay keys
# ---------------------------------------------------------------------------------------------


async def test_question_mark_lists_every_binding_and_closes() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        shown = "\n".join(str(s.content) for s in app.screen.query(".help-section"))
        for binding in [*APP_BINDINGS, *DASHBOARD_BINDINGS, *REPLAY_BINDINGS]:
            live_only = binding.action.split("(")[0] in LIVE_ONLY
            assert (binding.tooltip in shown) != live_only, binding.id  # a replay lists what works in it
        assert "✖" in shown and "▲" in shown  # the glyph legend
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_t_shows_every_threshold_with_its_reason_from_the_stream() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, ThresholdsScreen)
        table = screen.query_one("DataTable")
        reasons = threshold_reasons()
        assert table.row_count == len(reasons)
        row = table.get_row("kl_spike_critical")
        assert row[1] == "0.15" and row[2] == reasons["kl_spike_critical"]
        await pilot.press("t")
        assert app.screen is app.dashboard


async def test_a_opens_the_full_anomaly_log_newest_first() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AnomalyLogScreen)
        table = screen.query_one("DataTable")
        assert table.row_count == len(app.store.anomalies) > 0
        steps = [int(table.get_row_at(i)[1]) for i in range(table.row_count)]
        assert steps == sorted(steps, reverse=True)
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_number_keys_focus_then_zoom_then_restore() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        for number, panel in enumerate(("policy", "value", "advantage", "gradients", "lstm"), start=1):
            widget = app.dashboard.query_one(f"#{panel}", Panel)
            await pilot.press(str(number))
            assert widget.has_focus and app.dashboard.maximized is None
            await pilot.press(str(number))
            assert app.dashboard.maximized is widget
            await pilot.pause()
            assert widget.size.width > SIZE[0] - 10  # it really fills the screen
            await pilot.press("escape")
            assert app.dashboard.maximized is None


async def test_d_in_a_replay_opens_the_debug_screen_with_a_sortable_layer_table() -> None:
    app = states.build("debug")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("d")
        screen = app.screen
        assert isinstance(screen, DebugScreen)
        table = screen.query_one("DataTable")
        _, report = app.store.latest_debug
        assert table.row_count == len(report.layers)
        norms = [r.norm for r in sorted(report.layers, key=lambda r: r.norm, reverse=True)]
        first = str(table.get_row_at(0)[0])
        assert first.startswith(max(report.layers, key=lambda r: r.norm).name)
        await pilot.press("r")  # ascending
        assert str(table.get_row_at(0)[0]).startswith(min(report.layers, key=lambda r: r.norm).name)
        await pilot.press("s")  # next column: mean
        assert screen.sort_column == "mean"
        assert norms[0] >= norms[-1]
        for part in ("#numerical", "#outliers", "#conflict"):
            assert str(screen.query_one(part).content).strip()
        assert "Gradient conflict" in str(screen.query_one("#conflict").content)
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_replay_keys_step_seek_play_and_change_speed() -> None:
    clock = [states.FROZEN]
    app = states.build("healthy")
    app.clock = lambda: clock[0]
    replay = app.replay
    assert replay is not None
    async with app.run_test(size=SIZE) as pilot:
        total = replay.total
        await pilot.press("home")
        assert replay.position == 1 and app.store.count == 1
        await pilot.press("right", "right")
        assert replay.position == 3 and app.store.latest.step == replay.loaded.frames[2][1].step
        await pilot.press("left")
        assert replay.position == 2 and app.store.count == 2
        await pilot.press("end")
        assert replay.position == total
        speed = replay.speed
        await pilot.press("plus")
        assert replay.speed > speed
        await pilot.press("minus", "minus")
        assert replay.speed < speed
        await pilot.press("home", "space")
        assert replay.playing
        clock[0] += 5.0  # five seconds of replay time pass
        app.tick()
        assert replay.position > 1
        await pilot.press("space")
        assert not replay.playing
        header = str(app.dashboard.query_one("#header").content)
        assert f"/{total}" in header and "replay" in header


async def test_stepping_onto_entropy_collapse_alarms_with_colour_glyph_word_border_and_notification() -> None:
    """The recording's first entropy_collapse: each flagged head, at the severity the detector gave."""
    app = states.build("entropy_collapse")
    async with app.run_test(size=SIZE) as pilot:
        policy = app.dashboard.query_one("#policy", Panel)
        assert "ENTROPY COLLAPSE" not in policy.border_title
        assert "COLLAPSE" not in "".join(text(policy).splitlines()[: len(app.store.latest.run.heads)])
        await pilot.press("right")
        await pilot.pause()
        fired = [a for a in app.store.latest.anomalies if a.kind == "entropy_collapse"]
        assert fired and all(a.head for a in fired)
        critical = any(a.severity == "critical" for a in fired)
        glyph, cls = ("✖", "-crit") if critical else ("▲", "-warn")  # red / yellow border
        assert policy.has_class(cls)
        shown = text(policy)
        for a in fired:
            assert f"ENTROPY COLLAPSE ({a.head})" in policy.border_title
            line = next(line for line in shown.splitlines() if f" {a.head} " in line)
            assert f"{glyph} COLLAPSE" in line  # readable without colour, on the head's own line
        assert any("entropy_collapse" in m for m in notes(app))


async def test_the_states_do_not_depend_on_the_origin_of_the_frozen_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app's clock is local (monotonic): moving its origin far away changes nothing drawn."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        for name in ("healthy", "debug", "stale"):
            screens = []
            for origin in (states.FROZEN, 1.7e9):
                monkeypatch.setattr(states, "FROZEN", origin)
                app = states.build(name)
                async with app.run_test(size=SIZE) as pilot:
                    await pilot.pause()
                    screens.append(app.export_screenshot())
            assert screens[0] == screens[1], name
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_a_tick_without_screens_does_nothing() -> None:
    """The redraw timer may fire while the app is shutting down, after its screens are gone (seen
    once in CI: ScreenStackError from the timer): it must not raise."""
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
    assert not app.screen_stack
    app.tick()


async def test_kl_spike_and_nan_gradients_stand_out() -> None:
    app = states.build("kl_spike")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right")
        await pilot.pause()
        policy = app.dashboard.query_one("#policy", Panel)
        assert "KL SPIKE" in policy.border_title and "SPIKE" in text(policy)
        assert any("kl_spike" in m for m in notes(app))
    app = states.build("nan")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right")
        await pilot.pause()
        grads = app.dashboard.query_one("#gradients", Panel)
        assert grads.has_class("-crit") and "NUMERICAL INSTABILITY" in grads.border_title
        assert "NaN" in text(grads) and "NaN GRADIENTS" in text(grads)


async def test_below_the_minimum_size_a_clear_notice_replaces_the_panels() -> None:
    app = states.build("healthy")
    async with app.run_test(size=(60, 18)) as pilot:
        await pilot.pause()
        notice = app.dashboard.query_one("#too-small")
        assert notice.display and notice.region.height > 0
        assert "at least 80×24" in str(notice.content)
        assert app.dashboard.query_one("#panels").region.height == 0
    async with states.build("healthy").run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert pilot.app.dashboard.query_one("#too-small").region.height == 0


async def test_command_palette_runs_the_same_actions_by_name() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Thresh")

        def matched() -> bool:  # the palette searches asynchronously: wait for its hits, not a fixed time
            lists = app.screen.query(CommandList)
            return bool(lists) and lists.first().option_count > 0

        await until(pilot, matched, what="palette hits")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ThresholdsScreen), what="thresholds screen")


async def test_q_quits() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await pilot.pause()
        assert app._exit  # the app is leaving its message loop
    assert app.return_code == 0


async def test_a_damaged_recording_is_replayed_as_far_as_it_reads_and_says_so(tmp_path: Path) -> None:
    from simic_tui.replay import ReplaySource, load_recording

    data = states.RECORDING.read_bytes()
    damaged = tmp_path / "damaged.simrec"
    cut = len(data) * 2 // 3
    flipped = bytearray(data[:cut])
    flipped[len(flipped) // 3] ^= 0xFF  # a bit flip in the middle
    damaged.write_bytes(bytes(flipped))
    loaded = load_recording(damaged)
    assert 0 < len(loaded.frames) < len(load_recording(states.RECORDING).frames)
    notice = loaded.notice()
    assert "corrupt record" in notice and "truncated" in notice and f"{len(loaded.frames)} snapshot" in notice
    store = TelemetryStore()
    replay = ReplaySource(loaded, store)
    replay.seek(replay.total)
    app = SimicApp(store, replay=replay, banner=notice)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        banner = app.dashboard.query_one("#banner")
        assert banner.display and "damaged" in str(banner.content)
