"""Advantage panel: raw and normalised moments, return percentiles, finished episodes."""

from __future__ import annotations

from simic_tui.fmt import fmt_num, fmt_pct
from simic_tui.judge import Alarms, Mark, Verdict, judge_high, judge_low
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View
from telemetry_core.config import Thresholds
from telemetry_core.schema import Moments

__all__ = ["AdvantagePanel"]

L = 9


def _moment_verdicts(thr: Thresholds, alarms: Alarms, m: Moments, raw: bool) -> dict[str, Mark]:
    """Limits of the t screen (▲ at most); NaN is red only with an incident behind it."""
    skew = abs(m.skew) if m.skew is not None else None
    limits = {
        "mean": (judge_high(m.mean), m.mean),
        "std": (judge_low(m.std, warn=thr.adv_std_min if raw else None), m.std),
        "min": (judge_high(m.min), m.min),
        "max": (judge_high(m.max), m.max),
        "skew": (judge_high(skew, warn=thr.adv_skew_warning), skew),
        "kurtosis": (judge_high(m.kurtosis, warn=thr.adv_kurtosis_warning), m.kurtosis),
        "frac_positive": (judge_high(m.frac_positive), m.frac_positive),
    }
    return {name: alarms.mark(v, value=x) for name, (v, x) in limits.items()}


class AdvantagePanel(Panel):
    NUMBER = 3
    TITLE = "Advantage"
    KEY = "advantage"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store, alarms = view.snap, view.thresholds, view.store, view.alarms
        assert snap is not None and thr is not None
        adv = snap.advantage
        verdicts: list[Verdict] = []
        if adv is None:
            rows.add(Line().label("not measured at this level (MINIMAL)"), 1)
        else:
            raw_v = _moment_verdicts(thr, alarms, adv.raw, raw=True)
            norm_v = _moment_verdicts(thr, alarms, adv.normalized, raw=False)
            verdicts += [m.verdict for m in raw_v.values()]
            if width >= 58:
                cols = ("mean", "std", "min", "max", "skew", "kurtosis", "frac_positive")
                heads = ("mean", "std", "min", "max", "skew", "kurt", ">0")
                line = Line().label("", L)
                for h in heads:
                    line.label(h.rjust(7))
                rows.add(line, 2)
                for name, m, vs in (("raw", adv.raw, raw_v), ("norm", adv.normalized, norm_v)):
                    line = Line().label(name, L)
                    for c in cols:
                        fmt = fmt_pct if c == "frac_positive" else fmt_num
                        line.val(getattr(m, c), vs[c], fmt=fmt, width=7)
                    rows.add(line, 1 if name == "raw" else 3)
            else:
                for name, m, vs, pri in (("raw", adv.raw, raw_v, 1), ("norm", adv.normalized, norm_v, 3)):
                    line = (
                        Line()
                        .label(name, 5)
                        .label("μ ")
                        .val(m.mean, vs["mean"])
                        .label(" σ ")
                        .val(m.std, vs["std"])
                    )
                    line.label(" [").val(m.min, vs["min"]).label(", ").val(m.max, vs["max"]).label("]")
                    rows.add(line, pri)
                    line = (
                        Line()
                        .label("", 5)
                        .label("skew ")
                        .val(m.skew, vs["skew"])
                        .label(" kurt ")
                        .val(m.kurtosis, vs["kurtosis"])
                    )
                    line.label(" >0 ").val(m.frac_positive, vs["frac_positive"], fmt=fmt_pct)
                    rows.add(line, pri + 1)
            r = adv.returns
            line = Line().label("returns", L)
            if r.quantile_n == 0 and r.count == 0:
                line.label(f"not measured at {snap.level.level}")
            else:
                for name, x in (
                    ("p10 ", r.p10),
                    (" p50 ", r.p50),
                    (" p90 ", r.p90),
                    ("  μ ", r.mean),
                    (" σ ", r.std),
                ):
                    line.label(name).val(x, alarms.mark(Verdict.OK, value=x))
            rows.add(line, 2)
        ep = snap.episodes
        if ep is not None:
            line = Line().label("episodes", L)
            if ep.count:
                ret = alarms.mark(Verdict.OK, ("performance_degradation",), value=ep.return_mean)
                line.val(ep.count).label(" done  R ").val(ep.return_mean, ret).label(" [").val(ep.return_min)
                line.label(", ").val(ep.return_max).label("]  len ").val(ep.length_mean).add(" ")
                line.spark_of(
                    store,
                    "episodes.return_mean",
                    width - line.width,
                    count="episodes.count",
                    baseline=view.baseline,
                )
            else:
                line.label("none finished in this rollout" if width >= 50 else "none finished")
            rows.add(line, 2)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        return ChartSpec("episode return (mean)", "episodes.return_mean", count="episodes.count")
