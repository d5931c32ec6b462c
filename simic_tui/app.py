"""SimicApp: the dashboard. A live client or a replay feeds the store; a timer redraws from it.

Data flow: the client worker (or the replay cursor) writes into :class:`~simic_tui.store.TelemetryStore`
as frames arrive; a 10 Hz timer (:meth:`SimicApp.tick`) drains the store's events into
notifications and, unless the display is paused, asks the active screen to redraw from the store.
Widgets never see individual messages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from textual import work
from textual.app import App, SystemCommand
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen

from simic_tui.client import LinkState, LinkStatus, TelemetryClient
from simic_tui.keys import (
    APP_BINDINGS,
    DASHBOARD_BINDINGS,
    LIVE_ONLY,
    PALETTE_TITLES,
    REPLAY_BINDINGS,
    REPLAY_ONLY,
)
from simic_tui.palette import role_variables
from simic_tui.replay import ReplaySource
from simic_tui.screens.anomaly_log import AnomalyLogScreen, IncidentDetailScreen
from simic_tui.screens.dashboard import DashboardScreen
from simic_tui.screens.debug import DebugScreen, KeepLeaseScreen
from simic_tui.screens.errors import TelemetryErrorsScreen
from simic_tui.screens.goto import GotoStepScreen
from simic_tui.screens.help import HelpScreen, key_name
from simic_tui.screens.ranks import RanksScreen
from simic_tui.screens.thresholds import ThresholdsScreen
from simic_tui.store import TelemetryStore
from simic_tui.widgets.base import View
from simic_tui.widgets.header import HeaderModel
from simic_tui.widgets.incidents import incident_toast
from telemetry_core.schema import IncidentEvent

__all__ = ["SimicApp", "TrainerProcess"]


@runtime_checkable
class TrainerProcess(Protocol):
    """What the app needs to know about a trainer it started (``simic-tui demo``)."""

    def poll(self) -> int | None: ...

    @property
    def log_path(self) -> Path | None: ...


class SimicApp(App[None]):
    """The dashboard; construct it with a store and either a client or a replay source."""

    CSS_PATH = "app.tcss"
    TITLE = "simic-tui"
    BINDINGS = APP_BINDINGS
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [
        (0, "-compact"),
        (110, "-medium"),
        (180, "-wide"),
    ]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (36, "-tall")]
    NOTIFICATION_TIMEOUT = 8.0
    # Seconds between incident toasts: what arrives meanwhile waits and is summarised in one toast,
    # so a burst of onsets never stacks toasts over the panels.
    INCIDENT_TOAST_GAP = 3.0

    def __init__(
        self,
        store: TelemetryStore,
        *,
        client: TelemetryClient | None = None,
        replay: ReplaySource | None = None,
        status: LinkStatus | None = None,
        trainer: TrainerProcess | None = None,
        banner: str = "",
        clock: Callable[[], float] = time.monotonic,
        tick_hz: float = 10.0,
        run_client: bool = True,
    ) -> None:
        super().__init__()
        self.store = store
        self.client = client
        self.replay = replay
        self.trainer = trainer
        self.clock = clock
        self.tick_hz = tick_hz
        self.run_client = run_client
        self.static_banner = banner
        self.trainer_note = ""
        if status is not None:
            self._status = status
        elif client is not None:
            self._status = client.status
        else:
            self._status = LinkStatus(
                state=LinkState.REPLAY if replay else LinkState.CONNECTING, since=clock()
            )
        self.display_paused = False
        self._paused_at_count = 0
        self._paused_step: int | None = None
        self._last_tick = clock()
        self._pending_incidents: list[IncidentEvent] = []
        self._last_incident_toast = -1e18
        self.dashboard = DashboardScreen(id="dashboard")
        # Seconds between redraws of a panel (and of the header) while snapshots arrive faster: 0
        # draws each new snapshot at the next tick. A sweep sets it (simic_tui.sweep.PANEL_INTERVAL):
        # there, the other trainers' clients share the core with the drawn run.
        self.panel_interval = 0.0
        self._header_at = -1e18

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def status(self) -> LinkStatus:
        return self.client.status if self.client is not None else self._status

    def get_css_variables(self) -> dict[str, str]:
        """The theme's variables plus the colour roles (simic_tui.palette) for this terminal's depth."""
        variables = super().get_css_variables()
        console = getattr(self, "console", None)
        variables.update(role_variables(console.color_system if console is not None else None, variables))
        self.theme_variables = variables
        return variables

    def get_default_screen(self) -> Screen:
        return self.dashboard

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.tick_hz, self.tick, name="redraw")
        if self.client is not None and self.run_client:
            self.run_network()

    @work(exclusive=True, group="network", name="telemetry-client", exit_on_error=False)
    async def run_network(self) -> None:
        """The one long-lived worker that owns the sockets (see simic_tui.client)."""
        assert self.client is not None
        await self.client.run()

    def current_view(self) -> View:
        return View.of(self.store)

    # -- the timer --------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance a replay, surface events, and redraw the active screen from the store."""
        if not self.screen_stack:  # the timer can fire while the app starts or shuts down
            return
        now = self.clock()
        dt, self._last_tick = now - self._last_tick, now
        if self.replay is not None:
            self.replay.advance(dt)
        self._check_trainer()
        self._notify_events()
        self._notify_telemetry_error()
        screen = self.screen
        wall = time.monotonic()
        # The header and every panel with news are drawn in the same tick: one compositor pass for
        # all of them instead of one per panel whose own interval ran out on another tick.
        due = self.panel_interval <= 0 or wall - self._header_at >= self.panel_interval
        if due:
            self._header_at = wall
            self.dashboard.show_header(self.header_model(), self.banners())
        if self.display_paused:
            return
        under_modal = (
            isinstance(screen, ModalScreen)
            and len(self.screen_stack) > 1
            and self.screen_stack[-2] is self.dashboard
        )
        if (screen is self.dashboard or under_modal) and (due or self.dashboard.drawn_step is None):
            self.dashboard.show_panels(self.current_view())
        elif (
            isinstance(
                screen,
                (
                    DebugScreen,
                    ThresholdsScreen,
                    AnomalyLogScreen,
                    IncidentDetailScreen,
                    RanksScreen,
                    TelemetryErrorsScreen,
                ),
            )
            and screen.is_mounted
        ):
            with contextlib.suppress(NoMatches):  # a screen being composed or torn down
                screen.refresh_view()

    def header_model(self) -> HeaderModel:
        replay = ""
        if self.replay is not None:
            r = self.replay
            mark = "▶ replay" if r.playing else "‖ replay"
            replay = f"{mark} {r.position}/{r.total} at {r.speed:g}×"
        return HeaderModel(
            store=self.store,
            status=self.status,
            lease=self.lease_text(),
            profile=self.client.profile_note if self.client is not None else "",
            paused=self.display_paused,
            paused_behind=self.store.count - self._paused_at_count if self.display_paused else 0,
            paused_step=self._paused_step,
            replay=replay,
            commands_note=self.client.status.commands_note if self.client is not None else "",
        )

    def banners(self) -> list[str]:
        st = self.status
        unreachable = ""
        if st.unreachable and st.state == LinkState.CONNECTING:  # a sentence: wraps at any width
            unreachable = f"No trainer answers: {st.unreachable}. Retrying quietly; q quits."
        out = [self.static_banner, st.banner, unreachable, self.trainer_note]
        return [b for b in out if b]

    def lease_text(self) -> str:
        if self.client is None:
            return ""
        latest = self.store.latest
        return self.client.lease.describe(latest.step if latest is not None else None)

    def notify(  # type: ignore[override]
        self,
        message: str,
        *,
        title: str = "",
        severity: Any = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Toasts are plain text here: their messages quote the trainer, and trainer text is never markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def _handle_exception(self, error: Exception) -> None:
        """A crash: exit status 1, the traceback to a private log file, one plain line to the terminal.

        Textual would print a traceback with local variables, which can hold trainer text (escape
        sequences included) and keys; the operator gets where to find it instead.
        """
        from rich.text import Text

        from simic_tui.crash import write_crash_log

        self._return_code = 1
        if self._exception is None:  # Pilot re-raises it in tests
            self._exception = error
            self._exception_event.set()
        path = write_crash_log(error)
        where = f"; the traceback is in {path}" if path else ""
        self._exit_renderables.append(
            Text(f"simic-tui: internal error {type(error).__name__}{where} (please report it)")
        )
        self._close_messages_no_wait()

    def _notify_events(self) -> None:
        """Toasts for what happened since the last tick, without burying the panels.

        Incident onsets and upgrades: one toast each, at most one per ``INCIDENT_TOAST_GAP`` seconds
        of the app's clock; several waiting become one summary (a group reads as its head plus a
        count of consequences). Command results and link events always get their own toast.
        """
        now = self.clock()
        for event in self.store.drain_events():
            if event.incident is not None:
                self._pending_incidents.append(event.incident)
                continue
            self.notify(
                event.message,
                severity=event.severity,  # type: ignore[arg-type]
                timeout=self.NOTIFICATION_TIMEOUT,
                markup=False,
            )
        if self._pending_incidents and now - self._last_incident_toast >= self.INCIDENT_TOAST_GAP:
            message, severity = incident_toast(self._pending_incidents)
            self._pending_incidents = []
            self._last_incident_toast = now
            self.notify(message, severity=severity, timeout=self.NOTIFICATION_TIMEOUT, markup=False)  # type: ignore[arg-type]

    _last_error_shown = ""
    _errors_offered = False

    def has_telemetry_errors(self) -> bool:
        snap = self.store.latest
        return snap is not None and bool(snap.counters.telemetry_errors or snap.counters.last_telemetry_error)

    def _notify_telemetry_error(self) -> None:
        """The header counts the trainer's swallowed telemetry errors; the latest one is told once,
        and the footer offers ``e`` (their messages whole) while there are any."""
        offered = self.has_telemetry_errors()
        if offered != self._errors_offered:
            self._errors_offered = offered
            self.dashboard.refresh_bindings()
        snap = self.store.latest
        message = snap.counters.last_telemetry_error if snap is not None else ""
        if message and message != self._last_error_shown:
            self._last_error_shown = message
            n = snap.counters.telemetry_errors if snap is not None else 0
            self.notify(
                f"telemetry error on the trainer ({n} so far, training continues; e shows them): {message}",
                severity="warning",
                timeout=self.NOTIFICATION_TIMEOUT,
            )

    def _check_trainer(self) -> None:
        if self.trainer is None or self.trainer_note:
            return
        code = self.trainer.poll()
        if code is not None:
            log = f"; its log: {self.trainer.log_path}" if self.trainer.log_path else ""
            verb = "finished" if code == 0 else f"exited with code {code}"
            self.trainer_note = (
                f"The demo trainer {verb}{log}. The dashboard keeps what it received; q quits."
            )

    # -- actions the screens forward -----------------------------------------------------------------
    def _command(self, send: Callable[[], str]) -> None:
        if self.client is None:
            what = "this is a replay" if self.replay is not None else "no trainer connection"
            self.notify(f"commands go to a live trainer; {what}", severity="warning")
            return
        reason = send()
        if reason:
            self.notify(reason, severity="warning")

    def request_debug(self) -> None:
        if self.client is not None:
            self._command(self.client.request_debug)
        if not isinstance(self.screen, DebugScreen):
            self.push_screen(DebugScreen())

    def toggle_debug(self) -> None:
        """``d``: take a DEBUG lease (and show the DEBUG screen), or release the one held."""
        if self.client is not None and self.client.lease_held:
            self.release_debug()
        else:
            self.request_debug()

    def release_debug(self) -> None:
        if self.client is None:
            self._command(lambda: "")
            return
        reason = self.client.release_debug()
        self.notify(reason or "DEBUG lease released", severity="warning" if reason else "information", timeout=4)

    def leave_debug(self) -> None:
        """Esc on the DEBUG screen: with a lease held, ask whether to keep it (it costs the trainer)."""
        if self.client is None or not self.client.lease_held:
            self.pop_screen()
            return

        def answered(keep: bool | None) -> None:
            if keep is None:
                return  # asked again later: stay on the DEBUG screen
            if not keep:
                self.release_debug()
            if isinstance(self.screen, DebugScreen):
                self.pop_screen()

        self.push_screen(KeepLeaseScreen(self.lease_text()), answered)

    def set_level(self, level: str) -> None:
        assert level in ("NORMAL", "MINIMAL")
        if self.client is not None:
            self._command(partial(self.client.set_level, level))
            if not self.client.status.commands_note:
                self.notify(f"asked the trainer for level {level}…")
        else:
            self._command(lambda: "")

    def request_profile(self) -> None:
        if self.client is not None:
            self._command(self.client.request_profile)
            if not self.client.status.commands_note:
                self.notify("asked the trainer for a profile capture…")
        else:
            self._command(lambda: "")

    def toggle_pause(self) -> None:
        if not self.display_paused and self.dashboard.drawn_step is None:
            # Frames arrived but no tick has drawn them yet: draw the latest now, so the frozen
            # screen and the header's "paused at step S" name the same step.
            self.tick()
        self.display_paused = not self.display_paused
        self._paused_at_count = self.store.count
        # the step the frozen panels were last drawn from
        self._paused_step = self.dashboard.drawn_step if self.display_paused else None
        self.tick()

    def acknowledge_all(self) -> None:
        n = self.store.incidents.acknowledge_all()
        self.notify(f"acknowledged {n} incident(s)" if n else "nothing to acknowledge", timeout=3)
        self.tick()

    def replay_incident(self, direction: int) -> None:
        """``n`` / ``N``: the next / previous incident onset of the recording."""
        if self.replay is None:
            return
        target = self.replay.next_onset(direction)
        if target is None:
            where = "after" if direction > 0 else "before"
            self.notify(f"no incident onset {where} this update", timeout=3)
            return
        self.replay.playing = False
        self.replay.seek(target)
        self.tick()

    def replay_goto(self) -> None:
        """``g``: ask for a step, then go there."""
        if self.replay is None or not self.replay.total:
            return
        first, last = self.replay.steps

        def go(step: int | None) -> None:
            if step is None or self.replay is None:
                return
            self.replay.playing = False
            self.replay.seek(self.replay.position_of_step(step))
            self.tick()

        self.push_screen(GotoStepScreen(first, last), go)

    def open_anomaly_log(self) -> None:
        self.push_screen(AnomalyLogScreen(self.store))

    def open_thresholds(self) -> None:
        self.push_screen(ThresholdsScreen(self.store))

    def open_ranks(self) -> None:
        self.push_screen(RanksScreen(self.store))

    def open_telemetry_errors(self) -> None:
        if not isinstance(self.screen, TelemetryErrorsScreen):
            self.push_screen(TelemetryErrorsScreen(self.store))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(replay=self.replay is not None))

    def replay_toggle(self) -> None:
        if self.replay is not None:
            self.replay.toggle()
            self._last_tick = self.clock()
            self.tick()

    def replay_step(self, delta: int) -> None:
        if self.replay is not None:
            self.replay.step(delta)
            self.tick()

    def replay_seek(self, position: int | None) -> None:
        if self.replay is not None:
            self.replay.playing = False
            self.replay.seek(self.replay.total if position is None else position)
            self.tick()

    def replay_speed(self, direction: int) -> None:
        if self.replay is not None:
            speed = self.replay.change_speed(direction)
            self.notify(f"replay speed {speed:g}×", timeout=2)
            self.tick()

    # -- command palette: the same bindings, by name ------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        replay = self.replay is not None
        for binding in [*DASHBOARD_BINDINGS, *(REPLAY_BINDINGS if replay else [])]:
            action = binding.action.split("(")[0]
            if (
                (action in LIVE_ONLY and replay)
                or (action in REPLAY_ONLY and not replay)
                or action == "unzoom"
                or (action == "telemetry_errors" and not self.has_telemetry_errors())
            ):
                continue
            key = key_name(binding)
            title = PALETTE_TITLES.get(binding.id or "", binding.description)
            yield SystemCommand(
                f"{title} ({key})",
                binding.tooltip,
                partial(self._run_dashboard_action, binding.action),
            )

    def _run_dashboard_action(self, action: str) -> Any:
        if self.screen is not self.dashboard:
            self.pop_screen()
        return self.run_action(action, self.dashboard)
