"""The DEBUG screen: the per-layer gradient table (sortable), numerical stability, ratio outliers, conflict.

It shows the newest DebugReport the store holds (reports arrive while the level is DEBUG: an
operator lease or an automatic escalation) and says which step it is from.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Static

from simic_tui.fmt import fmt_count, fmt_limit, fmt_num, fmt_pct, sparkline
from simic_tui.judge import (
    GLYPH,
    STYLE,
    Verdict,
    judge_high,
    judge_low,
    judge_nonfinite_count,
    max_grad_norm_of,
)
from simic_tui.keys import DEBUG_BINDINGS
from simic_tui.widgets.base import Line
from simic_tui.widgets.cells import rich_cell
from simic_tui.widgets.footer import FittedFooter
from telemetry_core.config import Thresholds
from telemetry_core.schema import DebugReport, LayerRow, Snapshot

if TYPE_CHECKING:
    from simic_tui.app import SimicApp

__all__ = ["LAYER_COLUMNS", "DebugScreen", "conflict_text", "layer_cell", "numerical_text", "outliers_text"]

# (key, label, attribute, formatter); the table sorts by the attribute's raw value.
LAYER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "parameter", "name"),
    ("numel", "numel", "numel"),
    ("norm", "‖g‖", "norm"),
    ("mean", "mean", "mean"),
    ("std", "std", "std"),
    ("min", "min", "min"),
    ("max", "max", "max"),
    ("zero", "zero", "zero_frac"),
    ("small", "small", "small_frac"),
    ("large", "large", "large_frac"),
    ("nan", "NaN", "nan"),
    ("inf", "Inf", "inf"),
)
_FRACTIONS = {"zero_frac", "small_frac", "large_frac"}


def _sort_value(row: LayerRow, attr: str) -> tuple[int, Any]:
    value = getattr(row, attr)
    if isinstance(value, str):
        return (0, value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)  # NaN rows sort together, after the numbers
    return (0, value)


def layer_cell(row: LayerRow, attr: str, thr: Thresholds, cap: float | None) -> tuple[str, str]:
    """The text and theme style of one cell of the per-layer table (limits from ``thr``)."""
    value = getattr(row, attr)
    if attr == "name":
        bad = row.nan or row.inf or not math.isfinite(row.norm)
        return value + (" ✖" if bad else ""), STYLE[Verdict.CRIT] if bad else ""
    if attr == "numel":
        return fmt_count(value), ""
    if attr in ("nan", "inf"):
        return str(value), STYLE[judge_nonfinite_count(value)]
    if attr in _FRACTIONS:
        v = judge_high(value, warn=0.0) if attr == "large_frac" else judge_high(value)
        return fmt_pct(value, 1) + GLYPH[v], STYLE[v]
    if attr == "norm" and cap:
        v = judge_high(value, crit=thr.grad_exploding_rel * cap)
        if v == Verdict.OK:
            v = judge_low(value, warn=thr.grad_vanishing_rel * cap)
        return fmt_num(value) + GLYPH[v], STYLE[v]
    v = judge_high(value)
    return fmt_num(value) + GLYPH[v], STYLE[v]


def numerical_text(report: DebugReport) -> Content:
    n = report.numerical
    lines = [Content.styled("Numerical stability", "bold $focus")]
    for label, names in (
        ("non-finite weights", n.nonfinite_weights),
        ("non-finite grads", n.nonfinite_grads),
    ):
        line = Line().label(f"{label:<19}")
        if names:
            line.add(
                f"✖ {len(names)}: " + ", ".join(names[:6]) + (" …" if len(names) > 6 else ""),
                STYLE[Verdict.CRIT],
            )
        else:
            line.add("none")
        lines.append(line.build())
    lines.append(
        Line()
        .label(f"{'max |w|':<19}")
        .val(n.max_abs_weight, judge_high(n.max_abs_weight))
        .label(f"  {n.max_abs_weight_param}")
        .build()
    )
    lines.append(
        Line()
        .label(f"{'max |g|':<19}")
        .val(n.max_abs_grad, judge_high(n.max_abs_grad))
        .label(f"  {n.max_abs_grad_param}")
        .build()
    )
    loss = Line().label(f"{'loss finite':<19}")
    if n.loss_finite is None:
        loss.label("— (no loss handed over)")
    elif n.loss_finite:
        loss.add("yes")
    else:
        loss.add("✖ NO", STYLE[Verdict.CRIT])
    seen = getattr(n, "losses_seen", 0)
    if seen:
        bad = getattr(n, "nonfinite_losses", 0)
        loss.label(f"  ({seen} losses, ").val(bad, judge_nonfinite_count(bad)).label(" non-finite)")
    lines.append(loss.build())
    if n.pre_clip_norms:
        vals = np.asarray(n.pre_clip_norms, dtype=np.float64)
        line = Line().label(f"{'pre-clip norms':<19}").add(sparkline(vals, 24), "$series")
        line.label(f" {len(vals)}× max ").val(float(np.nanmax(vals)) if np.isfinite(vals).any() else math.nan)
        lines.append(line.build())
    skipped = getattr(report, "skipped", 0)
    if skipped:
        lines.append(
            Line().label(f"{'skipped':<19}").add(f"{skipped} parameter(s) without a dense gradient").build()
        )
    return Content("\n").join(lines)


def outliers_text(report: DebugReport, limit: int = 4) -> Content:
    lines = [Content.styled("Ratio outliers (worst samples, per head)", "bold $focus")]
    if not report.outliers:
        lines.append(Content.styled("none reported", "$text-muted"))
    for o in report.outliers:
        head = (
            Line()
            .add(f"{o.head:<10}", "bold")
            .label("mean |Δlogp| ")
            .val(o.logp_diff_mean)
            .label("  max ")
            .val(o.logp_diff_max)
        )
        nonfinite = getattr(o, "nonfinite", 0)
        if nonfinite:
            head.label("  non-finite ").val(nonfinite, Verdict.CRIT)
        lines.append(head.build())
        for i in range(min(limit, len(o.ratios))):
            ratio = o.ratios[i]
            v = Verdict.CRIT if not math.isfinite(ratio) else Verdict.OK
            index = o.indices[i] if i < len(o.indices) else "?"
            line = Line().label(f"  #{index:<5}").label("r ").val(ratio, v, width=5)
            if i < len(o.logp_diff):
                line.label(" Δ ").val(o.logp_diff[i], width=6)
            if i < len(o.actions) and o.actions[i] >= 0:
                line.label(f" a{o.actions[i]}")
            epochs = getattr(o, "epochs", [])
            mbs = getattr(o, "minibatches", [])
            if i < len(epochs) and i < len(mbs):
                line.label(f" ep{epochs[i]}/mb{mbs[i]}")
            lines.append(line.build())
    return Content("\n").join(lines)


def conflict_text(report: DebugReport, thr: Thresholds) -> Content:
    lines = [Content.styled("Gradient conflict (cosine on shared parameters)", "bold $focus")]
    c = report.conflict
    if c is None:
        lines.append(
            Content.styled(
                "not computed: the loop did not hand over separate loss terms (observe_loss_terms)",
                "$text-muted",
            )
        )
        return Content("\n").join(lines)
    limit = thr.grad_conflict_cosine

    def cos(label: str, value: float | None) -> Content:
        v = judge_low(value, warn=limit)
        line = Line().label(f"{label:<20}").val(value, v, word="CONFLICT" if v == Verdict.WARN else "")
        return line.build()

    lines.append(cos("policy vs value", c.policy_value_cosine))
    for pair, value in c.head_cosines.items():
        lines.append(cos(pair.replace("|", " vs "), value))
    for head, value in getattr(c, "head_value_cosines", {}).items():
        lines.append(cos(f"{head} vs value", value))
    lines.append(
        Content.styled(f"below {fmt_limit(limit)}: the terms pull the shared trunk apart", "$text-muted")
    )
    lines.append(
        Content.styled(
            f"{c.shared_params} shared tensors · {c.extra_backward_passes} extra backward pass(es)",
            "$text-muted",
        )
    )
    return Content("\n").join(lines)


class DebugScreen(Screen):
    BINDINGS = DEBUG_BINDINGS

    def __init__(self) -> None:
        super().__init__()
        self.sort_column = "norm"
        self.sort_reverse = True
        self._shown: tuple[int, int, str, bool] | None = None

    @property
    def simic(self) -> SimicApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(id="debug-title")
        with VerticalScroll(id="debug-body"):
            yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
            with Horizontal(id="debug-reports"):
                yield Static(id="numerical", classes="debug-report")
                yield Static(id="outliers", classes="debug-report")
                yield Static(id="conflict", classes="debug-report")
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label, _ in LAYER_COLUMNS:
            table.add_column(label, key=key)
        self.refresh_view()
        table.focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = key, key != "name"
        self.refresh_view()

    def action_sort_next(self) -> None:
        keys = [k for k, _, _ in LAYER_COLUMNS]
        self.sort_column = keys[(keys.index(self.sort_column) + 1) % len(keys)]
        self.sort_reverse = self.sort_column != "name"
        self.refresh_view()

    def action_sort_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.refresh_view()

    def refresh_view(self) -> None:
        store = self.simic.store
        latest = store.latest_debug
        key = (
            store.version if latest is None else id(latest[1]),
            store.count,
            self.sort_column,
            self.sort_reverse,
        )
        if key == self._shown:
            return
        self._shown = key
        self._title(store.latest, latest)
        if latest is None:
            return
        _, report = latest
        snap = store.latest
        assert snap is not None
        thr = snap.thresholds
        cap = max_grad_norm_of(snap)
        self._fill_table(report, thr, cap)
        self.query_one("#numerical", Static).update(numerical_text(report))
        self.query_one("#outliers", Static).update(outliers_text(report))
        self.query_one("#conflict", Static).update(conflict_text(report, thr))

    def _title(self, snap: Snapshot | None, latest: tuple[int, DebugReport] | None) -> None:
        title = self.query_one("#debug-title", Static)
        lease = self.simic.lease_text()
        parts: list[tuple[str, str] | str] = [(" DEBUG", "bold $warning")]
        if latest is None:
            hint = (
                "waiting for the first DEBUG report"
                if lease
                else "no DEBUG report yet: press d on the dashboard"
            )
            parts.append((f"  {hint}", "$text-muted"))
        else:
            step, _ = latest
            age = (
                f" ({snap.step - step} updates ago)"
                if snap is not None and snap.step != step
                else " (this update)"
            )
            parts.append((f"  report from step {step}{age}", ""))
        if snap is not None:
            parts.append((f"  · level {snap.level.level}: {snap.level.reason}", "$text-muted"))
        if lease:
            parts.append((f"  · {lease}", "bold $warning"))
        order = "descending" if self.sort_reverse else "ascending"
        parts.append((f"  · sorted by {self.sort_column} ({order})", "$text-muted"))
        title.update(Content.assemble(*parts))

    def _fill_table(self, report: DebugReport, thr: Thresholds, cap: float | None) -> None:
        table = self.query_one(DataTable)
        attr = {k: a for k, _, a in LAYER_COLUMNS}[self.sort_column]
        finite = [r for r in report.layers if _sort_value(r, attr)[0] == 0]
        nan_rows = [r for r in report.layers if _sort_value(r, attr)[0] == 1]
        rows = sorted(finite, key=lambda r: _sort_value(r, attr)[1], reverse=self.sort_reverse)
        rows = (
            nan_rows + rows if self.sort_reverse else rows + nan_rows
        )  # NaN first when looking for the worst
        cursor = table.cursor_row
        selected = None
        if table.row_count and 0 <= cursor < table.row_count:
            selected = table.coordinate_to_cell_key((cursor, 0)).row_key.value
        table.clear()
        for row in rows:
            cells = (layer_cell(row, a, thr, cap) for _, _, a in LAYER_COLUMNS)
            table.add_row(*(rich_cell(self.app, text, style) for text, style in cells), key=row.name)
        if selected is not None:
            names = [r.name for r in rows]
            if selected in names:
                table.move_cursor(row=names.index(selected), animate=False)
