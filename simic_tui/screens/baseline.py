"""The live run over a known-good baseline: each statistic's recent updates drawn on the baseline's band.

``simic-tui attach HOST:PORT --baseline good.simrec`` opens the usual dashboard, its panels' sparklines
and charts drawn over the band (:mod:`simic_tui.widgets.base`); ``b`` opens this screen, whose title
counts the statistics whose latest value left the band. Per statistic: three
rows of chart, one column per update, the baseline's band shaded behind (``░``) and the live value
in front (``●``, bold when outside the band), then a row of ``◇`` marks under the updates where the
live run left the band: the dashboard's off-baseline mark, never an alarm colour or glyph (a
difference from the baseline is not an incident). Band, markers and words read the same without colour.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Static

from simic_tui.app import SimicApp
from simic_tui.baseline import Baseline, LiveBand, fmt_band
from simic_tui.fmt import fmt_num
from simic_tui.widgets.base import OFF_BASELINE, OFF_STYLE, Line, View

__all__ = ["BaselineApp", "BaselineScreen", "band_chart"]

LABEL = "$text-muted"
BAND = "$primary 50%"
OUT = OFF_STYLE
LIVE = "bold $series"  # a data series (simic_tui.palette)
_CHART_ROWS = 4


def band_chart(lb: LiveBand, height: int = _CHART_ROWS) -> list[Content]:
    """``height`` rows (top first) plus the marker row, one column per update of ``lb``."""
    vals = lb.values
    pool = np.concatenate(
        [vals[np.isfinite(vals) & lb.present], lb.lo[np.isfinite(lb.lo)], lb.hi[np.isfinite(lb.hi)]]
    )
    lo = float(pool.min()) if pool.size else 0.0
    hi = float(pool.max()) if pool.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    span = hi - lo

    def row_of(y: float) -> int:
        return height - 1 - min(int((y - lo) / span * height), height - 1)

    grid: list[list[tuple[str, str]]] = [[(" ", "")] * len(vals) for _ in range(height)]
    for x in range(len(vals)):
        if math.isfinite(lb.lo[x]) and math.isfinite(lb.hi[x]):
            for r in range(row_of(lb.hi[x]), row_of(lb.lo[x]) + 1):
                grid[r][x] = ("░", BAND)
        if not lb.present[x]:
            continue
        style = OUT if lb.outside[x] else LIVE
        v = vals[x]
        if math.isfinite(v):
            grid[row_of(v)][x] = ("●", style)
        else:
            grid[height - 1][x] = ("×", style)
    rows = [Content.assemble(*cells) for cells in grid]
    marks = Content.assemble(*[(OFF_BASELINE, OUT) if o else (" ", "") for o in lb.outside.tolist()])
    return [*rows, marks]


def block(lb: LiveBand, width: int) -> list[Content]:
    """A statistic's title line (live value, band at the same update, excursions) and its chart."""
    last = int(np.flatnonzero(lb.present)[-1]) if lb.present.any() else None
    line = Line().add(lb.name, "bold")
    if last is not None:
        line.label("  live ").add(fmt_num(lb.values[last]), OUT if lb.outside[last] else "")
        line.label(f"  band {fmt_band(lb.lo[last], lb.hi[last])} @{lb.steps[last]}")
    n_out = int(lb.outside.sum())
    if n_out:
        where = np.flatnonzero(lb.outside)
        line.add(f"  {OFF_BASELINE} outside {n_out}×, last at {lb.steps[where[-1]]}", OUT)
    else:
        line.label("  inside the band")
    return [line.build().truncate(width, ellipsis=True), *band_chart(lb)]


class BaselineScreen(Screen):
    BINDINGS: ClassVar = [
        Binding("escape,b", "app.pop_screen", "Back", id="baseline_back", tooltip="Back to the dashboard"),
    ]
    DEFAULT_CSS = """
    BaselineScreen #baseline-title { height: auto; background: $panel; padding: 0 1; }
    BaselineScreen #baseline-body { height: 1fr; padding: 0 1; }
    BaselineScreen #baseline-charts { text-wrap: nowrap; height: auto; }
    """

    def __init__(self, baseline: Baseline) -> None:
        super().__init__()
        self.baseline = baseline
        self._drawn: object = None

    def compose(self) -> ComposeResult:
        yield Static(id="baseline-title")
        with VerticalScroll(id="baseline-body"):
            yield Static(id="baseline-charts")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        self.refresh_view()

    def on_resize(self) -> None:
        self._drawn = None
        self.refresh_view()

    def refresh_view(self) -> None:
        try:
            title_widget = self.query_one("#baseline-title", Static)
            charts_widget = self.query_one("#baseline-charts", Static)
        except NoMatches:  # a resize before the screen is composed
            return
        store = self.app.store  # type: ignore[attr-defined]
        width = self.size.width - 5
        key = (store.version, width)
        if key == self._drawn or width <= 10:
            return
        self._drawn = key
        b = self.baseline
        lines: list[Content] = []
        missing = []
        n_out = 0
        for name in b.names:
            lb = b.live(store, name, width)
            if lb is None:
                missing.append(name)
                continue
            n_out += bool(lb.latest_outside)
            lines.extend(block(lb, width))
            lines.append(Content(""))
        if missing:
            lines.append(
                Content.assemble(("Not in the live run (not compared): ", LABEL), ", ".join(missing))
            )
        title = Content.assemble(
            ("Baseline ", "bold"),
            (f"{b.trace.name} ({b.path.name}, {b.trace.updates} updates)", ""),
            (f"  band: its range over ±{b.half_width} updates, +{b.margin:.0%}", LABEL),
            (
                f"  {OFF_BASELINE} {n_out} outside now" if n_out else "  all inside now",
                OUT if n_out else LABEL,
            ),
        )
        title_widget.update(title)
        charts_widget.update(Content("\n").join(lines))


class BaselineApp(SimicApp):
    """The live dashboard with a baseline: the panels draw its band behind their sparklines and charts
    and mark where the live run leaves it; ``b`` shows every statistic it covers.

    Leaving the band is a difference from a known-good run, not an alarm: it never reaches the banner
    (alarm-coloured) nor a panel's border, which stay the trainer's incidents."""

    BINDINGS: ClassVar = [
        *SimicApp.BINDINGS,
        Binding("b", "baseline", "Baseline", id="baseline", tooltip="The live run over the baseline's band"),
    ]
    CSS_PATH = str(Path(__file__).parent.parent / "app.tcss")  # the dashboard's stylesheet

    def __init__(self, *args: object, baseline: Baseline, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.baseline = baseline

    def current_view(self) -> View:
        # the panels draw the baseline's band behind their own sparklines and charts
        return View.of(self.store, self.baseline)

    def action_baseline(self) -> None:
        if not isinstance(self.screen, BaselineScreen):
            self.push_screen(BaselineScreen(self.baseline))

    def tick(self) -> None:
        super().tick()
        screen = self.screen if self.screen_stack else None
        if isinstance(screen, BaselineScreen) and screen.is_mounted and not self.display_paused:
            screen.refresh_view()
