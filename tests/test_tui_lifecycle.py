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
