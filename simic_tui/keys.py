"""Every key of the dashboard, declared once.

The Footer, the help screen and the command palette all read these lists, so they cannot disagree
(posting's habit: ``Binding(..., id=..., tooltip=...)``). Ids are stable names for keymaps.
"""

from __future__ import annotations

from textual.binding import Binding

__all__ = [
    "APP_BINDINGS",
    "DASHBOARD_BINDINGS",
    "DEBUG_BINDINGS",
    "LIVE_ONLY",
    "REPLAY_BINDINGS",
    "REPLAY_ONLY",
]

_PANELS = Binding.Group("Panels", compact=True)
_STEP = Binding.Group("Step", compact=True)

APP_BINDINGS: list[Binding] = [
    Binding("q", "quit", "Quit", id="quit", tooltip="Quit the dashboard (a demo trainer is stopped cleanly)"),
    Binding("question_mark", "help", "Help", key_display="?", id="help", tooltip="Keys, colours and glyphs"),
]

DASHBOARD_BINDINGS: list[Binding] = [
    Binding(
        "d",
        "debug",
        "DEBUG",
        id="debug_lease",
        tooltip="Request a DEBUG lease from the trainer (renewed while you keep it) and open the DEBUG screen",
    ),
    Binding(
        "n", "set_level('NORMAL')", "Normal", id="level_normal", tooltip="Set the trainer's level to NORMAL"
    ),
    Binding(
        "m",
        "set_level('MINIMAL')",
        "Minimal",
        id="level_minimal",
        tooltip="Set the trainer's level to MINIMAL",
    ),
    Binding(
        "P",
        "profile",
        "Profile",
        key_display="P",
        id="profile",
        tooltip="Capture a torch.profiler trace of the next updates; shows where the trace was written",
    ),
    Binding(
        "p", "toggle_pause", "Pause", id="pause_display", tooltip="Freeze the display; data keeps arriving"
    ),
    Binding(
        "1", "panel(1)", "Policy", id="panel_policy", group=_PANELS, tooltip="Focus Policy (again: zoom)"
    ),
    Binding("2", "panel(2)", "Value", id="panel_value", group=_PANELS, tooltip="Focus Value (again: zoom)"),
    Binding(
        "3",
        "panel(3)",
        "Advantage",
        id="panel_advantage",
        group=_PANELS,
        tooltip="Focus Advantage (again: zoom)",
    ),
    Binding(
        "4",
        "panel(4)",
        "Gradients",
        id="panel_gradients",
        group=_PANELS,
        tooltip="Focus Gradients (again: zoom)",
    ),
    Binding("5", "panel(5)", "LSTM", id="panel_lstm", group=_PANELS, tooltip="Focus LSTM (again: zoom)"),
    Binding("escape", "unzoom", "Unzoom", show=False, id="unzoom", tooltip="Restore a zoomed panel"),
    Binding("a", "anomalies", "Anomalies", id="anomaly_log", tooltip="The full anomaly log"),
    Binding("t", "thresholds", "Thresholds", id="thresholds", tooltip="The trainer's thresholds and why"),
]

REPLAY_BINDINGS: list[Binding] = [
    Binding("space", "play_pause", "Play", id="replay_play", tooltip="Play or pause the replay"),
    Binding(
        "left", "step(-1)", "Back", key_display="←", id="replay_back", group=_STEP, tooltip="One update back"
    ),
    Binding(
        "right", "step(1)", "Fwd", key_display="→", id="replay_forward", group=_STEP, tooltip="One update on"
    ),
    Binding("home", "seek_start", "Start", id="replay_start", show=False, tooltip="Go to the first update"),
    Binding("end", "seek_end", "End", id="replay_end", show=False, tooltip="Go to the last update"),
    Binding(
        "plus,equals_sign", "speed(1)", "Faster", key_display="+", id="replay_faster", tooltip="Replay faster"
    ),
    Binding("minus", "speed(-1)", "Slower", key_display="-", id="replay_slower", tooltip="Replay slower"),
]

DEBUG_BINDINGS: list[Binding] = [
    Binding("escape", "app.pop_screen", "Back", id="debug_back", tooltip="Back to the dashboard"),
    Binding("s", "sort_next", "Sort", id="debug_sort", tooltip="Sort the layer table by the next column"),
    Binding("r", "sort_reverse", "Reverse", id="debug_reverse", tooltip="Reverse the layer table's order"),
]

# Actions that only make sense with a live trainer, or only in a replay (hidden otherwise).
LIVE_ONLY = frozenset({"set_level", "profile"})
REPLAY_ONLY = frozenset({"play_pause", "step", "seek_start", "seek_end", "speed"})
