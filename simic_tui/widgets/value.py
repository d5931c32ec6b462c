"""Value panel: explained variance against the current phase's limit, value loss, critic spread, errors."""

from __future__ import annotations

import math

from simic_tui.fmt import fmt_limit
from simic_tui.judge import Mark, Verdict, judge_ev, judge_low, phase_of_snapshot
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View

__all__ = ["ValuePanel"]

L = 9


class ValuePanel(Panel):
    NUMBER = 2
    TITLE = "Value"
    KEY = "value"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store, alarms = view.snap, view.thresholds, view.store, view.alarms
        assert snap is not None and thr is not None
        val = snap.value
        verdicts: list[Verdict] = []
        if val is None:
            rows.add(Line().label("not measured at this level (OFF)"), 1)
            return verdicts

        phase = phase_of_snapshot(snap)
        limit = thr.ev_limit(phase)
        ev = val.explained_variance
        v = alarms.mark(judge_ev(thr, snap, ev), ("ev_low",), value=ev, word="LOW")
        verdicts.append(v.verdict)
        line = Line().label("expl.var", L)
        if ev is None:
            line.add("—", "$text-muted").label(" (returns constant)")
        else:
            line.val(ev, v)
        line.label(
            f" ≥{fmt_limit(limit)} {phase.value} "
            if width < 50
            else f"  limit {fmt_limit(limit)} ({phase.value}) "
        )
        line.spark_of(store, "value.explained_variance", width - line.width, baseline=view.baseline)
        rows.add(line, 1)

        lv = alarms.mark(Verdict.OK, ("value_collapse",), value=val.value_loss)
        verdicts.append(lv.verdict)
        line = (
            Line()
            .label("loss", L)
            .val(val.value_loss, lv)
            .label(" max ")
            .val(val.value_loss_max, alarms.mark(Verdict.OK, value=val.value_loss_max))
        )
        line.add(" ")
        line.spark_of(store, "value.value_loss", width - line.width, baseline=view.baseline)
        rows.add(line, 1)

        # critic spread vs returns: the value_collapse check's own ratio
        ret_std = getattr(val, "return_std", None)
        if ret_std is None or not math.isfinite(ret_std):
            ret_std = snap.advantage.returns.std if snap.advantage is not None else None
        ratio = val.value_std / ret_std if ret_std and math.isfinite(val.value_std) and ret_std > 0 else None
        rv = alarms.mark(
            judge_low(ratio, warn=thr.value_std_collapse_ratio),
            ("value_collapse",),
            value=ratio,
            word="COLLAPSE",
        )
        verdicts.append(rv.verdict)

        def plain(x: float | None) -> Mark:
            return alarms.mark(Verdict.OK, value=x)

        line = Line().label("values", L).val(val.value_mean, plain(val.value_mean)).label(" ± ")
        line.val(val.value_std, plain(val.value_std))
        line.label("  [").val(val.value_min, plain(val.value_min)).label(", ")
        line.val(val.value_max, plain(val.value_max)).label("]")
        rows.add(line, 2)
        line = Line().label("σ ratio", L).val(ratio, rv)
        line.label(f" ≥{fmt_limit(thr.value_std_collapse_ratio)}")
        if width >= 50:
            line.label("  σ(values) / σ(returns)")
        rows.add(line, 3)

        line = Line().label("error", L).val(val.error_mean, plain(val.error_mean)).label(" ± ")
        line.val(val.error_std, plain(val.error_std))
        if width >= 50:
            line.label("  (value − return)")
        rows.add(line, 3)
        gap = "  " if width >= 50 else " "
        line = Line().label("error q", L)
        if val.error_quantile_n == 0:
            # below NORMAL the percentiles are not computed: say so, a NaN here would read as broken
            line.label(f"not measured at {snap.level.level}")
        else:
            line.label("p5 ").val(val.error_p5, plain(val.error_p5)).label(f"{gap}p50 ")
            line.val(val.error_p50, plain(val.error_p50))
            line.label(f"{gap}p95 ").val(val.error_p95, plain(val.error_p95))
        rows.add(line, 2)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        assert view.snap is not None and view.thresholds is not None
        limit = view.thresholds.ev_limit(phase_of_snapshot(view.snap))
        return ChartSpec("explained variance", "value.explained_variance", {limit: "limit"})
