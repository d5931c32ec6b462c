"""SVG snapshots of the dashboard's other screens (DEBUG, help, thresholds, the grouped incident log and
an incident's detail pane, zoom, the telemetry errors) and of
the too-small notice and the connecting state, fed from the committed recording. See
test_tui_snapshots_dashboard.py for how determinism is ensured and how to regenerate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import states

SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


pytestmark = pytest.mark.usefixtures("deterministic_terminal")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "state",
    [
        "debug_screen",
        "help",
        "thresholds",
        "anomaly_log",
        "incident_detail",
        "zoom",
        "connecting",
        "telemetry_errors",
    ],
)
def test_screen(snap_compare, state: str, size: str) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(states.build(state), press=states.STATES[state].press, terminal_size=SIZES[size])


def test_too_small_notice(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(states.build("healthy"), terminal_size=(60, 18))
