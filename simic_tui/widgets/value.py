"""Value panel: explained variance against the current phase's limit, value loss, critic spread, errors."""

from __future__ import annotations

import math

from simic_tui.fmt import fmt_limit
from simic_tui.judge import Verdict, alarm_word, judge_ev, judge_high, judge_low, phase_of_snapshot
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View

__all__ = ["ValuePanel"]

L = 9


class ValuePanel(Panel):
    NUMBER = 2
    TITLE = "Value"
    KEY = "value"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store = view.snap, view.thresholds, view.store
        assert snap is not None and thr is not None
        val = snap.value
        verdicts: list[Verdict] = []
        if val is None:
            rows.add(Line().label("not measured at this level (OFF)"), 1)
            return verdicts

        phase = phase_of_snapshot(snap)
        limit = thr.ev_limit(phase)
        ev = val.explained_variance
        v = judge_ev(thr, snap, ev)
        verdicts.append(v)
        line = Line().label("expl.var", L)
        if ev is None:
            line.add("—", "$text-muted").label(" (returns constant)")
        else:
            line.val(ev, v, word="LOW" if v == Verdict.WARN else "")
        line.label(
            f" ≥{fmt_limit(limit)} {phase.value} "
            if width < 50
            else f"  limit {fmt_limit(limit)} ({phase.value}) "
        )
        line.spark_of(store, "value.explained_variance", width - line.width)
        rows.add(line, 1)

        lv = judge_high(val.value_loss)
        verdicts.append(lv)
        line = (
            Line()
            .label("loss", L)
            .val(val.value_loss, lv)
            .label(" max ")
            .val(val.value_loss_max, judge_high(val.value_loss_max))
        )
        line.add(" ")
        line.spark_of(store, "value.value_loss", width - line.width)
        rows.add(line, 1)

        # critic spread vs returns: the value_collapse check's own ratio
        ret_std = getattr(val, "return_std", None)
        if ret_std is None or not math.isfinite(ret_std):
            ret_std = snap.advantage.returns.std if snap.advantage is not None else None
        ratio = val.value_std / ret_std if ret_std and math.isfinite(val.value_std) and ret_std > 0 else None
        rv = judge_low(ratio, crit=thr.value_std_collapse_ratio)
        verdicts.append(rv)
        line = Line().label("values", L).val(val.value_mean).label(" ± ").val(val.value_std)
        line.label("  [").val(val.value_min).label(", ").val(val.value_max).label("]")
        rows.add(line, 2)
        line = Line().label("σ ratio", L).val(ratio, rv, word=alarm_word(ratio, rv, "COLLAPSE"))
        line.label(f" ≥{fmt_limit(thr.value_std_collapse_ratio)}")
        if width >= 50:
            line.label("  σ(values) / σ(returns)")
        rows.add(line, 3)

        line = Line().label("error", L).val(val.error_mean).label(" ± ").val(val.error_std)
        if width >= 50:
            line.label("  (value − return)")
        rows.add(line, 3)
        gap = "  " if width >= 50 else " "
        line = (
            Line().label("error q", L).label("p5 ").val(val.error_p5).label(f"{gap}p50 ").val(val.error_p50)
        )
        line.label(f"{gap}p95 ").val(val.error_p95)
        rows.add(line, 2)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        assert view.snap is not None and view.thresholds is not None
        limit = view.thresholds.ev_limit(phase_of_snapshot(view.snap))
        return ChartSpec("explained variance", "value.explained_variance", {limit: "limit"})
