"""SVG snapshots of the rank display, fed from rank 0's recording of a real 4-rank run.

tests/fixtures/ranks_run.simrec comes from tests/fixtures/build_rank_recording.py: four gloo ranks
train the demo data-parallel with real hubs; rank 2 gets NaN gradients at update 5 and rank 3
straggles at update 9. Frames are found by content (the first update with a critical
rank_divergence incident, the first with a straggler), so a regenerated recording needs no test change.
Deterministic like the other snapshot tests: frozen clocks, fixed sizes, UTC, colours on.
Regenerate after an intended change with
``python -m pytest tests/test_tui_snapshots_ranks.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from simic_tui.app import SimicApp
from simic_tui.replay import LoadedRecording, ReplaySource, load_recording
from simic_tui.store import TelemetryStore
from simic_tui.widgets.ranks import rank_flags
from telemetry_core.schema import Snapshot

RECORDING = Path(__file__).parent / "fixtures" / "ranks_run.simrec"
FROZEN = 1_000.0
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


pytestmark = pytest.mark.usefixtures("deterministic_terminal")


@functools.cache
def _recording() -> LoadedRecording:
    return load_recording(RECORDING)


def _nan_rank(s: Snapshot) -> bool:
    return any(i.kind == "rank_divergence" and i.severity == "critical" for i in s.incidents)


def _straggler(s: Snapshot) -> bool:
    return s.ranks is not None and bool(s.ranks.straggler_ranks)


def _app(which: Callable[[Snapshot], bool]) -> SimicApp:
    loaded = _recording()
    frames = [s for _, s in loaded.frames]
    position = next(i for i, s in enumerate(frames) if which(s)) + 1
    store = TelemetryStore(clock=lambda: FROZEN)
    replay = ReplaySource(loaded, store)
    replay.seek(position)
    return SimicApp(store, replay=replay, clock=lambda: FROZEN)


def test_the_recording_holds_what_the_snapshots_show() -> None:
    frames = [s for _, s in _recording().frames]
    assert all(s.ranks is not None and s.ranks.world_size == 4 for s in frames)
    nan = next(s for s in frames if _nan_rank(s))
    assert [(f.rank, f.word) for f in rank_flags(nan) if f.word == "NaN"] == [(2, "NaN")]
    slow = next(s for s in frames if _straggler(s))
    assert slow.ranks is not None and slow.ranks.straggler_ranks == [3]


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_names_the_nan_rank(snap_compare, size: str) -> None:  # type: ignore[no-untyped-def]
    """Header: ranks 4 ✖ r2 NaN; Gradients panel: the rank row and its red border."""
    assert snap_compare(_app(_nan_rank), terminal_size=SIZES[size])


@pytest.mark.parametrize("size", SIZES)
def test_ranks_screen(snap_compare, size: str) -> None:  # type: ignore[no-untyped-def]
    """r: one row per rank, the straggler's rollout cell flagged, median/min/max, the rules."""
    assert snap_compare(_app(_straggler), press=("r",), terminal_size=SIZES[size])
