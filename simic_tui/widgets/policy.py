"""Policy panel: per-head entropy (log-std, differential entropy and saturation for continuous heads),
KL (k3) with early-stop markers, clipping, ratios, ESS."""

from __future__ import annotations

import numpy as np

from simic_tui.fmt import fmt_num, fmt_pct
from simic_tui.judge import (
    Verdict,
    judge_entropy,
    judge_high,
    judge_kl,
    judge_low,
    judge_ratio_max,
    judge_ratio_min,
)
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View, spark_cells

__all__ = ["PolicyPanel"]

L = 9  # label column


class PolicyPanel(Panel):
    NUMBER = 1
    TITLE = "Policy"
    KEY = "policy"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store, alarms = view.snap, view.thresholds, view.store, view.alarms
        assert snap is not None and thr is not None
        pol = snap.policy
        verdicts: list[Verdict] = []
        if pol is None:
            rows.add(Line().label("not measured at this level (OFF)"), 1)
            return verdicts
        wide = width >= 60

        # entropy per head, normalised by log|A|: the collapse alarm lives here
        gaussian = list(pol.log_std_mean)  # continuous heads: no normalised entropy, a log-std
        heads = [h for h in (list(pol.entropy_normalized) or list(snap.run.heads)) if h not in gaussian]
        head_w = max((len(h) for h in heads), default=4) + 1
        # A head below its limit is ▲ (the t screen's entropy limits); its alarm (✖, COLLAPSE) is the
        # entropy_collapse incident's, which the trainer raises after its patience and keeps through
        # its hysteresis, so the panel and the log never disagree.
        for i, head in enumerate(heads):
            value = pol.entropy_normalized.get(head)
            ev = judge_entropy(thr, head, value)
            mark = alarms.mark(
                ev,
                ("entropy_collapse",),
                head=head,
                value=value,
                word="COLLAPSE",
                limit=thr.entropy_limit(head) if ev == Verdict.CRIT else thr.entropy_warning,
            )
            verdicts.append(mark.verdict)
            line = Line().label("entropy" if i == 0 else "", L).label(head.ljust(head_w))
            line.val(value, mark, width=6)
            if wide:
                nats = pol.entropy.get(head)
                line.add(f" {fmt_num(nats)} nats", "$text-muted")
            line.add(" ")
            col = f"policy.entropy_normalized.{head}"
            line.spark_of(store, col, width - line.width, baseline=view.baseline)
            rows.add(line, 1)
        for head in gaussian:
            verdicts += self._gaussian(rows, view, width, head, max(head_w, len(head) + 1))

        # KL k3: mean (judged) and max, history, early stops
        kl_v = judge_kl(thr, pol.kl_k3_mean)
        kl_limit = thr.kl_spike_critical if kl_v == Verdict.CRIT else thr.kl_spike_warning
        kv = alarms.mark(kl_v, ("kl_spike",), value=pol.kl_k3_mean, word="SPIKE", limit=kl_limit)
        verdicts.append(kv.verdict)
        line = Line().label("KL k3", L)
        if width >= 44:
            line.label("mean ")
        line.val(pol.kl_k3_mean, kv)
        if width >= 64:
            # the last epoch that ran, wherever an early stop ended the update (SB3's approx_kl): the
            # mean over epochs understates an update whose last epochs moved the policy most
            last = pol.kl_k3_per_epoch[-1] if pol.kl_k3_per_epoch else None
            line.label(" last ").val(last, alarms.mark(Verdict.OK, value=last))
        line.label(" max ").val(pol.kl_k3_max, alarms.mark(Verdict.OK, value=pol.kl_k3_max))
        line.add(" ")
        spark_col = line.width
        spark_w = max(width - spark_col, 0)
        line.spark_of(store, "policy.kl_k3_mean", spark_w, baseline=view.baseline)
        rows.add(line, 1)
        # the early stops line up under the sparkline's updates (fewer with a baseline's mark after it)
        stop_w = spark_cells(view.baseline, "policy.kl_k3_mean", spark_w)
        if stop_w > 0:
            stops = store.series("policy.early_stopped", stop_w)
            marks = "".join("ˆ" if s == 1.0 else " " for s in np.nan_to_num(stops, nan=0.0))
            if "ˆ" in marks:
                rows.add(Line().label("early stop").pad_to(spark_col).add(marks, "$series-dim"), 6)

        # clipping, ratios, ESS
        cv = alarms.mark(
            judge_high(pol.clip_fraction, warn=thr.clip_fraction_warning),
            value=pol.clip_fraction,
            limit=thr.clip_fraction_warning,
        )
        rmax = alarms.mark(
            judge_ratio_max(thr, pol.ratio_max),
            ("ratio_explosion",),
            value=pol.ratio_max,
            word="EXPLOSION",
            limit=thr.ratio_explosion,
        )
        rmin = alarms.mark(
            judge_ratio_min(thr, pol.ratio_min),
            ("ratio_collapse",),
            value=pol.ratio_min,
            word="COLLAPSE",
            limit=thr.ratio_collapse,
        )
        ess = alarms.mark(judge_low(pol.ess, warn=thr.ess_warning), value=pol.ess, limit=thr.ess_warning)
        verdicts += [cv.verdict, rmax.verdict, rmin.verdict, ess.verdict]
        line = Line().label("clip", L).val(pol.clip_fraction, cv, fmt=fmt_pct)
        heads_line = Line().label("", L)
        for head, value in pol.head_clip_fraction.items():
            hv = alarms.mark(
                judge_high(value, warn=thr.clip_fraction_warning),
                value=value,
                limit=thr.clip_fraction_warning,
            )
            heads_line.label(f"  {head} " if heads_line.width > L else f"{head} ").val(value, hv, fmt=fmt_pct)
        if line.width + 2 + heads_line.width - L <= width:  # the heads' shares on the same row
            line.parts += ["  ", *heads_line.parts[1:]]
            line.width += 2 + heads_line.width - L
            rows.add(line, 2)
        else:  # short of width: the heads' shares on a secondary row of their own
            rows.add(line, 2)
            if pol.head_clip_fraction:
                rows.add(heads_line, 3.5)
        line = Line().label("ratio", L).val(pol.ratio_min, rmin)
        line.label(" – ").val(pol.ratio_max, rmax)
        line.label("  ESS ").val(pol.ess, ess)
        if width >= 50:
            line.label("  std ").val(pol.ratio_std, alarms.mark(Verdict.OK, value=pol.ratio_std))
        rows.add(line, 2)

        # this update's early stop
        if pol.early_stopped:
            line = Line().label("stopped", L).add("early stop")
            line.label(" at epoch ").val(pol.early_stop_epoch).label(" KL ").val(pol.early_stop_kl)
        else:
            line = Line().label("stopped", L).label(f"no early stop ({pol.epochs} epochs)")
        rows.add(line, 3)

        line = (
            Line()
            .label("loss", L)
            .val(pol.policy_loss, alarms.mark(Verdict.OK, value=pol.policy_loss))
            .label(f"   {pol.epochs} ep × {pol.minibatches} mb")
        )
        line.label("  clip ε ").val(pol.clip_range)
        rows.add(line, 4)

        if wide:
            line = Line().label("KL k1", L).label("mean ").val(pol.kl_k1_mean)
            if pol.kl_k1_per_epoch:
                line.label(" last ").val(pol.kl_k1_per_epoch[-1])
            line.label(" max ").val(pol.kl_k1_max)
            if pol.kl_k3_per_epoch:
                line.label("  k3/epoch ").add(" ".join(fmt_num(x, 2) for x in pol.kl_k3_per_epoch))
            rows.add(line, 5)
            for head in heads:
                hmax = pol.head_ratio_max.get(head)
                hmin = pol.head_ratio_min.get(head)
                line = Line().label(f"  {head}".ljust(L + head_w))
                line.label("ratio ").val(
                    hmin, alarms.mark(judge_ratio_min(thr, hmin), ("ratio_collapse",), head=head, value=hmin)
                ).label("–")
                line.val(
                    hmax, alarms.mark(judge_ratio_max(thr, hmax), ("ratio_explosion",), head=head, value=hmax)
                )
                line.label("  KL ").val(pol.head_kl_k3.get(head))
                rows.add(line, 6)
        return verdicts

    @staticmethod
    def _gaussian(rows: Rows, view: View, width: int, head: str, head_w: int) -> list[Verdict]:
        """A continuous head: its log-std (mean judged, min and max, trend, history), differential
        entropy and the share of its actions beyond the bounds; the std and saturation alarms."""
        snap, thr, alarms = view.snap, view.thresholds, view.alarms
        assert snap is not None and snap.policy is not None and thr is not None
        pol = snap.policy
        mean, low, high = pol.log_std_mean.get(head), pol.log_std_min.get(head), pol.log_std_max.get(head)
        collapse = judge_low(low, warn=thr.std_collapse_log_std, crit=thr.std_collapse_log_std_critical)
        explode = judge_high(high, warn=thr.std_explosion_log_std, crit=thr.std_explosion_log_std_critical)
        if alarms.find(("std_explosion",), head) is not None or explode > collapse:
            kinds, word, verdict = ("std_explosion",), "EXPLOSION", explode
            limit = (
                thr.std_explosion_log_std_critical if explode == Verdict.CRIT else thr.std_explosion_log_std
            )
        else:
            kinds, word, verdict = ("std_collapse",), "COLLAPSE", collapse
            limit = (
                thr.std_collapse_log_std_critical if collapse == Verdict.CRIT else thr.std_collapse_log_std
            )
        if alarms.find(kinds, head) is not None:  # a relative drop or rise: the word, not only the colour
            verdict = max(verdict, Verdict.WARN)
        mark = alarms.mark(verdict, kinds, head=head, value=mean, word=word, limit=limit)
        line = Line().label("log-std", L).label(head.ljust(head_w)).val(mean, mark, width=6)
        if width >= 60:
            line.label(" [").val(low, alarms.mark(collapse, value=low)).label(", ")
            line.val(high, alarms.mark(explode, value=high)).label("]")
        trend = pol.log_std_trend.get(head)
        if trend is not None and width >= 44:
            line.label(" ").add("↘" if trend < 0 else "↗" if trend > 0 else "→", "$text-muted")
            line.add(f"{fmt_num(trend, 2)}/u", "$text-muted")
        line.add(" ")
        line.spark_of(view.store, f"policy.log_std_mean.{head}", width - line.width, baseline=view.baseline)
        rows.add(line, 1)
        share, worst_dim = pol.action_saturation.get(head), pol.action_saturation_max.get(head)
        sv = judge_high(worst_dim, warn=thr.action_saturation_warning, crit=thr.action_saturation_critical)
        if alarms.find(("action_saturation",), head) is not None:
            sv = max(sv, Verdict.WARN)
        sat = alarms.mark(
            sv,
            ("action_saturation",),
            head=head,
            value=worst_dim,
            word="SATURATION",
            limit=thr.action_saturation_critical if sv == Verdict.CRIT else thr.action_saturation_warning,
        )
        # the share of the worst dimension's actions beyond the bounds (pre-clip), then every dimension's
        line = Line().label("", L).label(head.ljust(head_w)).label("sat ").val(worst_dim, sat, fmt=fmt_pct)
        if width >= 56 and share is not None and len(pol.log_std_dims.get(head, ())) > 1:
            line.label(" (all ").val(share, alarms.mark(Verdict.OK, value=share), fmt=fmt_pct).label(")")
        line.label("  H ").val(pol.entropy_differential.get(head, pol.entropy.get(head))).label(" nats")
        rows.add(line, 2)
        return [mark.verdict, sat.verdict]

    def chart_spec(self, view: View) -> ChartSpec | None:
        thr = view.thresholds
        assert thr is not None
        return ChartSpec(
            "KL k3 mean",
            "policy.kl_k3_mean",
            {thr.kl_spike_warning: "spike", thr.kl_spike_critical: "critical"},
        )
