"""The panel base class and the line builder every panel uses.

A panel is a focusable, maximisable ``Static`` that rebuilds its text from the store when the store
changed (or its size did), on the app's timer: never per message. Each panel returns *rows* with a
priority, and shows as many as fit its height, so one renderer serves 80x24 and 200x60 alike.
Colours come from theme variables and verdicts (see :mod:`simic_tui.judge`); every alarm also has a
glyph and a word, so the panel reads the same with NO_COLOR.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from textual.content import Content
from textual.widgets import Static

from simic_tui.fmt import chart, chart_row, fmt_limit, fmt_num, sparkline
from simic_tui.incidents import scope_label
from simic_tui.judge import (
    GLYPH,
    PANEL_KINDS,
    STYLE,
    Alarms,
    Mark,
    Verdict,
    incident_verdict,
    kind_title,
)
from simic_tui.store import TelemetryStore
from telemetry_core.config import Thresholds
from telemetry_core.schema import Incident, Snapshot

if TYPE_CHECKING:
    from simic_tui.baseline import Baseline, LiveBand

__all__ = [
    "BAND_STYLE",
    "CLEARED_FOR",
    "OFF_BASELINE",
    "OFF_STYLE",
    "ChartSpec",
    "Line",
    "Panel",
    "Row",
    "View",
    "fit_rows",
    "panel_title",
]

LABEL = "$text-muted"
# Rows of this priority or less important are secondary: they never wrap onto a second row.
SECONDARY = 3
# Updates a panel says "cleared at S" after its last incident cleared (long enough to be noticed).
CLEARED_FOR = 10
# A known-good baseline's band behind a series: context (a dim tint of the series role), never an
# alarm colour; leaving it is a difference from that run, not a judgement of health.
BAND_STYLE = "on $series-dim 40%"
# The mark of an update whose live value left the baseline's band: underlined in the sparkline, this
# glyph after it (and under a chart's column) while the latest update is outside. Not an alarm glyph.
OFF_BASELINE = "◇"
OFF_STYLE = "bold $foreground"


@dataclass
class View:
    """What a panel draws from: the store and, for convenience, its latest snapshot."""

    store: TelemetryStore
    snap: Snapshot | None
    thresholds: Thresholds | None
    alarms: Alarms = field(default_factory=Alarms)
    baseline: Baseline | None = None  # a known-good run whose band the sparklines draw behind them

    @classmethod
    def of(cls, store: TelemetryStore, baseline: Baseline | None = None) -> View:
        snap = store.latest
        return cls(store, snap, snap.thresholds if snap is not None else None, Alarms.of(snap), baseline)


class Line:
    """A one-line Content built from labelled, judged values."""

    __slots__ = ("indent", "parts", "width")

    def __init__(self) -> None:
        self.parts: list[str | tuple[str, str]] = []
        self.width = 0
        self.indent = 0  # where a wrapped line's continuation starts: its label column

    def add(self, text: str, style: str = "") -> Line:
        self.parts.append((text, style) if style else text)
        self.width += len(text)
        return self

    def label(self, text: str, width: int = 0) -> Line:
        if width and not self.parts:
            self.indent = width
        return self.add(text.ljust(width) if width else text, LABEL)

    def pad_to(self, column: int) -> Line:
        if self.width < column:
            self.add(" " * (column - self.width))
        return self

    def val(
        self,
        value: Any,
        verdict: Verdict | Mark = Verdict.OK,
        *,
        fmt: Callable[[Any], str] = fmt_num,
        width: int = 0,
        word: str = "",
    ) -> Line:
        """A value in its verdict's colour, followed by the verdict's glyph (and word for alarms).

        Pass a :class:`Mark` (from ``view.alarms.mark``) for anything that may alarm: its word is
        shown only while an incident stands behind it."""
        if isinstance(verdict, Mark):
            verdict, word = verdict.verdict, verdict.word
        text = fmt(value) + GLYPH[verdict]
        if word and verdict >= Verdict.WARN:
            text += f" {word}"
        if width:
            text = text.rjust(width)
        return self.add(text, STYLE[verdict])

    def spark(
        self, values: np.ndarray, width: int, present: np.ndarray | None = None, style: str = "$series"
    ) -> Line:
        if width > 0:
            self.add(sparkline(values, width, present), style)
        return self

    def spark_of(
        self,
        store: TelemetryStore,
        column: str,
        width: int,
        style: str = "$series",
        count: str = "",
        baseline: Baseline | None = None,
    ) -> Line:
        """A sparkline of the last ``width`` updates of a store column (only those rows are read).

        ``count``: a column whose zero means the update had nothing to measure (drawn "·").
        ``baseline``: where it covers the column, its band is drawn behind (see :func:`spark_cells`)."""
        band = _live_band(baseline, store, column, spark_cells(baseline, column, width))
        if band is not None:
            return self._banded_spark(store, column, band, style, count)
        if width > 0:
            empty = store.series(count, width) == 0 if count else None
            self.add(
                sparkline(store.series(column, width), width, store.present(column, width), empty), style
            )
        return self

    def _banded_spark(
        self, store: TelemetryStore, column: str, band: LiveBand, style: str, count: str
    ) -> Line:
        """The sparkline on the band's scale, each update with a band tinted behind, each that left it
        underlined, then the off-baseline mark (or a blank) for the latest update."""
        n = band.values.size
        empty = store.series(count, n) == 0 if count else None
        have = np.isfinite(band.lo) & np.isfinite(band.hi)
        scale = (float(band.lo[have].min()), float(band.hi[have].max())) if have.any() else None
        text = sparkline(store.series(column, n), n, store.present(column, n), empty, scale)
        for i, (here, out) in enumerate(zip(have.tolist(), band.outside.tolist())):
            cell = style + (" underline" if out else "") + (f" {BAND_STYLE}" if here else "")
            self.add(text[i], cell)
        self.add(" ")
        return self.add(OFF_BASELINE if band.latest_outside else " ", OFF_STYLE)

    def build(self) -> Content:
        return Content.assemble(*self.parts)

    def wrap(self, width: int) -> list[Content]:
        """The line in rows of at most ``width`` cells, broken only between fields.

        A field starts where a part begins with a space (``"  limit 0.3"``, ``" max "``) or follows
        a part of spaces only; a label and its value are one field, so a number, a limit or an alarm
        word is never split from its name nor cut. Continuations start at the label column. A field
        wider than a whole row is left to the panel's last-resort cut.
        """
        if width <= 0 or self.width <= width:
            return [self.build()]
        fields: list[list[str | tuple[str, str]]] = []
        for part in self.parts:
            text = part if isinstance(part, str) else part[0]
            prev = fields[-1][-1] if fields and fields[-1] else None
            prev_text = prev if isinstance(prev, str) else prev[0] if prev else ""
            # only a plain space breaks: a non-breaking one (U+00A0) glues a field together
            if not fields or text.startswith(" ") or not prev_text.strip(" "):
                fields.append([part])
            else:
                fields[-1].append(part)
        indent = self.indent if self.indent < width // 2 else 2
        rows: list[list[str | tuple[str, str]]] = [[]]
        used = 0
        for f in fields:
            size = sum(len(p if isinstance(p, str) else p[0]) for p in f)
            if rows[-1] and used + size > width:
                first = f[0]
                text = (first if isinstance(first, str) else first[0]).lstrip(" ")
                if not text and len(f) == 1:
                    continue  # spacing at a break
                stripped = text if isinstance(first, str) else (text, first[1])
                f = [stripped, *f[1:]]
                size = sum(len(p if isinstance(p, str) else p[0]) for p in f)
                rows.append([" " * indent])
                used = indent
            rows[-1].extend(f)
            used += size
        return [Content.assemble(*r) for r in rows if r]


def spark_cells(baseline: Baseline | None, column: str, width: int) -> int:
    """The updates a sparkline of ``width`` cells shows: two fewer where a baseline covers the column
    (a space and the off-baseline mark follow it), so a row aligned under it can match."""
    if baseline is not None and baseline.name_of(column) is not None:
        return max(width - 2, 0)
    return width


def _live_band(baseline: Baseline | None, store: TelemetryStore, column: str, n: int) -> LiveBand | None:
    if baseline is None or n <= 0:
        return None
    name = baseline.name_of(column)
    return None if name is None else baseline.live(store, name, n)


@dataclass(order=True)
class Row:
    """A line with a priority (lower shows first when space is short) and its position."""

    priority: float
    order: int
    line: Content = field(compare=False)


def fit_rows(rows: list[Row], height: int) -> list[Content]:
    """The rows that fit ``height``, most important first, shown in their natural order."""
    if height <= 0:
        return []
    keep = sorted(rows)[:height]
    return [r.line for r in sorted(keep, key=lambda r: r.order)]


@dataclass
class ChartSpec:
    """A history chart a panel draws in the rows it has to spare (taller terminals, zoomed panels)."""

    title: str
    column: str  # store column
    marks: dict[float, str] = field(default_factory=dict)  # threshold level -> its name
    count: str = ""  # a store column whose zero means "nothing to measure" in that update (drawn "·")


class Rows:
    """Collects rows in display order; a :class:`Line` wider than ``width`` wraps between fields."""

    def __init__(self, width: int = 0) -> None:
        self.rows: list[Row] = []
        self.width = width

    def add(self, line: Line | Content | str, priority: float = 5) -> None:
        if isinstance(line, Line):
            wrapped = line.wrap(self.width)
            if len(wrapped) > 1 and priority >= SECONDARY:
                # a secondary line keeps its first row, its last fields left to the zoomed panel
                # (marked " …"), so that it never pushes a chart out
                head = wrapped[0]
                if self.width - head.cell_length >= 2:
                    head = Content.assemble(head, (" …", LABEL))
                wrapped = [head]
            # a continuation yields to every row of its line's priority (the line's head stays, and
            # no other line is pushed out for it); zoomed, there is room for all
            for i, content in enumerate(wrapped):
                self.rows.append(Row(priority + (0.5 if i else 0), len(self.rows), content))
            return
        content = Content(line) if isinstance(line, str) else line
        self.rows.append(Row(priority, len(self.rows), content))


class Panel(Static):
    """A health panel: numbered, focusable, zoomable, redrawn from the store on the app's timer."""

    ALLOW_MAXIMIZE = True
    can_focus = True
    NUMBER: ClassVar[int] = 0
    TITLE: ClassVar[str] = ""
    KEY: ClassVar[str] = ""  # panel name in judge.PANEL_KINDS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        # No links in a panel (trainer text is never markup): skip Textual's per-line link styling,
        # a fifth of the cost of drawing a panel.
        self.set_reactive(Panel.auto_links, False)
        self._drawn_key: tuple[object, int, int] | None = None
        self._drawn_at = -1e18  # time.monotonic() of the last rebuild
        self.state = Verdict.NA
        self.border_title = f"{self.NUMBER} {self.TITLE}" if self.NUMBER else self.TITLE

    def on_resize(self) -> None:
        self._drawn_key = None
        app = self.app
        view = getattr(app, "current_view", None)
        if view is not None:
            self.refresh_from(view())

    def refresh_from(self, view: View, min_interval: float = 0.0) -> None:
        """Rebuild when the store or the size changed since the last draw.

        ``min_interval`` (seconds, > 0): new data is drawn at most that often. When snapshots arrive
        faster, the ticks between skip the rebuild and the next one due draws the latest: a panel
        never shows data older than ``min_interval`` behind the store. A new size draws at once."""
        width, height = self.content_region.width, self.content_region.height
        key = (self.data_key(view), width, height)
        if key == self._drawn_key:
            return
        now = time.monotonic()
        if (
            min_interval > 0
            and self._drawn_key is not None
            and self._drawn_key[1:] == key[1:]
            and now - self._drawn_at < min_interval
        ):
            return
        self._drawn_key = key
        self._drawn_at = now
        rows = Rows(width)
        verdicts: list[Verdict] = []
        if view.snap is None:
            rows.add(Line().label("waiting for the first snapshot…"))
        else:
            verdicts = self.build(rows, view, width)
            spare = height - len(rows.rows)
            spec = self.chart_spec(view) if spare >= 4 else None
            if spec is not None:
                self._add_chart(rows, view, spec, width, spare)
        lines = fit_rows(rows.rows, height)
        # The grid fixes the panel's size: no layout pass for a new text, only a repaint.
        self.update(Content("\n").join(line.truncate(width, ellipsis=True) for line in lines), layout=False)
        self._set_state(view, verdicts)

    def _set_state(self, view: View, verdicts: list[Verdict]) -> None:
        """Border and title from the panel's incidents only: the values' own marks never raise it."""
        kinds = PANEL_KINDS.get(self.KEY, ())
        active = view.alarms.of_kinds(kinds)
        state = incident_verdict(active[0]) if active else Verdict.OK
        self.state = state
        self.set_class(state == Verdict.WARN, "-warn")
        self.set_class(state == Verdict.CRIT, "-crit")
        cleared = [] if active else view.store.incidents.recently_cleared(kinds, CLEARED_FOR)
        self.set_class(bool(cleared), "-cleared")
        # a Content, not a str: head names in the title are trainer text, never markup
        self.border_title = Content(
            panel_title(self.NUMBER, self.TITLE, active, cleared, self.size.width - 6)
        )

    def data_key(self, view: View) -> object:
        """What this panel's text depends on; it is rebuilt only when this changes."""
        return view.store.version

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        """Add this panel's rows; return the verdicts shown (the border takes the worst)."""
        raise NotImplementedError

    def chart_spec(self, view: View) -> ChartSpec | None:
        """The history this panel charts when it has rows to spare (None: no chart)."""
        return None

    def _add_chart(self, rows: Rows, view: View, spec: ChartSpec, width: int, spare: int) -> None:
        store = view.store
        axis = 8
        plot_w = max(width - axis, 1)
        band = _live_band(view.baseline, store, spec.column, plot_w)
        marks_row = band is not None and bool(band.outside.any())
        values = store.series(spec.column, plot_w)
        shown = min(len(values), plot_w)
        # the limits' names and numbers are never cut: the span ("last N updates") goes first, then
        # the legend takes a row of its own
        legend = "".join(f"  ┈ {name} {fmt_limit(level)}" for level, name in spec.marks.items())
        # the band's legend only where it fits whole (the marks' row is labelled anyway): a limit's
        # name and number never give way to it
        band_legend = f"  {OFF_BASELINE} off baseline" if band is not None else ""
        if band_legend and len(spec.title) + len(legend) + len(band_legend) <= width:
            legend += band_legend
        span = f", last {shown} updates"
        if len(spec.title) + len(span) + len(legend) > width:
            span = ""
        own_row = bool(legend) and len(spec.title) + len(legend) > width and spare >= 4
        empty = store.series(spec.count, plot_w) == 0 if spec.count else None
        height = spare - (2 if own_row else 1) - (1 if marks_row else 0)
        lines, lo, hi = chart(
            values,
            plot_w,
            height,
            store.present(spec.column, plot_w),
            spec.marks,
            empty,
            None if band is None else np.concatenate([band.lo, band.hi]),
        )
        title = Line().label(spec.title + span)
        if legend and not own_row:
            title.label(legend)
        rows.add(title, 9)
        if own_row:
            rows.add(Line().label(legend.strip()), 9)
        tinted = _band_cells(band, lo, hi, len(lines)) if band is not None else None
        for i, text in enumerate(lines):
            tick = fmt_num(hi) if i == 0 else fmt_num(lo) if i == len(lines) - 1 else ""
            line = Line().label(tick.rjust(axis - 1) + " ")
            if tinted is None:
                for run in re.findall(r"┈+|[^┈]+", text):  # a limit's dotted line is context, not data
                    line.add(run, "$text-muted" if run[0] == "┈" else "$series")
            else:
                for x, ch in enumerate(text):
                    cell = "$text-muted" if ch == "┈" else "$series"
                    line.add(ch, f"{cell} {BAND_STYLE}" if tinted[i][x] else cell)
            rows.add(line, 9)
        if band is not None and marks_row:
            line = Line().label("outside".rjust(axis - 1) + " ")
            line.add("".join(OFF_BASELINE if o else " " for o in band.outside.tolist()), OFF_STYLE)
            rows.add(line, 9)


def _band_cells(band: LiveBand, lo: float, hi: float, height: int) -> list[list[bool]]:
    """Which cells of a chart spanning ``lo..hi`` in ``height`` rows lie on the band (top row first)."""
    cells = [[False] * band.lo.size for _ in range(height)]
    for x, (b_lo, b_hi) in enumerate(zip(band.lo.tolist(), band.hi.tolist())):
        if np.isfinite(b_lo) and np.isfinite(b_hi):
            for r in range(chart_row(b_hi, lo, hi, height), chart_row(b_lo, lo, hi, height) + 1):
                cells[r][x] = True
    return cells


def panel_title(
    number: int, title: str, active: list[Incident], cleared: list[Incident], width: int = 200
) -> str:
    """``1 Policy ✖ KL SPIKE, RATIO EXPLOSION (direction)`` while incidents are active, then
    ``1 Policy ✓ KL SPIKE cleared at 44`` for a while. Alarm words are never cut: when they do not
    all fit ``width``, the panel's name goes first (its number stays), then the last words, which
    are counted (``+2``)."""
    heads = [f"{number} {title}" if number else title]
    if number:
        heads.append(str(number))  # short of width, the panel's name goes before an alarm word does
    if active:
        words: list[str] = []
        for inc in active:
            word = kind_title(inc.kind)
            if inc.scope:
                word += f" ({scope_label(inc.scope)})"
            if word not in words:
                words.append(word)
        glyph = GLYPH[incident_verdict(active[0])]
        # last resort before counting: the kinds without their scopes (the log names the scopes)
        bare = list(dict.fromkeys(kind_title(inc.kind) for inc in active))
        for candidates in (words, bare):
            for n in range(len(candidates), 0, -1):
                more = f" +{len(candidates) - n}" if n < len(candidates) else ""
                for head in heads:
                    text = f"{head} {glyph} " + ", ".join(candidates[:n]) + more
                    if len(text) <= width:
                        return text
        return f"{heads[-1]} {glyph} {bare[0]}" + (f" +{len(bare) - 1}" if len(bare) > 1 else "")
    if cleared:
        inc = cleared[0]
        word = kind_title(inc.kind)
        options = [f"{h} ✓ {word} cleared at {inc.cleared_step}" for h in heads]
        options.append(f"{heads[-1]} ✓ {word} cleared {inc.cleared_step}")
        return next((o for o in options if len(o) <= width), options[-1])
    return heads[0]
