"""Every key of the dashboard, declared once.

The Footer, the help screen and the command palette all read these lists, so they cannot disagree
(posting's habit: ``Binding(..., id=..., tooltip=...)``). Ids are stable names for keymaps. Keys
that come in runs (1-5, ←/→, +/-) share one Footer entry so the Footer fits 80 columns; the help
screen and the palette list each one.
"""

from __future__ import annotations

from textual.binding import Binding

__all__ = [
    "APP_BINDINGS",
    "DASHBOARD_BINDINGS",
    "DEBUG_BINDINGS",
    "FOOTER_ORDER",
    "INCIDENT_LOG_BINDINGS",
    "KEEP_LEASE_BINDINGS",
    "LIVE_ONLY",
    "PALETTE_TITLES",
    "REPLAY_BINDINGS",
    "REPLAY_ONLY",
]

APP_BINDINGS: list[Binding] = [
    Binding(
        "question_mark", "app.help", "Help", key_display="?", id="help", tooltip="Keys, colours and glyphs"
    ),
    Binding(
        "q", "app.quit", "Quit", id="quit", tooltip="Quit the dashboard (a demo trainer is stopped cleanly)"
    ),
]

DASHBOARD_BINDINGS: list[Binding] = [
    Binding(
        "d",
        "debug",
        "DEBUG",
        id="debug_lease",
        tooltip="Take a DEBUG lease (bounded; renewed while attached) and open the DEBUG screen; again: release it",
    ),
    Binding("x", "release_debug", "Release", show=False, id="debug_release", tooltip="Release the DEBUG lease now"),
    Binding(
        "n",
        "set_level('NORMAL')",
        "Level",
        key_display="n/m",
        id="level_normal",
        tooltip="Set the trainer's level to NORMAL",
    ),
    Binding(
        "m",
        "set_level('MINIMAL')",
        "Minimal",
        show=False,
        id="level_minimal",
        tooltip="Set the trainer's level to MINIMAL",
    ),
    Binding(
        "P",
        "profile",
        "Profile",
        key_display="P",
        id="profile",
        tooltip="Capture a torch.profiler trace; the header shows where it went",
    ),
    Binding(
        "p", "toggle_pause", "Pause", id="pause_display", tooltip="Freeze the display; data keeps arriving"
    ),
    Binding(
        "1", "panel(1)", "Panels", key_display="1-5", id="panel_policy", tooltip="Focus Policy (again: zoom)"
    ),
    Binding("2", "panel(2)", "Value", show=False, id="panel_value", tooltip="Focus Value (again: zoom)"),
    Binding(
        "3",
        "panel(3)",
        "Advantage",
        show=False,
        id="panel_advantage",
        tooltip="Focus Advantage (again: zoom)",
    ),
    Binding(
        "4",
        "panel(4)",
        "Gradients",
        show=False,
        id="panel_gradients",
        tooltip="Focus Gradients (again: zoom)",
    ),
    Binding("5", "panel(5)", "LSTM", show=False, id="panel_lstm", tooltip="Focus LSTM (again: zoom)"),
    Binding("escape", "unzoom", "Unzoom", show=False, id="unzoom", tooltip="Restore a zoomed panel"),
    Binding(
        "a", "anomalies", "Log", id="anomaly_log", tooltip="The incident log: filter, acknowledge, details"
    ),
    Binding(
        "X",
        "acknowledge_all",
        "Ack all",
        key_display="X",
        id="incidents_ack_all",
        tooltip="Acknowledge every incident (the header's new count goes to 0)",
    ),
    Binding(
        "t", "thresholds", "Limits", id="thresholds", tooltip="The trainer's thresholds (limits) and why"
    ),
    Binding(
        "e",
        "telemetry_errors",
        "Errors",
        id="telemetry_errors",
        tooltip="The trainer's latest telemetry errors in full (swallowed so training goes on; offered "
        "while there are any)",
    ),
    Binding(
        "r",
        "ranks",
        "Ranks",
        show=False,
        id="ranks",
        tooltip="Every rank's statistics of a multi-rank (torchrun) run, and which rank diverges",
    ),
]

REPLAY_BINDINGS: list[Binding] = [
    Binding("space", "play_pause", "Play", id="replay_play", tooltip="Play or pause the replay"),
    Binding("left", "step(-1)", "Step", key_display="←→", id="replay_back", tooltip="One update back"),
    Binding(
        "right",
        "step(1)",
        "Forward",
        show=False,
        key_display="→",
        id="replay_forward",
        tooltip="One update on",
    ),
    Binding(
        "pageup",
        "step(-10)",
        "-10",
        show=False,
        key_display="PgUp",
        id="replay_page_back",
        tooltip="Ten updates back",
    ),
    Binding(
        "pagedown",
        "step(10)",
        "+10",
        show=False,
        key_display="PgDn",
        id="replay_page_forward",
        tooltip="Ten updates on",
    ),
    Binding(
        "n",
        "incident(1)",
        "Incident",
        key_display="n/N",
        id="replay_next_incident",
        tooltip="Go to the next incident onset",
    ),
    Binding(
        "N",
        "incident(-1)",
        "Previous incident",
        show=False,
        key_display="N",
        id="replay_previous_incident",
        tooltip="Go to the previous incident onset",
    ),
    Binding("g", "goto", "Go to", id="replay_goto", tooltip="Go to a step (type it, Enter)"),
    Binding("home", "seek_start", "Start", show=False, id="replay_start", tooltip="Go to the first update"),
    Binding("end", "seek_end", "End", show=False, id="replay_end", tooltip="Go to the last update"),
    Binding(
        "plus,equals_sign", "speed(1)", "Speed", key_display="+-", id="replay_faster", tooltip="Replay faster"
    ),
    Binding(
        "minus",
        "speed(-1)",
        "Slower",
        show=False,
        key_display="-",
        id="replay_slower",
        tooltip="Replay slower",
    ),
]

INCIDENT_LOG_BINDINGS: list[Binding] = [
    Binding("escape,a", "app.pop_screen", "Back", id="anomalies_back", tooltip="Back to the dashboard"),
    Binding(
        "enter",
        "detail",
        "Detail",
        id="incident_detail",
        tooltip="The incident whole: message, value against limit, what to try, its history",
    ),
    Binding(
        "x", "acknowledge", "Ack", id="incident_ack", tooltip="Acknowledge the incident under the cursor"
    ),
    Binding(
        "X",
        "acknowledge_all",
        "Ack all",
        key_display="X",
        id="incident_ack_all",
        tooltip="Acknowledge every incident",
    ),
    Binding(
        "s",
        "filter_severity",
        "Severity",
        id="incident_filter_severity",
        tooltip="Filter: all, critical, warning incidents",
    ),
    Binding(
        "k", "filter_kind", "Kind", id="incident_filter_kind", tooltip="Filter: every kind, or one at a time"
    ),
]

DEBUG_BINDINGS: list[Binding] = [
    Binding("escape", "back", "Back", id="debug_back", tooltip="Back to the dashboard (asks whether to keep a lease)"),
    Binding("x", "release_debug", "Release", id="debug_release_here", tooltip="Release the DEBUG lease now"),
    Binding("d", "toggle_debug", "DEBUG", show=False, id="debug_toggle_here", tooltip="Release the lease, or take one"),
    Binding("s", "sort_next", "Sort", id="debug_sort", tooltip="Sort the layer table by the next column"),
    Binding("r", "sort_reverse", "Reverse", id="debug_reverse", tooltip="Reverse the layer table's order"),
    Binding(
        "tab",
        "app.focus_next",
        "Reports",
        id="debug_reports",
        tooltip="Between the layer table and the reports below it (PgUp/PgDn/Home/End then scroll them)",
    ),
]

KEEP_LEASE_BINDINGS: list[Binding] = [
    Binding("k,enter", "keep", "Keep", id="lease_keep", tooltip="Keep the DEBUG lease until its bound"),
    Binding("x,r", "release", "Release", id="lease_release", tooltip="Release the DEBUG lease now"),
    Binding("escape", "stay", "Stay", id="lease_stay", tooltip="Stay on the DEBUG screen"),
]

# Actions that only make sense with a live trainer, or only in a replay (hidden otherwise).
LIVE_ONLY = frozenset({"set_level", "profile", "toggle_pause"})  # in a replay, space pauses
REPLAY_ONLY = frozenset({"play_pause", "step", "seek_start", "seek_end", "speed", "incident", "goto"})

# Names on the help screen and in the command palette where the Footer's short label would not do.
PALETTE_TITLES: dict[str, str] = {
    "debug_lease": "DEBUG lease",
    "profile": "Profile",
    "pause_display": "Pause display",
    "unzoom": "Unzoom",
    "level_normal": "Level NORMAL",
    "level_minimal": "Level MINIMAL",
    "anomaly_log": "Incident log",
    "incidents_ack_all": "Acknowledge all",
    "incident_ack": "Acknowledge",
    "incident_ack_all": "Acknowledge all",
    "incident_filter_severity": "Filter severity",
    "incident_filter_kind": "Filter kind",
    "thresholds": "Thresholds",
    "ranks": "Ranks",
    "telemetry_errors": "Telemetry errors",
    "panel_policy": "Focus/zoom Policy",
    "panel_value": "Focus/zoom Value",
    "panel_advantage": "Focus/zoom Advantage",
    "panel_gradients": "Focus/zoom Gradients",
    "panel_lstm": "Focus/zoom LSTM",
    "replay_back": "Step back",
    "replay_page_back": "Ten updates back",
    "replay_page_forward": "Ten updates on",
    "replay_next_incident": "Next incident",
    "replay_previous_incident": "Previous incident",
    "replay_goto": "Go to step",
    "replay_forward": "Step forward",
    "replay_faster": "Replay faster",
    "replay_slower": "Replay slower",
}

# Which footer entries stay when the footer is short of width, most important first (actions, without
# their arguments); the help lists them all.
FOOTER_ORDER: tuple[str, ...] = (
    "help",
    "pop_screen",
    "dismiss",
    "quit",
    "open",  # the sweep table's Enter
    "anomalies",
    "telemetry_errors",  # offered only while the trainer reports some
    "thresholds",
    "debug",
    "filter",  # the sweep table
    "toggle_axis",  # the compare screen
    "play_pause",
    "step",
    "panel",
    "toggle_pause",
    "detail",
    "acknowledge",
    "goto",
    "incident",
    "set_level",
    "acknowledge_all",
    "filter_severity",
    "filter_kind",
    "sort_next",
    "sort",
    "sort_reverse",
    "reverse",
    "focus_next",
    "ranks",
    "profile",
    "speed",
    "command_palette",
)
