"""``attach --baseline``: the live run against a known-good recording's band at the same update.

The baseline is the healthy demo run (tests/fixtures/cmp_healthy.simrec); the "live" run is the
kl-spike demo run (cmp_klspike.simrec), fed through the store's ingest path or published by a real
Publisher over loopback. Bands and excursions are checked against a float64 reference computed here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from textual.content import Content

from simic_tui.app import SimicApp
from simic_tui.baseline import BAND_HALF_WIDTH, BAND_MARGIN, load_baseline
from simic_tui.client import TelemetryClient
from simic_tui.judge import GLYPH
from simic_tui.replay import ReplayError, load_recording
from simic_tui.screens.baseline import BaselineApp, BaselineScreen
from simic_tui.store import TelemetryStore
from simic_tui.target import resolve_target
from simic_tui.widgets.base import BAND_STYLE, OFF_BASELINE, Line, Panel
from simic_tui.widgets.policy import PolicyPanel
from telemetry_core.transport import Publisher

FIXTURES = Path(__file__).parent / "fixtures"
GOOD = FIXTURES / "cmp_healthy.simrec"
LIVE = FIXTURES / "cmp_klspike.simrec"
FROZEN = 1_000.0


def reference_band(name: str, step: int) -> tuple[float, float] | None:
    """The band by its definition: the baseline's finite values within +-BAND_HALF_WIDTH updates."""
    b = load_baseline(GOOD)
    vals = [
        float(v)
        for s, v, p in zip(b.trace.steps, b.trace.series[name], b.trace.present[name])
        if p and abs(int(s) - step) <= BAND_HALF_WIDTH and np.isfinite(v)
    ]
    if len(vals) < 2:
        return None
    lo, hi = min(vals), max(vals)
    pad = BAND_MARGIN * (hi - lo) + 1e-9 * max(abs(lo), abs(hi), 1e-300)
    return lo - pad, hi + pad


def fed_store(n: int) -> TelemetryStore:
    store = TelemetryStore(clock=lambda: FROZEN)
    for env, snap in load_recording(LIVE).frames[:n]:
        store.ingest(env, snap, quiet=True)
    store.drain_events()
    return store


def test_band_and_excursions_match_the_definition() -> None:
    b = load_baseline(GOOD)
    store = fed_store(25)
    frames = [s for _, s in load_recording(LIVE).frames[:25]]
    checked = 0
    for name in ("KL k3", "entropy/log|A|[force]", "grad norm (pre-clip)", "value loss"):
        lb = b.live(store, name, 25)
        assert lb is not None
        for i, snap in enumerate(frames):
            ref = reference_band(name, snap.step)
            if ref is None:
                assert np.isnan(lb.lo[i]) and not lb.outside[i]
                continue
            assert lb.lo[i] == pytest.approx(ref[0], rel=1e-12, abs=1e-15)
            assert lb.hi[i] == pytest.approx(ref[1], rel=1e-12, abs=1e-15)
            value = {
                "KL k3": snap.policy.kl_k3_mean,
                "entropy/log|A|[force]": snap.policy.entropy_normalized["force"],
                "grad norm (pre-clip)": snap.gradients.total_norm,
                "value loss": snap.value.value_loss,
            }[name]
            outside = not np.isfinite(value) or value < ref[0] or value > ref[1]
            assert bool(lb.outside[i]) == outside, (name, snap.step, value, ref)
            checked += 1
    assert checked > 50
    # the injected KL spike leaves the healthy run's KL band at its update
    spike = next(
        s.step
        for s in frames
        if any(e.incident.kind == "kl_spike" and e.event == "onset" for e in s.incident_events)
    )
    lb = b.live(store, "KL k3", 25)
    assert lb is not None and lb.outside[list(lb.steps).index(spike)]


def test_the_baseline_must_be_a_readable_recording(tmp_path: Path) -> None:
    bad = tmp_path / "x.simrec"
    bad.write_bytes(b"junk")
    with pytest.raises(ReplayError):
        load_baseline(bad)


def test_the_sparkline_draws_the_band_behind_and_marks_each_excursion() -> None:
    """Cell by cell, against the float64 reference band: tinted where the baseline has a band at
    that update, underlined where the live value left it, the off-baseline mark after it when the
    latest update did; the mark is never an alarm glyph or colour."""
    b = load_baseline(GOOD)
    frames = [s for _, s in load_recording(LIVE).frames[:25]]
    for n, width in ((18, 30), (25, 30), (25, 12)):
        store = fed_store(n)
        for name, column, value_of in (
            ("KL k3", "policy.kl_k3_mean", lambda s: s.policy.kl_k3_mean),
            ("value loss", "value.value_loss", lambda s: s.value.value_loss),
        ):
            content = Line().spark_of(store, column, width, baseline=b).build()
            cells = width - 2
            shown = frames[:n][-cells:]
            assert content.cell_length == len(shown) + 2
            styles: list[list[str]] = [[] for _ in range(content.cell_length)]
            for span in content.spans:
                for i in range(span.start, span.end):
                    styles[i].append(str(span.style))
            for i, snap in enumerate(shown):
                ref = reference_band(name, snap.step)
                value = value_of(snap)
                outside = ref is not None and (not np.isfinite(value) or not ref[0] <= value <= ref[1])
                assert (BAND_STYLE in " ".join(styles[i])) == (ref is not None), (name, snap.step)
                assert ("underline" in " ".join(styles[i])) == outside, (name, snap.step, value, ref)
                assert "$error" not in " ".join(styles[i]) and "$warning" not in " ".join(styles[i])
            ref = reference_band(name, shown[-1].step)
            last = value_of(shown[-1])
            latest_out = ref is not None and not ref[0] <= last <= ref[1]
            assert content.plain[-1] == (OFF_BASELINE if latest_out else " ")
            assert OFF_BASELINE not in GLYPH.values()
    # a column the baseline does not cover keeps the plain full-width sparkline
    assert "policy.early_stopped" not in b.trace.columns.values()
    plain = Line().spark_of(fed_store(20), "policy.early_stopped", 20, baseline=b).build()
    assert plain.cell_length == 20 and not any(BAND_STYLE in str(span.style) for span in plain.spans)


def panel_texts(app: SimicApp) -> dict[str, tuple[str, str, object]]:
    return {
        type(p).__name__: (str(p.render()), str(p.border_title), p.state) for p in app.dashboard.query(Panel)
    }


async def test_the_panels_draw_the_band_behind_their_own_sparklines() -> None:
    """The dashboard itself (not only b): excursions are marked in the panels, the borders, states,
    limits and banner are those of the same run without a baseline, and b still opens the overlay."""
    b = load_baseline(GOOD)
    store = fed_store(20)
    plain = SimicApp(fed_store(20), clock=lambda: FROZEN)
    async with plain.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        without = panel_texts(plain)
        plain_banners = plain.banners()
    app = BaselineApp(store, baseline=b, clock=lambda: FROZEN)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        expected = b.outside_now(store)
        assert "KL k3" not in expected and "value loss" in expected
        with_band = panel_texts(app)
        assert app.banners() == plain_banners  # a difference from the baseline is no alarm
        for panel, (_text, title, state) in with_band.items():
            assert (title, state) == without[panel][1:], panel
        value_text = with_band["ValuePanel"][0]
        loss_row = next(r for r in value_text.splitlines() if r.startswith("loss"))
        assert loss_row.endswith(OFF_BASELINE)
        policy_text = with_band["PolicyPanel"][0]
        kl_row = next(r for r in policy_text.splitlines() if r.startswith("KL k3"))
        assert not kl_row.rstrip().endswith(OFF_BASELINE)
        policy = app.dashboard.query_one(PolicyPanel)
        rendered = policy.render()
        assert isinstance(rendered, Content)
        assert any(BAND_STYLE in str(span.style) for span in rendered.spans)
        assert not any(
            "underline" in str(span.style) and ("$error" in str(span.style) or "$warning" in str(span.style))
            for span in rendered.spans
        )
        # zoomed, the panel's chart draws the band on its rows and marks the excursions under it
        await pilot.press("1", "1")
        await pilot.pause()
        assert policy.has_class("-zoomed")
        zoomed = str(policy.render())
        assert f"{OFF_BASELINE} off baseline" in zoomed and "outside " in zoomed
        assert any(BAND_STYLE in str(span.style) for span in policy.render().spans)  # type: ignore[union-attr]
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BaselineScreen)
        text = str(screen.query_one("#baseline-charts").render())
        assert "░" in text and "●" in text and OFF_BASELINE in text
        for name in b.names:
            if b.live(store, name, 1) is not None:
                assert name in text
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.dashboard


async def test_live_over_a_real_publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Publisher publishes the kl-spike run's snapshots; the attached app with the healthy
    baseline names the excursions as they arrive."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(runtime))
    snaps = [s for _, s in load_recording(LIVE).frames]
    pub = Publisher("tcp://127.0.0.1:0", run_name="klspike-s3", heartbeat_interval=0.2).start()
    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.is_set() and i < len(snaps):
            pub.publish_snapshot(snaps[i])
            pub.poll_commands()
            i += 1
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    try:
        assert pub.endpoints is not None
        target = resolve_target(pub.endpoints.pub.replace("tcp://", ""))
        store = TelemetryStore()
        app = BaselineApp(store, client=TelemetryClient(target, store), baseline=load_baseline(GOOD))
        async with app.run_test(size=(120, 40)) as pilot:
            thread.start()
            deadline = time.monotonic() + 60
            while (
                store.latest is None or store.latest.step < snaps[-1].step
            ) and time.monotonic() < deadline:
                await pilot.pause(0.1)
            assert store.latest is not None and store.latest.step == snaps[-1].step
            await pilot.press("b")
            await pilot.pause()
            assert isinstance(app.screen, BaselineScreen)
            lb = app.baseline.live(store, "KL k3", 100)
            assert lb is not None and lb.outside.any()
            text = str(app.screen.query_one("#baseline-charts").render())
            assert "KL k3" in text and "◇" in text
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        pub.close()


@pytest.mark.usefixtures("deterministic_terminal")
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_baseline_overlay_snapshot(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    app = BaselineApp(fed_store(20), baseline=load_baseline(GOOD), clock=lambda: FROZEN)
    assert snap_compare(app, press=["b"], terminal_size=size)


@pytest.mark.usefixtures("deterministic_terminal")
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_baseline_dashboard_snapshot(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """The dashboard's panels with the healthy run's band behind their sparklines (and charts, where
    160x48 leaves them rows)."""
    app = BaselineApp(fed_store(20), baseline=load_baseline(GOOD), clock=lambda: FROZEN)
    assert snap_compare(app, terminal_size=size)
