"""The compare screen: up to eight recordings, aligned, with a summary table and an incident diff.

Each run keeps one colour and one letter (A-H) everywhere on the screen: the legend, the summary
table, every sparkline and the incident diff; the letter says it again with ``NO_COLOR``. Every
statistic is drawn as small multiples (one sparkline per run) on one shared scale and one shared
x-axis, so a row's height and a column's position mean the same thing for every run. ``e`` switches
the x-axis between updates and environment steps.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Static

from simic_tui.compare import (
    RUN_COLOURS,
    RUN_LETTERS,
    Comparison,
    StatSpec,
    align,
    bucket,
    scaled_spark,
    value_range,
)
from simic_tui.fmt import fmt_num
from simic_tui.incidents import scope_label
from simic_tui.judge import GLYPH, Verdict, kind_title
from simic_tui.sanitize import clean_text
from simic_tui.widgets.base import Line
from simic_tui.widgets.cells import rich_cell
from simic_tui.widgets.footer import FittedFooter

__all__ = ["CompareApp", "CompareScreen", "chart_lines", "diff_lines", "notes_lines"]

LABEL = "$text-muted"
_VALUE_W = 8  # the latest value after each sparkline
_COLUMN_MIN = 72  # a chart column of a long run; wider terminals get two or more columns
_COLUMN_MIN_SHORT = 44  # ... of a short one (its title and range still fit)


def run_tag(c: Comparison, i: int) -> tuple[str, str]:
    """The run's letter and its colour (as a Content style)."""
    return RUN_LETTERS[i], f"bold {RUN_COLOURS[i]}"


def axis_of(c: Comparison, env_steps: bool) -> list:  # type: ignore[type-arg]
    return [r.env_steps if env_steps else r.steps.astype(float) for r in c.runs]


def chart_block(c: Comparison, name: str, spec: StatSpec, width: int, env_steps: bool) -> list[Content]:
    """One statistic: a title line with its shared range, then one sparkline per run."""
    spark_w = max(width - 2 - 1 - _VALUE_W, 4)
    xs = axis_of(c, env_steps)
    edges, _, _ = align(xs, spark_w)
    cols = []
    for run, x in zip(c.runs, xs):
        cols.append(bucket(x, run.series[name], run.present[name], edges, spec.worst))
    lo, hi = value_range([v[f] for v, f in cols])
    head = Line().add(name, "bold").label(f"  {fmt_num(lo)} … {fmt_num(hi)}")
    if spec.worst and max(len(x) for x in xs) > spark_w:
        head.label(f"  ({spec.worst} per column)")
    out = [head.build().truncate(width, ellipsis=True)]
    for i, (run, (values, filled)) in enumerate(zip(c.runs, cols)):
        letter, style = run_tag(c, i)
        series = run.series[name]
        latest = next((v for v, p in zip(series[::-1], run.present[name][::-1]) if p), None)
        line = Line().add(letter + " ", style).add(scaled_spark(values, filled, lo, hi), style)
        line.add(" " + fmt_num(latest).rjust(_VALUE_W - 1), style)
        out.append(line.build().truncate(width, ellipsis=True))
    return out


def chart_lines(c: Comparison, width: int, env_steps: bool = False) -> list[Content]:
    """Every shared series, side by side in as many columns as fit (each at least ``_COLUMN_MIN``
    cells, or as wide as the runs have updates when that is less)."""
    xs = axis_of(c, env_steps)
    finite = [x[np.isfinite(x)] for x in xs]
    distinct = len(np.unique(np.concatenate(finite))) if finite else 0
    natural = max(_COLUMN_MIN_SHORT, 2 + 1 + _VALUE_W + distinct)
    want = min(_COLUMN_MIN, natural)
    ncols = max(1, min(4, (width + 2) // (want + 2)))
    col_w = (width - 2 * (ncols - 1)) // ncols
    blocks = [chart_block(c, name, spec, col_w, env_steps) for spec, names in c.shared for name in names]
    out: list[Content] = []
    for start in range(0, len(blocks), ncols):
        row = blocks[start : start + ncols]
        height = max(len(b) for b in row)
        for k in range(height):
            parts = []
            for j, b in enumerate(row):
                cell = b[k] if k < len(b) else Content("")
                pad = col_w - cell.cell_length if j < len(row) - 1 else 0
                parts.append(cell)
                if pad > 0 or j < len(row) - 1:
                    parts.append(Content(" " * (max(pad, 0) + 2)))
            out.append(Content.assemble(*parts))
        out.append(Content(""))
    return out


def _sev(severity: str) -> tuple[str, str]:
    v = Verdict.CRIT if severity == "critical" else Verdict.WARN
    return GLYPH[v], "bold $error" if v == Verdict.CRIT else "$warning"


def diff_lines(c: Comparison, width: int) -> list[Content]:
    """The incidents only some runs had: a row per kind and scope, a column per run (onset update)."""
    title = Content.styled("Incidents only some runs had", "bold")
    legend = Content.styled("  (first onset update; ✖ critical, ▲ warning, — never)", LABEL)
    lines = [Content.assemble(title, legend)]
    if not c.diffs:
        lines.append(Content.styled("  none: every run had the same incidents", LABEL))
    else:
        n = len(c.runs)
        cell_w = 7
        label_w = max(12, min(max(len(_label(d.kind, d.scope)) for d in c.diffs) + 2, width - n * cell_w))
        head = Line().add(" " * label_w)
        for i in range(n):
            letter, style = run_tag(c, i)
            head.add(letter.rjust(cell_w - 1) + " ", style)
        lines.append(head.build())
        for d in c.diffs:
            line = Line().add(_label(d.kind, d.scope)[: label_w - 1].ljust(label_w))
            for i in range(n):
                if i in d.onsets:
                    step, sev = d.onsets[i]
                    glyph, style = _sev(sev)
                    line.add(f"@{step}{glyph}".rjust(cell_w - 1) + " ", style)
                else:
                    line.add("—".rjust(cell_w - 1) + " ", LABEL)
            lines.append(line.build())
    if c.common:
        lines.append(Content.assemble(("Every run had: ", LABEL), ", ".join(c.common)))
    return lines


def _label(kind: str, scope: str) -> str:
    return kind_title(kind).lower() + (f" ({scope_label(scope)})" if scope else "")


def notes_lines(c: Comparison, env_steps: bool) -> list[Content]:
    """What was left out of the comparison and why: the screen never hides a difference silently."""
    out: list[Content] = []
    letters = RUN_LETTERS
    if c.left_out:
        items = [
            f"{name} (only {', '.join(letters[i] for i in having) or 'none'})" for name, having in c.left_out
        ]
        out.append(
            Content.assemble(("Left out (not carried by every run): ", "bold $warning"), "; ".join(items))
        )
    if c.threshold_diffs:
        items = [
            f"{k} " + " ".join(f"{letters[i]} {_val(v)}" for i, v in enumerate(values))
            for k, values in c.threshold_diffs
        ]
        out.append(
            Content.assemble(
                ("Thresholds differ ", "bold $warning"),
                ("(the same number can be an incident in one run and not in another): ", LABEL),
                "; ".join(items),
            )
        )
    heads = [tuple(sorted(r.heads.items())) for r in c.runs]
    if len(set(heads)) > 1:
        items = [f"{letters[i]} " + ", ".join(f"{h}:{n}" for h, n in hs) for i, hs in enumerate(heads)]
        out.append(Content.assemble(("Action heads differ: ", "bold $warning"), "; ".join(items)))
    if env_steps and not c.env_steps_known:
        out.append(
            Content.styled(
                "Environment steps are unknown for some updates (rollout size not measured).", LABEL
            )
        )
    for i, r in enumerate(c.runs):
        if r.notice:
            out.append(Content.assemble((f"{letters[i]}: ", "bold $warning"), r.notice))
    return out


def _val(v: object) -> str:
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


class CompareScreen(Screen):
    """Legend, summary table, incident diff, then the statistics; scrolls as one page."""

    BINDINGS: ClassVar = [
        Binding(
            "e",
            "toggle_axis",
            "Updates/env steps",
            id="compare_axis",
            tooltip="Align by updates or by environment steps",
        ),
        Binding("q", "app.quit", "Quit", id="compare_quit", tooltip="Quit"),
    ]

    DEFAULT_CSS = """
    CompareScreen #compare-title { height: auto; background: $panel; padding: 0 1; }
    CompareScreen #compare-body { height: 1fr; padding: 0 1; }
    CompareScreen #compare-summary { height: auto; max-height: 12; margin-bottom: 1; }
    CompareScreen .compare-text { height: auto; margin-bottom: 1; text-wrap: wrap; }
    CompareScreen #compare-charts { text-wrap: nowrap; }
    """

    def __init__(self, comparison: Comparison) -> None:
        super().__init__()
        self.comparison = comparison
        self.env_steps = False
        self._drawn: tuple[int, bool] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title")
        with VerticalScroll(id="compare-body"):
            yield DataTable(id="compare-summary", cursor_type="none", zebra_stripes=True, show_cursor=False)
            yield Static(id="compare-diff", classes="compare-text")
            yield Static(id="compare-charts", classes="compare-text")
            yield Static(id="compare-notes", classes="compare-text")
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.can_focus = False
        self._fill_summary(table)
        self.query_one(VerticalScroll).focus()
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    def title_content(self) -> Content:
        c = self.comparison
        axis = "environment steps" if self.env_steps else "update"
        parts: list[tuple[str, str] | str] = [
            (f"Compare {len(c.runs)} run{'s' if len(c.runs) != 1 else ''}", "bold"),
            (f"  x: {axis} (e switches)\n", LABEL),
        ]
        for i, r in enumerate(c.runs):
            letter, style = run_tag(c, i)
            parts.append((f"{letter} ━ ", style))
            parts.append((f"{r.name} ", style))
            parts.append((f"{clean_text(r.path.name)}  ", LABEL))  # a file name can hold anything
        return Content.assemble(*parts)

    def redraw(self) -> None:
        width = self.size.width - 5  # the body's padding and its scrollbar
        key = (width, self.env_steps)
        if key == self._drawn or width <= 0 or not self.query("#compare-notes"):
            return  # unchanged, or a resize before the screen is composed
        self._drawn = key
        c = self.comparison
        self.query_one("#compare-title", Static).update(self.title_content())
        self.query_one("#compare-diff", Static).update(Content("\n").join(diff_lines(c, width)))
        self.query_one("#compare-charts", Static).update(
            Content("\n").join(chart_lines(c, width, self.env_steps))
        )
        notes = notes_lines(c, self.env_steps)
        widget = self.query_one("#compare-notes", Static)
        widget.display = bool(notes)
        widget.update(Content("\n").join(notes))

    def _fill_summary(self, table: DataTable) -> None:  # type: ignore[type-arg]
        c = self.comparison
        for label in (
            "run",
            "return last",
            "best",
            "updates",
            "first critical",
            "DEBUG",
            "incidents by kind",  # the widest: last, so the others stay on screen at 80 columns
        ):
            table.add_column(label, key=label)
        for i, (r, s) in enumerate(zip(c.runs, c.summaries)):
            letter, style = run_tag(c, i)
            kinds = (
                ", ".join(f"{kind_title(k).lower()} {n}" for k, n in s.incidents_by_kind.items()) or "none"
            )
            fc = s.first_critical
            first = f"{kind_title(fc.kind).lower()}{_scope(fc.scope)} @{fc.peak_step}" if fc else "none"
            planned = f"/{r.planned}" if r.planned else ""
            table.add_row(
                rich_cell(self.app, f"{letter} {r.name}", style),
                fmt_num(s.final_return),
                fmt_num(s.best_return),
                f"{s.updates}{planned}",
                rich_cell(self.app, first, "bold $error" if fc else "$text-muted"),
                f"{s.debug_updates} upd, {fmt_num(s.debug_seconds)} s",
                Text(kinds),  # kind names come from the trainer: never markup
                key=f"run{i}",
            )

    def action_toggle_axis(self) -> None:
        if not self.env_steps and not self.comparison.env_steps_known:
            self.app.notify(
                "environment steps are unknown for some updates (rollout size not measured): the x-axis "
                "stays on updates",
                severity="warning",
                markup=False,
            )
            return
        self.env_steps = not self.env_steps
        self.redraw()


def _scope(scope: str) -> str:
    return f" ({scope_label(scope)})" if scope else ""


class CompareApp(App[None]):
    """``simic-tui compare``: one screen, no connection."""

    TITLE = "simic-tui compare"

    def __init__(self, comparison: Comparison) -> None:
        super().__init__()
        self.comparison = comparison

    def get_default_screen(self) -> Screen:
        return CompareScreen(self.comparison)

    def notify(  # type: ignore[override]
        self,
        message: str,
        *,
        title: str = "",
        severity: str = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Plain text: messages may quote run names, and trainer text is never markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)  # type: ignore[arg-type]

    def _handle_exception(self, error: Exception) -> None:
        from simic_tui.app import SimicApp

        SimicApp._handle_exception(self, error)  # type: ignore[arg-type]
