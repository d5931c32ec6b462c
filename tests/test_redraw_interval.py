"""The panels' redraw interval (``SimicApp.panel_interval``, set by a sweep): snapshots arriving faster
than it are coalesced into one redraw, the latest is drawn once the interval has passed, and a new
size is drawn at once. The real app, driven by Pilot, fed a real recording through the store."""

from __future__ import annotations

from pathlib import Path

from simic_tui.app import SimicApp
from simic_tui.fmt import fmt_num
from simic_tui.replay import load_recording
from simic_tui.store import TelemetryStore
from simic_tui.sweep import PANEL_INTERVAL
from simic_tui.widgets.policy import PolicyPanel
from simic_tui.widgets.value import ValuePanel

RECORDING = Path(__file__).parent / "fixtures" / "cmp_klspike.simrec"
FROZEN = 1_000.0


async def test_new_snapshots_wait_for_the_interval_and_a_resize_does_not() -> None:
    frames = load_recording(RECORDING).frames
    store = TelemetryStore(clock=lambda: FROZEN)
    for env, snap in frames[:5]:
        store.ingest(env, snap, quiet=True)
    app = SimicApp(store, clock=lambda: FROZEN)
    app.panel_interval = 60.0  # far longer than the test: nothing new is drawn by the timer
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        policy, value = app.dashboard.query_one(PolicyPanel), app.dashboard.query_one(ValuePanel)
        drawn = str(policy.render()), str(value.render())
        for env, snap in frames[5:15]:  # ten snapshots within the interval
            store.ingest(env, snap, quiet=True)
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        assert (str(policy.render()), str(value.render())) == drawn
        # a new size draws the latest at once
        await pilot.resize_terminal(110, 40)
        await pilot.pause(0.3)
        resized = str(value.render())
        assert resized != drawn[1]
        # without the interval, each new snapshot is drawn at the next tick
        app.panel_interval = 0.0
        env, snap = frames[15]
        store.ingest(env, snap, quiet=True)
        await pilot.pause(0.3)
        assert str(value.render()) != resized
        assert store.latest is not None
        assert fmt_num(store.latest.value.value_loss) in str(value.render())


async def test_with_the_sweeps_interval_the_latest_snapshot_is_drawn_within_it() -> None:
    frames = load_recording(RECORDING).frames
    store = TelemetryStore(clock=lambda: FROZEN)
    for env, snap in frames[:5]:
        store.ingest(env, snap, quiet=True)
    app = SimicApp(store, clock=lambda: FROZEN)
    app.panel_interval = PANEL_INTERVAL
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        value = app.dashboard.query_one(ValuePanel)
        for env, snap in frames[5:12]:
            store.ingest(env, snap, quiet=True)
            await pilot.pause(0.02)
        await pilot.pause(PANEL_INTERVAL + 0.5)  # the interval, and a tick after it
        app.panel_interval = 60.0  # from here nothing newer could be drawn: what shows is the latest
        final = str(value.render())
        reference = SimicApp(store, clock=lambda: FROZEN)
        async with reference.run_test(size=(120, 40)) as ref_pilot:
            await ref_pilot.pause(0.3)
            assert str(reference.dashboard.query_one(ValuePanel).render()) == final
