"""The sweep table: its rows against the snapshots, sort, filter, badge, drill-in and back (Pilot on the
real SweepApp), the scan of a runtime directory holding real publishers' connection files, and SVG
snapshots at 80x24 and 160x48 (regenerate with ``pytest tests/test_sweep.py --snapshot-update``).

The table's state comes from tests/fixtures/sweep_states.py: five real recorded runs fed through the
live ingest path, frozen clocks, no network. The live behaviour (real trainers found, killed,
restarted, commanded) is tests/test_sweep_live.py.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
from textual.widgets import Input

from simic_tui.screens.sweep import SweepDashboard, SweepScreen, SweepTable
from simic_tui.sweep import (
    BACKGROUND_RECEIVE_INTERVAL,
    SORT_KEYS,
    filter_rows,
    row_of,
    scan_targets,
    sort_rows,
)
from telemetry_core.transport import Publisher

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import sweep_states

SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


def test_rows_are_the_latest_updates_numbers() -> None:
    for run in sweep_states.runs():
        row = row_of(run)
        snap = run.store.latest
        assert snap is not None
        assert row.name == snap.run.name
        assert row.step == snap.step and row.planned == snap.run.planned_updates
        assert row.level == snap.level.level
        assert row.kl == snap.policy.kl_k3_mean or (math.isnan(row.kl) and math.isnan(snap.policy.kl_k3_mean))  # type: ignore[arg-type]
        ev = snap.value.explained_variance
        assert row.ev == ev or (ev is not None and math.isnan(ev) and math.isnan(row.ev))  # type: ignore[arg-type]
        assert row.entropy == dict(snap.policy.entropy_normalized)
        assert row.active == len(snap.incidents)
        want = {"critical"} & {i.severity for i in snap.incidents} or {i.severity for i in snap.incidents}
        assert row.worst == (max(want) if want else "")
        # return: this update's, or that of the last update that finished an episode
        counts = run.store.series("episodes.count")
        returns = run.store.series("episodes.return_mean")
        finished = [float(v) for c, v in zip(counts, returns) if c > 0]
        assert row.episode_return == (finished[-1] if finished else None)


def test_sort_and_filter_follow_their_keys() -> None:
    rows = [row_of(r) for r in sweep_states.runs()]
    for key in SORT_KEYS:
        for desc in (False, True):
            ordered = sort_rows(rows, key, desc)
            assert sorted(r.key for r in ordered) == sorted(r.key for r in rows)
    by_step = sort_rows(rows, "step", descending=False)
    progress = [r.progress for r in by_step]
    assert progress == sorted(progress)
    kl = [r.kl for r in sort_rows(rows, "kl") if r.kl is not None and math.isfinite(r.kl)]
    assert kl == sorted(kl)
    # unknown values (NaN) sort last either way
    assert all(r.kl is None or math.isfinite(r.kl) for r in sort_rows(rows, "kl", True)[: len(kl)])
    assert [r.name for r in filter_rows(rows, "klspike")] == ["klspike-s3"]
    critical = filter_rows(rows, "!!")
    assert critical and all(r.worst == "critical" for r in critical)
    active = filter_rows(rows, "!")
    assert {r.key for r in active} == {r.key for r in rows if r.active}
    assert filter_rows(rows, "stale") == [r for r in rows if r.link.startswith("stale")]


def test_scan_finds_live_publishers_and_skips_dead_or_unsafe_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(runtime))
    pubs = [Publisher("tcp://127.0.0.1:0", run_name=f"run{i}").start() for i in range(2)]
    try:
        directory = runtime / "simic-tui"
        found = scan_targets(directory)
        assert sorted(label for label, _ in found) == ["run0", "run1"]
        for _, target in found:
            assert target.can_command and target.curve  # keys from the file: commands work
        # a file left by a process that is gone, and one other users could read: skipped
        stale = directory / "127.0.0.1-1.json"
        text = pubs[0].connection_path.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999')  # type: ignore[union-attr]
        stale.write_text(text)
        stale.chmod(0o600)
        open_file = directory / "127.0.0.1-2.json"
        open_file.write_text(pubs[1].connection_path.read_text())  # type: ignore[union-attr]
        open_file.chmod(0o644)
        assert sorted(label for label, _ in scan_targets(directory)) == ["run0", "run1"]
    finally:
        for p in pubs:
            p.close()


async def test_a_scan_joins_new_trainers_up_to_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trainers whose connection files appear later join on the next look; beyond the cap the title
    says how many were left out (the cap lowered to 1 here, with real publishers' files)."""
    import simic_tui.screens.sweep as sweep_screen

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(runtime))
    directory = runtime / "simic-tui"
    directory.mkdir(mode=0o700)
    app = sweep_screen.SweepApp([], scan=True, scan_dir=directory, run_clients=False, clock=lambda: 0.0)
    pubs: list[Publisher] = []
    try:
        async with app.run_test(size=(160, 30)) as pilot:
            await pilot.pause()
            assert app.runs == []
            monkeypatch.setattr(sweep_screen, "MAX_SWEEP_RUNS", 1)
            pubs = [Publisher("tcp://127.0.0.1:0", run_name=f"late{i}").start() for i in range(2)]
            assert app.rescan() == 1 and app.left_out == 1
            app.sweep.refresh_view()
            await pilot.pause()
            assert "1 more trainer(s) found, not shown (at most 1)" in str(
                app.sweep.query_one("#sweep-title").render()
            )
            assert any("joined the sweep" in n.message for n in app._notifications)
            monkeypatch.setattr(sweep_screen, "MAX_SWEEP_RUNS", 64)
            assert app.rescan() == 1 and app.left_out == 0
            assert sorted(r.label for r in app.runs) == ["late0", "late1"]
            assert app.rescan() == 0  # the same files again: nothing new
    finally:
        for p in pubs:
            p.close()


# ---------------------------------------------------------------------------------------------
# Pilot
# ---------------------------------------------------------------------------------------------


def order(screen: SweepScreen) -> list[str]:
    return [r.name for r in screen.rows]


async def test_sort_keys_and_header_clicks_reorder_the_table() -> None:
    app = sweep_states.build()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SweepScreen)
        table = screen.query_one(SweepTable)
        rows = [row_of(r) for r in app.runs]
        # default: worst incidents first
        assert order(screen) == [r.name for r in sort_rows(rows, "incidents", True)]
        await pilot.press("s")  # next key: name
        await pilot.pause()
        assert screen.sort_key == "name"
        assert order(screen) == sorted(order(screen), key=str.lower)
        assert [table.row_text(i)[0] for i in range(table.row_count)] == order(screen)
        await pilot.press("S")
        await pilot.pause()
        assert order(screen) == sorted(order(screen), key=str.lower, reverse=True)
        assert "sort: run ↓" in str(screen.query_one("#sweep-title").render())
        await pilot.click("#sweep-table", offset=(2, 0))  # the "run" header: flips the order again
        await pilot.pause()
        assert order(screen) == sorted(order(screen), key=str.lower)


async def test_filter_narrows_the_rows_and_esc_clears_it() -> None:
    app = sweep_states.build()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SweepScreen)
        await pilot.press("slash")
        await pilot.pause()
        box = screen.query_one(Input)
        assert box.has_focus
        await pilot.press(*"nangrad")
        await pilot.pause()
        assert order(screen) == ["nangrad-s5"]
        assert "filter: 'nangrad' (1 of 5)" in str(screen.query_one("#sweep-title").render())
        await pilot.press("enter")  # closes the box, keeps the filter
        await pilot.pause()
        assert not box.has_class("-open") and order(screen) == ["nangrad-s5"]
        assert screen.query_one(SweepTable).has_focus
        await pilot.press("escape")
        await pilot.pause()
        assert len(screen.rows) == 5


async def test_enter_opens_the_runs_dashboard_and_esc_returns() -> None:
    app = sweep_states.build()
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SweepScreen)
        table = screen.query_one(SweepTable)
        for i in range(len(screen.rows)):
            table.move_cursor(row=i)
            key = screen.rows[i].key
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, SweepDashboard)
            run = app.run_by_key(key)
            assert run is not None and app.store is run.store and app.client is run.client
            # the run on screen is woken by each frame; the others drain in batches
            assert run.client.receive_interval == 0.0
            assert all(
                r.client.receive_interval == BACKGROUND_RECEIVE_INTERVAL for r in app.runs if r is not run
            )
            header = str(app.screen.query_one("#header").render())
            assert run.store.latest is not None and run.store.latest.run.name in header
            # Esc with a zoomed panel unzooms first; the next one goes back to the table
            await pilot.press("1", "1")
            await pilot.pause()
            assert app.screen.zoomed is not None
            await pilot.press("escape")
            await pilot.pause()
            assert isinstance(app.screen, SweepDashboard) and app.screen.zoomed is None
            await pilot.press("escape")
            await pilot.pause()
            assert app.screen is screen
            assert table.cursor_row == i  # the cursor stays on the run
            assert all(r.client.receive_interval == BACKGROUND_RECEIVE_INTERVAL for r in app.runs)


async def test_the_palette_offers_dashboard_commands_only_inside_a_run() -> None:
    app = sweep_states.build()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert not any(t.startswith("DEBUG") or "(d)" in t for t in titles)
        await pilot.press("enter")
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert any("(d)" in t for t in titles)


async def test_the_badge_counts_every_runs_incidents() -> None:
    app = sweep_states.build()
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.pause()
        rows = [row_of(r) for r in app.runs]
        hit = [r for r in rows if r.active]
        assert hit, "the fixture runs have active incidents"
        title = str(app.screen.query_one("#sweep-title").render())
        assert f"{len(hit)} runs with active incidents ({sum(r.active for r in hit)} active" in title
        assert ("✖" in title) == any(r.worst == "critical" for r in hit)


@pytest.mark.usefixtures("deterministic_terminal")
@pytest.mark.parametrize("size", SIZES)
def test_sweep_snapshot(snap_compare, size: str) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(sweep_states.build(), terminal_size=SIZES[size])
