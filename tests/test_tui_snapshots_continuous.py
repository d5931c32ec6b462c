"""SVG snapshots of the dashboard on a continuous-action run (one diagonal Gaussian head), fed from the
committed recording tests/fixtures/continuous_run.simrec (built by build_continuous_recording.py):
the Policy panel shows the head's log-std (mean, min-max, trend, history), differential entropy and
the share of its actions beyond the bounds, with the std_collapse and action_saturation alarms.

Deterministic as the other snapshot tests: frozen clocks, fixed sizes, UTC. Regenerate after an
intended change with ``python -m pytest tests/test_tui_snapshots_continuous.py --snapshot-update``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from simic_tui.app import SimicApp
from simic_tui.replay import LoadedRecording, ReplaySource, load_recording
from simic_tui.store import TelemetryStore
from telemetry_core.schema import Snapshot

RECORDING = Path(__file__).parent / "fixtures" / "continuous_run.simrec"
FROZEN = 1_000.0

pytestmark = pytest.mark.usefixtures("deterministic_terminal")


@functools.cache
def recording() -> LoadedRecording:
    return load_recording(RECORDING)


def _opens(kind: str) -> Callable[[Snapshot], bool]:
    return lambda s: any(e.event == "onset" and e.incident.kind == kind for e in s.incident_events)


def _healthy(s: Snapshot) -> bool:
    return s.policy is not None and "action" in s.policy.log_std_trend and not s.anomalies


def position(which: Callable[[Snapshot], bool], last: bool = False) -> int:
    frames = [s for _, s in recording().frames]
    matches = [i for i, s in enumerate(frames) if which(s)]
    assert matches, "the continuous recording lacks that frame"
    return matches[-1 if last else 0] + 1


def app_at(count: int) -> SimicApp:
    store = TelemetryStore(clock=lambda: FROZEN)
    replay = ReplaySource(recording(), store)
    replay.seek(count)
    return SimicApp(store, replay=replay, clock=lambda: FROZEN)


def test_the_recording_holds_what_the_snapshots_show() -> None:
    frames = [s for _, s in recording().frames]
    first_collapse = position(_opens("std_collapse"))
    first_saturation = position(_opens("action_saturation"))
    assert first_collapse < first_saturation
    snap = frames[first_saturation - 1]
    assert snap.policy is not None and snap.policy.action_saturation_max["action"] > 0.5
    assert {i.kind for i in snap.incidents} >= {"std_collapse", "action_saturation"}


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_continuous_dashboard_healthy(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """A healthy update: the Gaussian head's log-std line, entropy in nats and saturation share."""
    assert snap_compare(app_at(position(_healthy, last=True)), terminal_size=size)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_continuous_policy_panel_alarms(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """Stepping onto the update where action_saturation opens, with std_collapse still active; the
    Policy panel zoomed at the compact size."""
    press = ("right", "1", "1") if size == (80, 24) else ("right",)
    app = app_at(position(_opens("action_saturation")) - 1)
    assert snap_compare(app, press=press, terminal_size=size)
