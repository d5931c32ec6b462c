"""What the dashboard shows of things a run does not have: no LSTM, LSTM gates not fed.

The real app driven by Pilot, fed real snapshots of the fixture recording with the section changed
the way a feed-forward model or a loop without ``lstm_inputs`` changes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from simic_tui.app import SimicApp
from simic_tui.store import TelemetryStore
from simic_tui.widgets.base import Panel
from telemetry_core.protocol import decode_envelope, encode_envelope
from telemetry_core.schema import Snapshot

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from build_recording import Run


def _store(change) -> TelemetryStore:  # type: ignore[no-untyped-def]
    store = TelemetryStore(clock=lambda: 1000.0)
    run = Run()
    for k in range(30):
        snap: Snapshot = change(run.snapshot(k, k + 1))
        env = decode_envelope(encode_envelope("snapshot", snap, session="s1", seq=k + 1, step=snap.step))
        store.ingest(env, snap)
    return store


async def _lstm_text(store: TelemetryStore) -> tuple[str, int]:
    app = SimicApp(store, clock=lambda: 1000.0)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.3)
        panel = app.dashboard.query_one("#lstm", Panel)
        text = str(panel.content)
        return text, len([line for line in text.splitlines() if line.strip()])


async def test_a_model_without_an_lstm_gets_one_line_and_no_empty_chart() -> None:
    text, lines = await _lstm_text(_store(lambda s: msgspec.structs.replace(s, lstm=None)))
    assert "no LSTM in this run" in text
    assert "‖c‖" not in text and lines == 1


async def test_an_lstm_whose_gates_were_not_fed_says_so() -> None:
    def unfed(s: Snapshot) -> Snapshot:
        assert s.lstm is not None
        return msgspec.structs.replace(
            s, lstm=msgspec.structs.replace(s.lstm, gate_saturation={}, gates_fed=False, gates_not_fed=s.step)
        )

    store = _store(unfed)
    assert store.latest is not None and store.latest.lstm is not None
    text, _ = await _lstm_text(store)
    assert f"gates    not fed ({store.latest.lstm.gates_not_fed} updates)" in text and "pass lstm_inputs= to end_update" in text
    assert "…" not in text
    assert "‖c‖ (cell state norm)" in text  # the recurrent state itself is still charted


# A hub's message as it reads it ("where: type: text", up to 300 characters), with what a hostile or
# careless exception text can carry: a terminal escape sequence and a line break.
FIRST_ERROR = (
    "observe_minibatch: ValueError: mask of shape (64, 7) does not match the logits of shape (64, 9);"
    "\x1b[2J\n the action mask was applied before the head split, so every statistic of this minibatch "
    "that needs the masked distribution (entropy, KL, clip fraction) was skipped"
)
LATEST_ERROR = "end_update: RuntimeError: the gradient hook saw a tensor on another device (cuda:1 vs cuda:0)"


def _erring(k: int, snap: Snapshot) -> Snapshot:
    """Clean for ten updates, then the first error (counted once per update), then another one."""
    if k < 10:
        return snap
    message = FIRST_ERROR if k < 20 else LATEST_ERROR
    counters = msgspec.structs.replace(snap.counters, telemetry_errors=k - 9, last_telemetry_error=message)
    return msgspec.structs.replace(snap, counters=counters)


def _feed(store: TelemetryStore, run: Run, ks: range) -> list[int]:
    """Through the live path: encoded, decoded, checked and sanitised, then ingested; their steps."""
    steps = []
    for k in ks:
        snap = _erring(k, run.snapshot(k, k + 1))
        store.ingest_bytes(encode_envelope("snapshot", snap, session="s1", seq=k + 1, step=snap.step))
        steps.append(snap.step)
    return steps


def _footer(app: SimicApp) -> list[str]:
    from textual.widgets._footer import FooterKey

    return [f"{k.key_display} {k.description}" for k in app.screen.query(FooterKey)]


async def test_telemetry_errors_are_offered_on_e_and_shown_whole_and_clean() -> None:
    from textual.widgets import Static

    from simic_tui.screens.errors import TelemetryErrorsScreen
    from simic_tui.screens.help import HelpScreen

    store, run = TelemetryStore(clock=lambda: 1000.0), Run()
    _feed(store, run, range(10))
    app = SimicApp(store, clock=lambda: 1000.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        assert "e Errors" not in _footer(app)  # nothing to show: not offered, and e does nothing
        await pilot.press("e")
        await pilot.pause()
        assert app.screen is app.dashboard
        steps = _feed(store, run, range(10, 30))  # errors arrive while the dashboard runs
        await pilot.pause(0.3)
        assert "e Errors" in _footer(app)  # at 80 columns too: entries of lower rank make room
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "Telemetry errors" in str(app.screen.query_one("#help-section-0", Static).render())
        await pilot.press("escape", "e")
        await pilot.pause()
        assert isinstance(app.screen, TelemetryErrorsScreen)
        body = app.screen.query_one("#errors-text", Static)
        text = str(body.render())
        flat = " ".join(text.split())  # the messages wrap in the body: read them back as one line
        assert "20 telemetry errors swallowed by the trainer" in flat
        # each message whole, without its control characters or line break, the latest first
        first = " ".join(FIRST_ERROR.replace("\x1b", "").split())
        assert first in flat and LATEST_ERROR in flat
        assert flat.index(LATEST_ERROR) < flat.index(first)
        assert "\x1b" not in text and "…" not in text
        # wrapped inside the body, not cut at its edge: more rows on screen than lines of text
        assert body.region.width < 80 and body.region.height > len(text.splitlines()) + 3
        assert f"at step {steps[10]} (11 errors by then)" in flat and f"at step {steps[0]} (1 error by then)" in flat
        await pilot.press("e")
        await pilot.pause()
        assert app.screen is app.dashboard
