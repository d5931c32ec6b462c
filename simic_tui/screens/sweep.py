"""The sweep overview: one row per trainer, sortable and filterable; Enter opens that run's dashboard.

:class:`SweepApp` is the dashboard app with many clients: each run keeps its own
:class:`~simic_tui.client.TelemetryClient` and :class:`~simic_tui.store.TelemetryStore` (see
:mod:`simic_tui.sweep`), each client runs in its own worker, and drilling into a run points the
app's ``store`` and ``client`` at that run, so the dashboard, its screens and its commands (a DEBUG
lease) are the single-run ones, aimed at the selected trainer only. Esc returns to the table.

The table is redrawn from the stores at most every ``TABLE_INTERVAL`` seconds, and only the cells
whose text changed are touched: sixteen trainers at ten updates a second must not cost a core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import ScrollableContainer
from textual.content import Content
from textual.css.query import NoMatches
from textual.events import Click
from textual.geometry import Region
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Input, Static

from simic_tui.app import SimicApp
from simic_tui.client import LinkState
from simic_tui.fmt import fmt_num
from simic_tui.keys import APP_BINDINGS
from simic_tui.screens.dashboard import DashboardScreen
from simic_tui.store import TelemetryStore
from simic_tui.sweep import (
    BACKGROUND_RECEIVE_INTERVAL,
    MAX_SWEEP_RUNS,
    SORT_KEYS,
    SweepRow,
    SweepRun,
    filter_rows,
    make_run,
    row_of,
    scan_targets,
    sort_rows,
)
from simic_tui.widgets.footer import FittedFooter
from simic_tui.widgets.header import fit_segments
from simic_tui.widgets.incidents import severity_style

__all__ = ["SweepApp", "SweepDashboard", "SweepScreen", "SweepTable"]

_LINK = {
    LinkState.CONNECTING.value: ("◌", "$warning"),
    LinkState.LIVE.value: ("●", "$success"),
    LinkState.STALE.value: ("○", "$warning"),
    LinkState.DISCONNECTED.value: ("✖", "$error"),
    LinkState.INCOMPATIBLE.value: ("✖", "$error"),
    LinkState.REPLAY.value: ("▶", "$accent"),
    LinkState.FINISHED.value: ("■", ""),
}
Segment = tuple[int, list[tuple[str, str]]]  # (priority: dropped last-first, [(text, style)])
_SORT_ORDER = ("incidents", "name", "step", "return", "entropy", "kl", "ev", "grad", "link", "level")


def _cell(value: float | None, digits: int = 3) -> str:
    return fmt_num(value, digits)


class SweepTable(Static, can_focus=True):
    """A light table: one Content per line, redrawn only when the screen hands it new rows.

    Textual's DataTable renders every cell through Rich on each refresh; sixteen trainers updating
    ten times a second made that most of the sweep's CPU. Here a refresh is one ``update`` of
    pre-styled lines (cells are trainer text: plain, never markup); the cursor is a reversed row.
    """

    BINDINGS: ClassVar = [
        Binding("up", "cursor(-1)", show=False),
        Binding("down", "cursor(1)", show=False),
        Binding("pageup", "cursor(-10)", show=False),
        Binding("pagedown", "cursor(10)", show=False),
        Binding("home", "cursor(-1000000)", show=False),
        Binding("end", "cursor(1000000)", show=False),
    ]
    GAP = 2

    def __init__(self, **kwargs: object) -> None:
        super().__init__("", **kwargs)  # type: ignore[arg-type]
        self.columns: list[tuple[str, str]] = []  # (key, title)
        self.keys: list[str] = []  # row keys in display order
        self.cells: list[list[tuple[str, str]]] = []  # per row: (text, style) per column
        self.cursor_row = 0
        self.sorted_column = ""
        self.descending = False
        self._widths: list[int] = []

    @property
    def row_count(self) -> int:
        return len(self.keys)

    def set_rows(
        self, columns: list[tuple[str, str]], keys: list[str], cells: list[list[tuple[str, str]]]
    ) -> None:
        keep = self.keys[self.cursor_row] if 0 <= self.cursor_row < len(self.keys) else None
        self.columns, self.keys, self.cells = columns, keys, cells
        if keep in keys:
            self.cursor_row = keys.index(keep)
        self.cursor_row = max(0, min(self.cursor_row, len(keys) - 1))
        self._draw()

    def row_text(self, i: int) -> list[str]:
        return [text for text, _ in self.cells[i]]

    def move_cursor(self, row: int) -> None:
        self.cursor_row = max(0, min(row, len(self.keys) - 1))
        self._draw()
        self.post_message(SweepTable.Highlighted())

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def column_at(self, x: int) -> str | None:
        """The key of the column under content column ``x`` (header clicks sort by it)."""
        start = 0
        for (key, _), w in zip(self.columns, self._widths):
            if start <= x < start + w + self.GAP:
                return key
            start += w + self.GAP
        return None

    def _draw(self) -> None:
        widths = [len(title) + 2 for _, title in self.columns]  # room for the sort arrow
        for row in self.cells:
            for j, (text, _) in enumerate(row):
                widths[j] = max(widths[j], len(text))
        self._widths = widths
        gap = " " * self.GAP
        head: list[tuple[str, str] | str] = []
        for (key, title), w in zip(self.columns, widths):
            arrow = (" ↓" if self.descending else " ↑") if key == self.sorted_column else ""
            head.append(((title + arrow).ljust(w) + gap, "bold $accent" if arrow else "bold"))
        lines = [Content.assemble(*head)]
        focused = self.has_focus
        for i, row in enumerate(self.cells):
            parts: list[tuple[str, str] | str] = []
            for (text, style), w in zip(row, widths):
                parts.append((text.ljust(w) + gap, style))
            line = Content.assemble(*parts)
            if i == self.cursor_row:
                line = line.stylize("reverse" if focused else "underline")
            lines.append(line)
        self.update(Content("\n").join(lines))
        if self.parent is not None and self.is_mounted:
            self.scroll_visible_row()

    def scroll_visible_row(self) -> None:
        parent = self.parent
        if isinstance(parent, ScrollableContainer):
            parent.scroll_to_region(Region(0, self.cursor_row, 1, 2), animate=False, immediate=True)

    def on_focus(self) -> None:
        self._draw()

    def on_blur(self) -> None:
        self._draw()

    def on_click(self, event: Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:  # on the padding
            return
        if offset.y == 0:
            key = self.column_at(offset.x)
            if key is not None:
                self.post_message(SweepTable.HeaderClicked(key))
            return
        row = offset.y - 1
        if 0 <= row < len(self.keys):
            if row == self.cursor_row and event.chain >= 2:
                self.post_message(SweepTable.Selected(self.keys[row]))
            self.move_cursor(row)

    class Highlighted(Message):
        """The cursor moved."""

    class Selected(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    class HeaderClicked(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key


class SweepScreen(Screen):
    """The table of trainers, its badge and its filter."""

    BINDINGS: ClassVar = [
        *APP_BINDINGS,
        Binding("enter", "open", "Open", id="sweep_open", tooltip="Open the selected run's dashboard"),
        Binding("s", "sort", "Sort", id="sweep_sort", tooltip="Sort by the next column"),
        Binding("S", "reverse", "Reverse", show=False, id="sweep_reverse", tooltip="Reverse the sort order"),
        Binding(
            "slash", "filter", "Filter", key_display="/", id="sweep_filter", tooltip="Filter runs by text"
        ),
        Binding(
            "d",
            "debug",
            "DEBUG",
            id="sweep_debug",
            tooltip="Request a DEBUG lease from the selected run only, and open its DEBUG screen",
        ),
        Binding("escape", "clear_filter", "Clear", show=False, id="sweep_clear", tooltip="Clear the filter"),
    ]

    DEFAULT_CSS = """
    SweepScreen #sweep-title { height: auto; background: $panel; padding: 0 1; }
    SweepScreen #sweep-filter { display: none; height: 3; }
    SweepScreen #sweep-filter.-open { display: block; }
    SweepScreen #sweep-body { height: 1fr; }
    SweepScreen #sweep-table { width: auto; height: auto; text-wrap: nowrap; padding: 0 1; }
    SweepScreen #sweep-note { height: auto; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sort_key = "incidents"
        self.descending = True
        self.filter_text = ""
        self._shown: object = None
        self.rows: list[SweepRow] = []

    @property
    def sweep(self) -> SweepApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(id="sweep-title")
        yield Input(
            placeholder="filter: words in name, link, level or incident; ! active, !! critical",
            id="sweep-filter",
        )
        with ScrollableContainer(id="sweep-body"):
            yield SweepTable(id="sweep-table")
        yield Static(id="sweep-note")
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        self.query_one(SweepTable).focus()
        self.refresh_view()

    # -- drawing -----------------------------------------------------------------------------------
    def refresh_view(self) -> None:
        try:
            table = self.query_one(SweepTable)
        except NoMatches:
            return
        app = self.sweep
        every = [row_of(run) for run in app.runs]
        rows = sort_rows(filter_rows(every, self.filter_text), self.sort_key, self.descending)
        self.rows = rows
        heads: list[str] = []
        for r in every:
            heads.extend(h for h in r.entropy if h not in heads)
        columns = ["run", "link", "step", "level", "incidents", "return", *[f"H {h}" for h in heads]]
        columns += ["KL", "EV", "grad"]
        titles = [(c, c[2:] if c.startswith("H ") else c) for c in columns]
        cells = [self._texts(r, heads) for r in rows]
        key = (tuple(titles), [r.key for r in rows], cells, self.sort_key, self.descending)
        if key != self._shown:
            self._shown = key
            table.sorted_column = next((c for c in columns if self._sort_of(c) == self.sort_key), "")
            table.descending = self.descending
            table.set_rows(titles, [r.key for r in rows], cells)
        self.query_one("#sweep-title", Static).update(self.title_content(every, rows))
        self.query_one("#sweep-note", Static).update(self.note_content())

    @property
    def _order(self) -> list[str]:
        return [r.key for r in self.rows]

    @staticmethod
    def _sort_of(col: str) -> str:
        return {
            "run": "name",
            "link": "link",
            "step": "step",
            "level": "level",
            "incidents": "incidents",
            "return": "return",
            "KL": "kl",
            "EV": "ev",
            "grad": "grad",
        }.get(col, "entropy" if col.startswith("H ") else "")

    def _texts(self, r: SweepRow, heads: list[str]) -> list[tuple[str, str]]:
        glyph, link_style = _LINK.get(r.link, ("", ""))
        step = "—" if r.step is None else f"{r.step}/{r.planned}" if r.planned else str(r.step)
        if r.active:
            g, style = severity_style(r.worst)
            more = f" +{len(r.active_kinds) - 1}" if len(r.active_kinds) > 1 else ""
            incidents = (f"{g} {r.active_kinds[0].split(' (')[0][:18]}{more}", style)
        else:
            incidents = ("ok" if r.step is not None else "—", "$text-muted")
        out = [
            (r.name[:24], "bold"),
            (f"{glyph} {r.link}", link_style),
            (step, ""),
            (r.level or "—", "bold $warning" if r.level == "DEBUG" else ""),
            incidents,
            (_cell(r.episode_return), ""),
        ]
        for h in heads:
            out.append((_cell(r.entropy.get(h)) if h in r.entropy else "—", ""))
        out += [(_cell(r.kl), ""), (_cell(r.ev), ""), (_cell(r.grad_norm), "")]
        return out

    def title_content(self, every: list[SweepRow], shown: list[SweepRow]) -> Content:
        """Count, live links, the incidents badge of every run, sort and filter; least important
        parts are dropped whole when the line is too narrow."""
        live = sum(1 for r in every if r.link == LinkState.LIVE.value)
        segments: list[Segment] = [
            (0, [(f"Sweep: {len(every)} trainer{'s' if len(every) != 1 else ''}", "bold")]),
            (3, [(f"{live} live", "$text-muted")]),
        ]
        hit = [r for r in every if r.active]
        new = sum(r.new for r in every)
        if hit:
            worst = "critical" if any(r.worst == "critical" for r in hit) else "warning"
            glyph, style = severity_style(worst)
            text = f"{glyph} {len(hit)} run{'s' if len(hit) != 1 else ''} with active incidents"
            text += f" ({sum(r.active for r in hit)} active" + (f", {new} new)" if new else ")")
            segments.append((0, [(text, f"{style} reverse" if new else style)]))
        elif new:
            segments.append(
                (0, [(f"{new} new incident{'s' if new != 1 else ''}, cleared since", "bold $warning")])
            )
        title, _ = SORT_KEYS[self.sort_key]
        segments.append((2, [(f"sort: {title} {'↓' if self.descending else '↑'}", "$text-muted")]))
        if self.filter_text:
            segments.append(
                (1, [(f"filter: {self.filter_text!r} ({len(shown)} of {len(every)})", "$accent")])
            )
        if self.sweep.left_out:
            more = f"{self.sweep.left_out} more trainer(s) found, not shown (at most {MAX_SWEEP_RUNS})"
            segments.append((1, [(more, "bold $warning")]))
        if self.sweep.scan:
            segments.append((4, [("scanning for new trainers", "$text-muted")]))
        return fit_segments(segments, max(self.size.width - 1, 20))

    def note_content(self) -> Content:
        """The highlighted run in full: its address, link detail and every active incident."""
        key = self.selected_key()
        row = next((r for r in self.rows if r.key == key), None)
        if row is None:
            return Content("")
        parts: list[tuple[str, str] | str] = [(row.name, "bold"), (f" {row.label}", "$text-muted")]
        glyph, style = _LINK.get(row.link, ("", ""))
        parts.append((f"  {glyph} {row.link}", style))
        if row.link_detail:
            parts.append((f" ({row.link_detail})", style))
        if row.active_kinds:
            g, sev_style = severity_style(row.worst)
            parts.append((f"  {g} {', '.join(row.active_kinds)}", sev_style))
        return Content.assemble(*parts)

    # -- keys ---------------------------------------------------------------------------------------
    def selected_key(self) -> str | None:
        table = self.query_one(SweepTable)
        if not table.keys or not 0 <= table.cursor_row < len(table.keys):
            return None
        return table.keys[table.cursor_row]

    def action_open(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.sweep.open_run(key)

    def on_sweep_table_selected(self, event: SweepTable.Selected) -> None:
        event.stop()
        self.sweep.open_run(event.key)

    def on_sweep_table_highlighted(self, event: SweepTable.Highlighted) -> None:
        self.query_one("#sweep-note", Static).update(self.note_content())

    def on_sweep_table_header_clicked(self, event: SweepTable.HeaderClicked) -> None:
        key = self._sort_of(event.key)
        if key:
            self.descending = not self.descending if key == self.sort_key else key in ("incidents", "step")
            self.sort_key = key
            self.refresh_view()

    def action_sort(self) -> None:
        i = _SORT_ORDER.index(self.sort_key) if self.sort_key in _SORT_ORDER else -1
        self.sort_key = _SORT_ORDER[(i + 1) % len(_SORT_ORDER)]
        self.descending = self.sort_key in ("incidents", "step")
        self.refresh_view()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.refresh_view()

    def action_filter(self) -> None:
        box = self.query_one("#sweep-filter", Input)
        box.add_class("-open")
        box.value = self.filter_text
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#sweep-filter", Input)
        if box.has_class("-open"):
            box.remove_class("-open")
            self.query_one(SweepTable).focus()
            return
        if self.filter_text:
            self.filter_text = ""
            self.refresh_view()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.refresh_view()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#sweep-filter", Input).remove_class("-open")
        self.query_one(SweepTable).focus()

    def action_debug(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.sweep.open_run(key)
            self.sweep.request_debug()


class SweepDashboard(DashboardScreen):
    """A run's dashboard inside a sweep: Esc (when no panel is zoomed) goes back to the table."""

    BINDINGS: ClassVar = [
        *[b for b in DashboardScreen.BINDINGS if b.action != "unzoom"],
        Binding("escape", "unzoom", "Sweep", id="sweep_back", tooltip="Back to the sweep table (or unzoom)"),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "unzoom":
            return True
        return super().check_action(action, parameters)

    def action_unzoom(self) -> None:
        if self.zoomed is not None:
            super().action_unzoom()
        else:
            self.app.back_to_sweep()  # type: ignore[attr-defined]


class SweepApp(SimicApp):
    """The dashboard over many trainers: the table first, any run's dashboard on Enter."""

    CSS_PATH = str(Path(__file__).parent.parent / "app.tcss")  # the dashboard's stylesheet
    SCAN_INTERVAL = 2.0  # seconds between looks at the runtime directory under --scan
    TABLE_INTERVAL = 1.0  # seconds between table redraws

    def __init__(
        self,
        runs: list[SweepRun],
        *,
        scan: bool = False,
        scan_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_hz: float = 10.0,
        run_clients: bool = True,
        make: Callable[..., SweepRun] = make_run,
    ) -> None:
        first = runs[0] if runs else None
        super().__init__(
            first.store if first else TelemetryStore(2),
            client=first.client if first else None,
            clock=clock,
            tick_hz=tick_hz,
            run_client=False,
        )
        self.runs = list(runs)
        self.scan = scan
        self.scan_dir = scan_dir
        self.run_clients = run_clients
        self.make = make
        self.sweep = SweepScreen(id="sweep")
        self.selected: SweepRun | None = None
        self._last_scan = -1e18
        self._last_table = -1e18
        self._sweep_toasts: list[str] = []
        self.left_out = 0  # trainers a scan found beyond MAX_SWEEP_RUNS

    def get_default_screen(self) -> Screen:
        return self.sweep

    def on_mount(self) -> None:
        super().on_mount()
        for run in self.runs:
            self._start(run)
        if self.scan:
            self.rescan(quiet=True)  # the trainers already there are the table, not news

    def _start(self, run: SweepRun) -> None:
        if self.run_clients and not run.started:
            run.started = True
            self.run_worker(
                run.client.run(), name=f"telemetry-{run.label}", group=f"net:{run.key}", exit_on_error=False
            )

    def rescan(self, *, quiet: bool = False) -> int:
        """Add every trainer whose connection file appeared since the last look; returns how many.

        At most ``MAX_SWEEP_RUNS`` runs (each holds a client and a bounded store): beyond that the
        table says how many were left out instead of growing the dashboard without bound.
        """
        self._last_scan = self.clock()
        known = {r.key for r in self.runs}
        added = 0
        try:
            found = scan_targets(self.scan_dir)
        except (OSError, PermissionError):
            return 0
        fresh = [(label, t) for label, t in found if t.pub not in known]
        room = max(0, MAX_SWEEP_RUNS - len(self.runs))
        self.left_out = max(0, len(fresh) - room)
        for label, target in fresh[:room]:
            run = self.make(target, label, clock=self.clock)
            self.runs.append(run)
            self._start(run)
            added += 1
            if not quiet:
                self.notify(f"new trainer {label} joined the sweep", timeout=4)
        return added

    # -- runs ----------------------------------------------------------------------------------------
    def run_by_key(self, key: str) -> SweepRun | None:
        return next((r for r in self.runs if r.key == key), None)

    def open_run(self, key: str) -> None:
        """Point the dashboard at this run (its store, its client: its commands) and show it."""
        run = self.run_by_key(key)
        if run is None:
            return
        run.store.drain_events()  # what happened while the table showed it is in its log already
        self._to_background(self.selected)
        run.client.receive_interval = 0.0  # on screen: each frame as it arrives
        self.selected = run
        self.store = run.store
        self.client = run.client
        self.display_paused = False
        self._pending_incidents = []
        self.dashboard = SweepDashboard(id=f"dashboard-{self.runs.index(run)}")
        self._header_at = -1e18  # the new dashboard draws at its first tick
        self.push_screen(self.dashboard)

    def back_to_sweep(self) -> None:
        while len(self.screen_stack) > 1 and self.screen is not self.sweep:
            self.pop_screen()
        self._to_background(self.selected)
        self.sweep.refresh_view()

    @staticmethod
    def _to_background(run: SweepRun | None) -> None:
        if run is not None:
            run.client.receive_interval = BACKGROUND_RECEIVE_INTERVAL

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette's dashboard commands only inside a run's dashboard: on the table they would
        have no run to go to."""
        if self.dashboard in self.screen_stack:
            yield from super().get_system_commands(screen)
        else:
            yield from App.get_system_commands(self, screen)

    # -- the timer ----------------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.screen_stack:
            return
        now = self.clock()
        if self.scan and now - self._last_scan >= self.SCAN_INTERVAL:
            self.rescan()
        screen = self.screen
        on_table = screen is self.sweep or (
            isinstance(screen, ModalScreen)
            and len(self.screen_stack) > 1
            and self.screen_stack[-2] is self.sweep
        )
        if not on_table:
            super().tick()
            return
        self._last_tick = now
        self._sweep_events()
        if now - self._last_table >= self.TABLE_INTERVAL:
            self._last_table = now
            self.sweep.refresh_view()

    def _sweep_events(self) -> None:
        """On the table, any run's incident onsets become toasts (named by run, rate-limited)."""
        now = self.clock()
        for run in self.runs:
            for event in run.store.drain_events():
                if event.incident is not None or event.severity == "error":
                    name = run.store.latest.run.name if run.store.latest is not None else run.label
                    self._sweep_toasts.append(f"{name or run.label}: {event.message}")
        if self._sweep_toasts and now - self._last_incident_toast >= self.INCIDENT_TOAST_GAP:
            first, rest = self._sweep_toasts[0], len(self._sweep_toasts) - 1
            self.notify(first + (f" (and {rest} more)" if rest else ""), severity="warning", timeout=6)
            self._sweep_toasts = []
            self._last_incident_toast = now
