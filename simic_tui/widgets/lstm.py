"""LSTM panel: h and c norms, cell mean, gate saturation, NaN/Inf in the recurrent state."""

from __future__ import annotations

from simic_tui.fmt import fmt_pct
from simic_tui.judge import Mark, Verdict, judge_high, judge_low, judge_nonfinite_count
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View

__all__ = ["LSTMPanel"]

L = 9


class LSTMPanel(Panel):
    NUMBER = 5
    TITLE = "LSTM"
    KEY = "lstm"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store, alarms = view.snap, view.thresholds, view.store, view.alarms
        assert snap is not None and thr is not None
        s = snap.lstm
        verdicts: list[Verdict] = []
        if s is None:
            # One short row (nothing to chart either): a feed-forward model has no recurrent state.
            rows.add(Line().label("no LSTM in this run (or level MINIMAL)"), 1)
            return verdicts

        # Past lstm_norm_max is ▲ (a limit t lists); EXPLODED and ✖ belong to the lstm_unhealthy
        # incident, whose rule judges growth against the run's own history.
        lstm = ("lstm_unhealthy",)
        hv = judge_high(s.h_norm, warn=thr.lstm_norm_max)
        h_word = "EXPLODED" if hv != Verdict.OK else ""
        if hv == Verdict.OK:
            hv = judge_low(s.h_norm, warn=thr.lstm_norm_min)
        hm = alarms.mark(hv, lstm, value=s.h_norm, word=h_word)
        cm = alarms.mark(judge_high(s.c_norm, warn=thr.lstm_norm_max), lstm, value=s.c_norm, word="EXPLODED")
        cmax = alarms.mark(
            judge_high(s.c_max_abs, warn=thr.lstm_c_max_abs), value=s.c_max_abs, limit=thr.lstm_c_max_abs
        )
        verdicts += [hm.verdict, cm.verdict, cmax.verdict]

        def plain(x: float) -> Mark:
            return alarms.mark(Verdict.OK, value=x)

        line = Line().label("h", 2).label("‖h‖ ").val(s.h_norm, hm)
        line.label(" rms ").val(s.h_rms, plain(s.h_rms)).label(" max ").val(s.h_max_abs, plain(s.h_max_abs))
        line.add(" ")
        line.spark_of(store, "lstm.h_norm", width - line.width, baseline=view.baseline)
        rows.add(line, 1)
        line = Line().label("c", 2).label("‖c‖ ").val(s.c_norm, cm)
        line.label(" rms ").val(s.c_rms, plain(s.c_rms)).label(" max ").val(s.c_max_abs, cmax)
        if width >= 56:
            line.label(" mean ").val(s.c_mean, plain(s.c_mean))
        line.add(" ")
        line.spark_of(store, "lstm.c_norm", width - line.width, baseline=view.baseline)
        rows.add(line, 1)

        if s.gate_saturation:
            line = Line().label("gates", L)
            for gate, share in s.gate_saturation.items():
                gv = alarms.mark(
                    judge_high(
                        share, warn=thr.lstm_gate_saturation_warning, crit=thr.lstm_gate_saturation_critical
                    ),
                    lstm,
                    value=share,
                    word="SATURATED",
                )
                verdicts.append(gv.verdict)
                line.label(f"{gate} ").val(share, gv, fmt=fmt_pct).add(" ")
            if s.gate_rows:
                line.label(f"({s.gate_rows} rows)")
            rows.add(line, 2)
        elif not s.gates_fed:  # the loop handed over the state but not the inputs gates need
            line = Line().label("gates", L).add("not fed", "$text-muted")
            if s.gates_not_fed:
                line.label(f" ({s.gates_not_fed} updates)")
            rows.add(line, 2)
            hint = "pass lstm_inputs= to end_update"
            if width >= L + len(hint):  # the fix, on its own row where it fits whole
                rows.add(Line().label("", L).label(hint), 4)

        line = Line().label("NaN/Inf", L)
        for name, nan, inf in (("h", s.h_nan, s.h_inf), ("c", s.c_nan, s.c_inf)):
            nv = alarms.mark(judge_nonfinite_count(nan), (*lstm, "numerical_instability"), at_most=Verdict.OK)
            iv = alarms.mark(judge_nonfinite_count(inf), (*lstm, "numerical_instability"), at_most=Verdict.OK)
            nv, iv = (nv if nan else Mark(Verdict.OK)), (iv if inf else Mark(Verdict.OK))
            verdicts += [nv.verdict, iv.verdict]
            line.label(f"{name} ").val(nan, nv).label("/").val(inf, iv).add("  ")
        if any(n for n in (s.h_nan, s.h_inf, s.c_nan, s.c_inf)) and alarms.find(
            (*lstm, "numerical_instability")
        ):
            line.add("NON-FINITE STATE", "bold $error")
        rows.add(line, 2)

        line = Line().label("c mean", L).val(s.c_mean, plain(s.c_mean))
        line.label("  env rms max h ").val(s.h_env_rms_max).label(" c ").val(s.c_env_rms_max)
        rows.add(line, 3)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        if view.snap is None or view.snap.lstm is None:
            return None  # no recurrent state: no empty chart
        return ChartSpec("‖c‖ (cell state norm)", "lstm.c_norm")
