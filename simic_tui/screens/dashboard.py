"""The main screen: header, banner, the five health panels and the anomaly log, the footer."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.containers import Grid
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static

from simic_tui.keys import APP_BINDINGS, DASHBOARD_BINDINGS, LIVE_ONLY, REPLAY_BINDINGS, REPLAY_ONLY
from simic_tui.widgets.advantage import AdvantagePanel
from simic_tui.widgets.anomalies import AnomalyPanel
from simic_tui.widgets.base import Panel, View
from simic_tui.widgets.footer import FittedFooter
from simic_tui.widgets.gradients import GradientsPanel
from simic_tui.widgets.header import Banner, HeaderModel, StatusHeader
from simic_tui.widgets.lstm import LSTMPanel
from simic_tui.widgets.policy import PolicyPanel
from simic_tui.widgets.value import ValuePanel

if TYPE_CHECKING:
    from simic_tui.app import SimicApp

__all__ = ["PANEL_IDS", "DashboardScreen", "TooSmall"]

PANEL_IDS = ("policy", "value", "advantage", "gradients", "lstm")
MIN_SIZE = (80, 24)


class TooSmall(Static):
    """Covers the screen when the terminal is below the minimum size."""


class DashboardScreen(Screen):
    """Five panels on a grid whose shape follows the terminal's width (breakpoint classes)."""

    BINDINGS: ClassVar = [*APP_BINDINGS, *DASHBOARD_BINDINGS, *REPLAY_BINDINGS]
    AUTO_FOCUS = ""  # no panel is focused until the operator picks one (1-5)

    @property
    def simic(self) -> SimicApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="header")
        yield Banner(id="banner")
        with Grid(id="panels"):
            yield PolicyPanel(id="policy", classes="panel")
            yield ValuePanel(id="value", classes="panel")
            yield AdvantagePanel(id="advantage", classes="panel")
            yield GradientsPanel(id="gradients", classes="panel")
            yield LSTMPanel(id="lstm", classes="panel")
            yield AnomalyPanel(id="anomalies", classes="panel")
        yield TooSmall(
            f"The terminal is too small for simic-tui.\n\nIt needs at least {MIN_SIZE[0]}×{MIN_SIZE[1]}; "
            "enlarge the window or reduce the font size.\n\nData keeps arriving meanwhile. q quits.",
            id="too-small",
        )
        yield FittedFooter(compact=True)

    _panels: list[Panel] | None = None
    drawn_step: int | None = None  # the step of the snapshot the panels show

    def on_mount(self) -> None:
        self.simic.tick()

    def on_resize(self) -> None:
        w, h = self.size
        self.query_one(FittedFooter).show_command_palette = w >= 110
        self.set_class(w < MIN_SIZE[0] or h < MIN_SIZE[1], "-too-small")

    # -- drawing -------------------------------------------------------------------------------------
    def show_header(self, model: HeaderModel, banners: list[str]) -> None:
        try:
            header, banner = self.query_one(StatusHeader), self.query_one(Banner)
        except NoMatches:  # not composed yet, or being torn down
            return
        header.show(model)
        banner.show(banners)

    def show_panels(self, view: View, min_interval: float = 0.0) -> None:
        """``min_interval``: see :meth:`Panel.refresh_from` (0: every new snapshot at the next tick)."""
        if self._panels is None:
            self._panels = list(self.query(Panel))
        for panel in self._panels:
            panel.refresh_from(view, min_interval)
        self.drawn_step = view.snap.step if view.snap is not None else None

    # -- keys ------------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        replay = self.simic.replay is not None
        if action in LIVE_ONLY and replay:
            return False
        if action in REPLAY_ONLY and not replay:
            return False
        if action == "telemetry_errors":  # offered while the trainer reports some
            return self.simic.has_telemetry_errors()
        return not (action == "unzoom" and self.zoomed is None)

    def action_debug(self) -> None:
        self.simic.toggle_debug()

    def action_release_debug(self) -> None:
        self.simic.release_debug()

    def action_set_level(self, level: str) -> None:
        self.simic.set_level(level)

    def action_profile(self) -> None:
        self.simic.request_profile()

    def action_toggle_pause(self) -> None:
        self.simic.toggle_pause()

    zoomed: Panel | None = None

    def zoom(self, panel: Panel | None) -> None:
        """Show ``panel`` alone in the grid (None: all of them again).

        Not Textual's maximize, which covers the whole screen: the header (step, link, incidents)
        stays, and the zoomed panel's border says how to come back."""
        if self.zoomed is not None:
            self.zoomed.remove_class("-zoomed")
            self.zoomed.border_subtitle = ""
        self.zoomed = panel
        self.set_class(panel is not None, "-zoom")
        if panel is not None:
            panel.add_class("-zoomed")
            panel.border_subtitle = "Esc: back"
        self.refresh_bindings()

    def action_panel(self, number: int) -> None:
        """First press focuses the panel, the second zooms it (and a third restores)."""
        panel = self.query_one(f"#{PANEL_IDS[number - 1]}", Panel)
        if self.zoomed is panel:
            self.zoom(None)
        elif self.zoomed is not None or panel.has_focus:
            panel.focus()
            self.zoom(panel)
        else:
            panel.focus()
        self.refresh_bindings()

    def action_unzoom(self) -> None:
        self.zoom(None)

    def action_acknowledge_all(self) -> None:
        self.simic.acknowledge_all()

    def action_incident(self, direction: int) -> None:
        self.simic.replay_incident(direction)

    def action_goto(self) -> None:
        self.simic.replay_goto()

    def action_anomalies(self) -> None:
        self.simic.open_anomaly_log()

    def action_thresholds(self) -> None:
        self.simic.open_thresholds()

    def action_ranks(self) -> None:
        self.simic.open_ranks()

    def action_telemetry_errors(self) -> None:
        self.simic.open_telemetry_errors()

    def action_play_pause(self) -> None:
        self.simic.replay_toggle()

    def action_step(self, delta: int) -> None:
        self.simic.replay_step(delta)

    def action_seek_start(self) -> None:
        self.simic.replay_seek(1)

    def action_seek_end(self) -> None:
        self.simic.replay_seek(None)

    def action_speed(self, direction: int) -> None:
        self.simic.replay_speed(direction)
