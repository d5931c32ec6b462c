"""LSTM panel: h and c norms, cell mean, gate saturation, NaN/Inf in the recurrent state."""

from __future__ import annotations

from simic_tui.fmt import fmt_pct
from simic_tui.judge import Verdict, alarm_word, judge_high, judge_low, judge_nonfinite_count
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View

__all__ = ["LSTMPanel"]

L = 9


class LSTMPanel(Panel):
    NUMBER = 5
    TITLE = "LSTM"
    KEY = "lstm"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store = view.snap, view.thresholds, view.store
        assert snap is not None and thr is not None
        s = snap.lstm
        verdicts: list[Verdict] = []
        if s is None:
            rows.add(Line().label("no LSTM state reported (no recurrent model, or level MINIMAL)"), 1)
            return verdicts

        hv = judge_high(s.h_norm, crit=thr.lstm_norm_max)
        if hv == Verdict.OK:
            hv = judge_low(s.h_norm, warn=thr.lstm_norm_min)
        cv = judge_high(s.c_norm, crit=thr.lstm_norm_max)
        cmax = judge_high(s.c_max_abs, warn=thr.lstm_c_max_abs)
        verdicts += [hv, cv, cmax]
        line = (
            Line()
            .label("h", 2)
            .label("‖h‖ ")
            .val(s.h_norm, hv, word=alarm_word(s.h_norm, hv, "EXPLODED"))
        )
        line.label(" rms ").val(s.h_rms, judge_high(s.h_rms)).label(" max ").val(
            s.h_max_abs, judge_high(s.h_max_abs)
        ).add(" ")
        line.spark_of(store, "lstm.h_norm", width - line.width)
        rows.add(line, 1)
        line = (
            Line()
            .label("c", 2)
            .label("‖c‖ ")
            .val(s.c_norm, cv, word=alarm_word(s.c_norm, cv, "EXPLODED"))
        )
        line.label(" rms ").val(s.c_rms, judge_high(s.c_rms)).label(" max ").val(s.c_max_abs, cmax)
        if width >= 56:
            line.label(" mean ").val(s.c_mean, judge_high(s.c_mean))
        line.add(" ")
        line.spark_of(store, "lstm.c_norm", width - line.width)
        rows.add(line, 1)

        if s.gate_saturation:
            line = Line().label("gates", L)
            for gate, share in s.gate_saturation.items():
                gv = judge_high(
                    share, warn=thr.lstm_gate_saturation_warning, crit=thr.lstm_gate_saturation_critical
                )
                verdicts.append(gv)
                line.label(f"{gate} ").val(
                    share, gv, fmt=fmt_pct, word="SATURATED" if gv == Verdict.CRIT else ""
                ).add(" ")
            if s.gate_rows:
                line.label(f"({s.gate_rows} rows)")
            rows.add(line, 2)

        line = Line().label("NaN/Inf", L)
        for name, nan, inf in (("h", s.h_nan, s.h_inf), ("c", s.c_nan, s.c_inf)):
            nv, iv = judge_nonfinite_count(nan), judge_nonfinite_count(inf)
            verdicts += [nv, iv]
            line.label(f"{name} ").val(nan, nv).label("/").val(inf, iv).add("  ")
        if any(n for n in (s.h_nan, s.h_inf, s.c_nan, s.c_inf)):
            line.add("NON-FINITE STATE", "bold $error")
        rows.add(line, 2)

        line = Line().label("c mean", L).val(s.c_mean, judge_high(s.c_mean))
        line.label("  env rms max h ").val(s.h_env_rms_max).label(" c ").val(s.c_env_rms_max)
        rows.add(line, 3)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        return ChartSpec("‖c‖ (cell state norm)", "lstm.c_norm")
