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
from simic_tui.fmt import fmt_num
from simic_tui.judge import PANEL_KINDS, Verdict, judge_entropy, kind_title
from simic_tui.keys import APP_BINDINGS, DASHBOARD_BINDINGS, LIVE_ONLY, REPLAY_BINDINGS
from simic_tui.replay import ReplaySource
from simic_tui.screens.anomaly_log import AnomalyLogScreen, IncidentDetailScreen
from simic_tui.screens.debug import DebugScreen
from simic_tui.screens.goto import GotoStepScreen
from simic_tui.screens.help import HelpScreen
from simic_tui.screens.thresholds import ThresholdsScreen
from simic_tui.store import TelemetryStore
from simic_tui.widgets.base import Panel
from simic_tui.widgets.incidents import kind_scope
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
        await pilot.pause()
        lines = "\n".join(str(s.content) for s in app.screen.query(".help-section")).splitlines()
        shown = " ".join(" ".join(lines).split())  # descriptions wrap in their own column
        for binding in [*APP_BINDINGS, *DASHBOARD_BINDINGS, *REPLAY_BINDINGS]:
            live_only = binding.action.split("(")[0] in LIVE_ONLY
            assert (binding.tooltip in shown) != live_only, binding.id  # a replay lists what works in it
        assert "✖" in shown and "▲" in shown  # the glyph legend
        # the chart glyphs mean what the panels draw them for
        assert "× in a sparkline or chart: an update whose value was NaN or inf" in shown
        assert "· in the episode-return chart: no episode finished in that update" in shown
        # columns: every line fits the help's body, continuation lines start in their column
        body = app.screen.query_one("#help-body").scrollable_content_region.width
        assert all(len(line) <= body for line in lines), max(lines, key=len)
        assert all(not line.startswith(" ") or line.startswith("  ") for line in lines)
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
        assert str(row[1]) == "0.15" and str(row[2]) == reasons["kl_spike_critical"]
        await pilot.press("t")
        assert app.screen is app.dashboard


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_thresholds_screen_scrolls_to_every_limit_and_wraps_its_reasons(
    size: tuple[int, int],
) -> None:
    app = states.build("healthy")
    async with app.run_test(size=size) as pilot:
        await pilot.press("t")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ThresholdsScreen)
        table = screen.query_one("DataTable")
        names = [str(k.value) for k in table.rows]
        last_lstm = max(i for i, n in enumerate(names) if n.startswith("lstm_"))
        # every reason wraps inside the screen: nothing to scroll sideways, no word cut
        why = next(c for c in table.columns.values() if c.key.value == "why")
        assert sum(c.get_render_width(table) for c in table.columns.values()) <= size[0]
        assert table.get_row_height("baseline_min_updates") > 1 or size[0] > 200
        await pilot.press("pagedown")
        assert table.cursor_row > 0
        await pilot.press("end")
        await pilot.pause()
        assert table.cursor_row == len(names) - 1 >= last_lstm
        assert table.scroll_y > 0  # the last rows are on screen
        await pilot.press("home")
        assert table.cursor_row == 0
        # a new snapshot with the same thresholds does not rebuild the table (the cursor stays)
        await pilot.press("pagedown")
        where = table.cursor_row
        assert app.replay is not None
        before = app.store.latest
        app.replay.seek(app.replay.position + 1)
        app.tick()
        await pilot.pause()
        assert app.store.latest is not before and why.width > 0
        assert table.cursor_row == where


async def test_a_opens_the_incident_log_one_row_per_incident_grouped_by_cause() -> None:
    app = states.build("anomaly_log")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AnomalyLogScreen)
        table = screen.query_one("DataTable")
        log = app.store.incidents
        ids = [int(k.value) for k in table.rows]
        assert sorted(ids) == sorted(log.records) and len(ids) == len(set(ids))  # one row per incident
        judgements = sum(len(snap.anomalies) for _, snap in app.replay.loaded.frames)
        assert len(ids) < judgements / 2  # far fewer rows than per-update judgements (the whole recording)
        for key in table.rows:  # a consequence sits right under its group: after its head
            rec = log.records[int(key.value)]
            kind = str(table.get_row(key)[1])
            if rec.incident.group != rec.id and rec.incident.group in log.records:
                assert kind.startswith("└ ")
                assert ids.index(rec.incident.group) < ids.index(rec.id)
            else:
                assert not kind.startswith("└ ")
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_log_filters_keep_the_cursor_on_its_incident_and_acknowledge_clears_the_badge() -> None:
    app = states.build("anomaly_log")
    async with app.run_test(size=SIZE) as pilot:
        log = app.store.incidents
        header = app.dashboard.query_one("#header")
        await until(pilot, lambda: " new" in str(header.content), what="the badge")  # after the first layout
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AnomalyLogScreen)
        table = screen.query_one("DataTable")
        await pilot.press("down")
        chosen = screen.cursor_id()
        assert chosen is not None
        app.store.incidents.version += 1  # new data arrives: the table is rebuilt ...
        app.tick()
        assert screen.cursor_id() == chosen  # ... and the cursor stays on the same incident
        await pilot.press("s")  # critical only
        assert screen.severity == "critical"
        shown = [log.records[int(k.value)] for k in table.rows]
        heads = [r for r in shown if not str(table.get_row(str(r.id))[1]).startswith("└ ")]
        assert all(r.incident.peak_severity == "critical" for r in shown if r not in heads)
        assert any(r.incident.peak_severity == "critical" for r in shown)
        await pilot.press("s", "s")  # warning, then all again
        assert screen.severity is None and table.row_count == len(log.records)
        kinds = log.kinds()
        await pilot.press("k")
        assert screen.kind == kinds[0]
        assert {log.records[int(k.value)].incident.kind for k in table.rows} >= {kinds[0]}
        await pilot.press("k")
        assert screen.kind == (kinds[1] if len(kinds) > 1 else None)
        while screen.kind is not None:
            await pilot.press("k")
        table.move_cursor(row=0)  # the newest incident the replay has reached
        target = screen.cursor_id()
        assert target is not None and not log.records[target].acknowledged
        await pilot.press("x")
        assert log.records[target].acknowledged
        assert "new" not in str(table.get_row(str(target))[4])
        await pilot.press("X")
        assert all(r.acknowledged for r in log.records.values() if log.reached(r))
        assert log.badge() is None or log.badge()[1] == 0
        await pilot.press("escape")
        app.tick()
        assert " new" not in str(header.content)


async def test_enter_opens_the_detail_pane_with_the_whole_message_limit_advice_and_history() -> None:
    app = states.build("anomaly_log")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AnomalyLogScreen)
        kl_id = next(i for i, r in app.store.incidents.records.items() if r.incident.kind == "kl_spike")
        table = screen.query_one("DataTable")
        table.move_cursor(row=table.get_row_index(str(kl_id)))
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, IncidentDetailScreen)
        await pilot.pause()
        inc = app.store.incidents.records[kl_id].incident
        body = " ".join(" ".join(str(w.content) for w in detail.query(".detail-value") if w.display).split())
        assert " ".join(inc.peak_message.split()) in body  # whole, wrapped, never cut
        assert " ".join(inc.action.split()) in body
        assert f"limit {fmt_num(inc.threshold)}" in body and f"onset {inc.onset_step}" in body
        chart = str(detail.query_one("#detail-chart").content)
        assert "KL k3 mean" in chart and "▔" in chart and f"limit {fmt_num(inc.last_threshold)}" in chart
        await pilot.press("x")
        assert app.store.incidents.records[kl_id].acknowledged
        await pilot.press("escape")
        assert app.screen is screen


async def test_number_keys_focus_then_zoom_then_restore() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        for number, panel in enumerate(("policy", "value", "advantage", "gradients", "lstm"), start=1):
            widget = app.dashboard.query_one(f"#{panel}", Panel)
            await pilot.press(str(number))
            assert widget.has_focus and app.dashboard.zoomed is None
            await pilot.press(str(number))
            assert app.dashboard.zoomed is widget
            await pilot.pause()
            assert widget.size.width > SIZE[0] - 10  # it really fills the screen's width
            # under the header, which still shows the step, and saying how to come back
            header = app.dashboard.query_one("#header")
            assert header.region.height == 2 and widget.region.y >= header.region.bottom
            assert "step" in str(header.render()) and "Esc: back" in str(widget.border_subtitle)
            others = [p for p in app.dashboard.query(Panel) if p is not widget]
            assert all(p.region.height == 0 or not p.display for p in others)
            await pilot.press("escape")
            assert app.dashboard.zoomed is None and not widget.border_subtitle


async def test_every_debug_report_can_be_scrolled_to_at_80x24() -> None:
    app = states.build("debug")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, DebugScreen)
        body, conflict = app.screen.query_one("#debug-body"), app.screen.query_one("#conflict")
        assert conflict.region.y >= 24  # below the screen at first
        await pilot.press("tab", "end")  # Tab: from the layer table to the reports
        await pilot.pause()
        assert body.scroll_y > 0 and conflict.region.bottom <= 24 - 1  # above the footer
        # the title wraps: the sort order is never cut off
        title = str(app.screen.query_one("#debug-title").render())
        assert "sorted by norm (descending)" in " ".join(title.split())


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
    """The recording's first entropy_collapse incident: each flagged head, at its incident's severity."""
    app = states.build("entropy_collapse")
    async with app.run_test(size=SIZE) as pilot:
        policy = app.dashboard.query_one("#policy", Panel)
        assert "ENTROPY COLLAPSE" not in policy.border_title
        assert "COLLAPSE" not in "".join(text(policy).splitlines()[: len(app.store.latest.run.heads)])
        await pilot.press("right")
        await pilot.pause()
        fired = [i for i in app.store.latest.incidents if i.kind == "entropy_collapse"]
        assert fired and all(i.scope.startswith("head:") for i in fired)
        critical = any(i.severity == "critical" for i in fired)
        glyph, cls = ("✖", "-crit") if critical else ("▲", "-warn")  # red / yellow border
        assert policy.has_class(cls)
        shown = text(policy)
        thr = app.store.latest.thresholds
        named = [
            i for i in fired if f"{kind_title('entropy_collapse')} ({i.scope[5:]})" in policy.border_title
        ]
        # words are never cut: the ones that do not fit are counted (+N), or, short of room even for
        # one head, the kind stands alone and the strip names the heads
        if named:
            assert len(named) == len(fired) or policy.border_title.endswith(f"+{len(fired) - len(named)}")
        else:
            assert policy.border_title.endswith(kind_title("entropy_collapse"))
            strip = text(app.dashboard.query_one("#anomalies", Panel))
            assert all(f"entropy_collapse ({i.scope[5:]})" in strip for i in fired)
        for i in fired:
            head = i.scope[5:]
            line = next(line for line in shown.splitlines() if f" {head} " in line)
            value = app.store.latest.policy.entropy_normalized[head]
            past = judge_entropy(thr, head, value) != Verdict.OK
            assert (f"{'✖' if i.severity == 'critical' else '▲'} COLLAPSE" in line) == past, line
        await until(pilot, lambda: any("ENTROPY COLLAPSE" in m for m in notes(app)), what="toast")
        assert glyph in policy.border_title


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


async def test_the_policy_panel_shows_the_last_epochs_kl_beside_the_mean() -> None:
    app = states.build("healthy")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1", "1")  # the policy panel, zoomed: its widest layout
        await pilot.pause()
        widget = app.dashboard.query_one("#policy", Panel)
        p = app.current_view().snap.policy
        assert p is not None and len(p.kl_k3_per_epoch) > 1 and p.kl_k3_per_epoch[-1] != p.kl_k3_mean
        shown = text(widget)
        # SB3's approx_kl is the last epoch's k3: a TensorBoard-reading user compares with it
        assert f"mean {fmt_num(p.kl_k3_mean)} last {fmt_num(p.kl_k3_per_epoch[-1])} max" in shown
        assert f"mean {fmt_num(p.kl_k1_mean)} last {fmt_num(p.kl_k1_per_epoch[-1])} max" in shown


async def test_kl_spike_and_nan_gradients_stand_out() -> None:
    app = states.build("kl_spike")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right")
        await pilot.pause()
        policy = app.dashboard.query_one("#policy", Panel)
        assert "KL SPIKE" in policy.border_title and "SPIKE" in text(policy)
        await until(
            pilot, lambda: any("KL SPIKE" in m or "incidents at" in m for m in notes(app)), what="toast"
        )
    app = states.build("nan")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right")
        await pilot.pause()
        grads = app.dashboard.query_one("#gradients", Panel)
        title = kind_title("numerical_instability")
        assert grads.has_class("-crit") and title in grads.border_title
        assert "NaN" in text(grads) and "NaN GRADIENTS" in text(grads)


async def test_three_updates_after_the_kl_spike_the_screen_still_names_it() -> None:
    """The alarm persists: the KL spike's incident is still in the Policy title (active, or cleared
    at a step the title states) and in the incident strip, three updates after its onset."""
    app = states.build("kl_spike_after")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        onset = app.replay.loaded.frames[states.position(app.replay.loaded, "kl_spike") - 1][1].step
        assert app.store.latest.step == onset + states.AFTER_SPIKE
        policy = app.dashboard.query_one("#policy", Panel)
        assert "KL SPIKE" in policy.border_title
        strip = app.dashboard.query_one("#anomalies", Panel)
        assert "kl_spike" in text(strip)
        assert " new" in str(app.dashboard.query_one("#header").content)


def alarms_on_screen(app: SimicApp) -> list[tuple[str, str]]:
    """(panel key, line) for every panel line with a ✖/▲ that carries an alarm word."""
    words = (
        "SPIKE",
        "COLLAPSE",
        "EXPLOSION",
        "EXPLODING",
        "EXPLODED",
        "VANISHING",
        "NaN GRADIENTS",
        "INF",
        "SATURATED",
        "DRIFT",
        "LOW",
        "NON-FINITE",
    )
    out = []
    for panel in app.dashboard.query(Panel):
        if panel.KEY == "anomalies":
            continue
        for line in text(panel).splitlines():
            if ("✖" in line or "▲" in line) and any(w in line for w in words):
                out.append((panel.KEY, line))
    return out


async def test_nothing_in_the_panels_contradicts_the_log() -> None:
    """Over the whole recording: a panel names an alarm (a word beside ✖/▲, an alarm border or title)
    only while an incident of one of its kinds is active; and every active incident shows."""
    loaded = states.recording()
    store = TelemetryStore(clock=lambda: states.FROZEN)
    replay = ReplaySource(loaded, store)
    app = SimicApp(store, replay=replay, clock=lambda: states.FROZEN)
    async with app.run_test(size=(160, 48)) as pilot:
        checked = 0
        for position in range(1, replay.total + 1):
            replay.seek(position)
            app.tick()
            active = {i.kind for i in store.latest.incidents}
            strip = text(app.dashboard.query_one("#anomalies", Panel))
            for i in store.latest.incidents:  # the strip shows each at its severity now, not its future peak
                glyph = "✖" if i.severity == "critical" else "▲"
                assert f"{glyph} {kind_scope(i)}" in strip, (store.latest.step, kind_scope(i))
            for key, line in alarms_on_screen(app):
                assert active & set(PANEL_KINDS[key]), (store.latest.step, key, line)
                checked += 1
            for panel in app.dashboard.query(Panel):
                if panel.KEY == "anomalies":
                    continue
                mine = active & set(PANEL_KINDS.get(panel.KEY, ()))
                assert (panel.has_class("-crit") or panel.has_class("-warn")) == bool(mine), (
                    store.latest.step,
                    panel.KEY,
                )
                for kind in mine:
                    assert kind_title(kind) in panel.border_title or "+" in panel.border_title
        assert checked > 0  # the recording does raise alarms
        await pilot.pause()


async def test_n_and_N_jump_between_incident_onsets_page_keys_move_ten_and_g_goes_to_a_step() -> None:
    app = states.build("healthy")
    replay = app.replay
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("home")
        assert replay.onsets and replay.position == 1
        for expected in replay.onsets:
            await pilot.press("n")
            assert replay.position == expected
            snap = app.store.latest
            assert any(e.event == "onset" for e in snap.incident_events)
        await pilot.press("n")  # none after the last: stays, and says so
        assert replay.position == replay.onsets[-1]
        await until(pilot, lambda: any("no incident onset after" in m for m in notes(app)), what="note")
        await pilot.press("N")
        assert replay.position == (replay.onsets[-2] if len(replay.onsets) > 1 else replay.onsets[-1])
        start = replay.position
        await pilot.press("pagedown")
        assert replay.position == min(start + 10, replay.total)
        await pilot.press("pageup", "pageup")
        assert replay.position == max(min(start + 10, replay.total) - 20, 0)
        target = replay.loaded.frames[57][1].step
        await pilot.press("g")
        assert isinstance(app.screen, GotoStepScreen)
        await pilot.press(*str(target), "enter")
        await until(pilot, lambda: app.screen is app.dashboard, what="back on the dashboard")
        assert app.store.latest.step == target
        await pilot.press("g", "escape")
        assert app.screen is app.dashboard and app.store.latest.step == target


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
