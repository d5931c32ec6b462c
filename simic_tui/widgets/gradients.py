"""Gradients panel: pre-clip norm against the cap, clip rate, non-finite counts, groups, |g| histogram, drift."""

from __future__ import annotations

import itertools
import math

from simic_tui.fmt import SPARK_BLOCKS, fmt_limit, fmt_num, fmt_pct
from simic_tui.judge import (
    Mark,
    Verdict,
    grad_total,
    judge_high,
    judge_nonfinite_count,
    max_grad_norm_of,
)
from simic_tui.widgets.base import ChartSpec, Line, Panel, Rows, View
from simic_tui.widgets.ranks import rank_rows

__all__ = ["GradientsPanel", "hist_labels"]

L = 10


def _edge(x: float) -> str:
    exp = math.log10(x)
    return f"1e{round(exp)}" if abs(exp - round(exp)) < 1e-9 else fmt_num(x, 2)


def hist_labels(edges: tuple[float, ...]) -> list[str]:
    """Names of the histogram bins: zero, below the first edge, each [edge, next), at or above the last."""
    labels = ["0", f"<{_edge(edges[0])}"]
    labels += [f"{_edge(a)}…{_edge(b)}" for a, b in itertools.pairwise(edges)]
    labels.append(f"≥{_edge(edges[-1])}")
    return labels


class GradientsPanel(Panel):
    NUMBER = 4
    TITLE = "Gradients"
    KEY = "gradients"

    def build(self, rows: Rows, view: View, width: int) -> list[Verdict]:
        snap, thr, store, alarms = view.snap, view.thresholds, view.store, view.alarms
        assert snap is not None and thr is not None
        g = snap.gradients
        verdicts: list[Verdict] = []
        if g is None:
            rows.add(Line().label("not measured at this level (OFF)"), 1)
            return verdicts
        cap = max_grad_norm_of(snap)

        grad_kinds = ("gradient_exploding", "gradient_vanishing")
        tv = alarms.mark(grad_total(thr, snap, g.total_norm), grad_kinds, value=g.total_norm)
        if tv.verdict >= Verdict.WARN and math.isfinite(g.total_norm) and cap:
            word = "EXPLODING" if g.total_norm > cap else "VANISHING"
            tv = alarms.mark(grad_total(thr, snap, g.total_norm), grad_kinds, value=g.total_norm, word=word)
        verdicts.append(tv.verdict)
        # a NaN norm reads "NaN✖" already, and the NaN/Inf line below names the alarm
        line = Line().label("pre-clip", L).val(g.total_norm, tv)
        line.label(" / cap ").val(cap)
        if cap and math.isfinite(g.total_norm):
            line.label(f" = {g.total_norm / cap:.1f}×")
        if width >= 56:
            line.label("  max ").val(
                g.total_norm_max, alarms.mark(grad_total(thr, snap, g.total_norm_max), value=g.total_norm_max)
            )
        line.add(" ")
        line.spark_of(store, "gradients.total_norm", width - line.width, baseline=view.baseline)
        rows.add(line, 1)

        nonfinite = ("numerical_instability",)
        # a count above zero is red (and named) only while numerical_instability is active
        nv = alarms.mark(
            judge_nonfinite_count(g.nan_count), nonfinite, word="NaN GRADIENTS", at_most=Verdict.OK
        )
        iv = alarms.mark(judge_nonfinite_count(g.inf_count), nonfinite, word="INF", at_most=Verdict.OK)
        nv, iv = (nv if g.nan_count else Mark(Verdict.OK)), (iv if g.inf_count else Mark(Verdict.OK))
        cr = alarms.mark(
            judge_high(g.clip_rate, warn=thr.clip_rate_warning),
            value=g.clip_rate,
            limit=thr.clip_rate_warning,
        )
        verdicts += [nv.verdict, iv.verdict, cr.verdict]
        line = Line().label("NaN/Inf", L).val(g.nan_count, nv)
        line.label(" / ").val(g.inf_count, iv)
        line.label("  clip rate ").val(g.clip_rate, cr, fmt=fmt_pct)
        rows.add(line, 1)
        verdicts += rank_rows(rows, snap, width)  # multi-rank runs only

        n_params = len(g.param_norms) or len(snap.run.param_names)
        van_v = alarms.mark(
            judge_high(
                g.vanishing_count / n_params if n_params else None, warn=thr.grad_vanishing_param_fraction
            ),
            ("gradient_vanishing",),
        )
        exp_v = alarms.mark(Verdict.OK, ("gradient_exploding",)) if g.exploding_count else Mark(Verdict.OK)
        verdicts += [van_v.verdict]
        line = Line().label("params", L).label("vanish ").val(g.vanishing_count, van_v).label(f"/{n_params}")
        line.label("  explode ").val(g.exploding_count, exp_v).label("  max|g| ").val(
            g.max_abs, alarms.mark(Verdict.OK, value=g.max_abs)
        )
        rows.add(line, 3)

        if g.group_norms:
            line = Line().label("groups", L)
            for name, norm in g.group_norms.items():
                # one field per group (a wrapped line breaks between groups, never inside one): the
                # spaces inside it are non-breaking
                line.label(f"{name}\u00a0")
                if width >= 56:
                    line.val(norm, alarms.mark(Verdict.OK, value=norm)).add("\u00a0")
                ratio = g.group_ratios.get(name)
                if ratio is not None:
                    line.label(f"×{fmt_num(ratio, 2)}")
                line.add("  ")
            rows.add(line, 2)

        if g.hist_counts:
            counts = g.hist_counts
            total = sum(counts) or 1
            top = max(counts) or 1
            labels = hist_labels(tuple(thr.grad_hist_edges))
            if len(labels) != len(counts):
                labels = [str(i) for i in range(len(counts))]
            scale = len(SPARK_BLOCKS) - 1
            chart = "".join(
                SPARK_BLOCKS[round(math.log1p(c) / math.log1p(top) * scale)] if c else " " for c in counts
            )
            peak = labels[counts.index(top)]
            line = Line().label("|g| hist", L).label("0 ").add(chart, "$series").label(f" {labels[-1]}")
            line.label(f" peak {peak}")
            rows.add(line, 2)
            bar_w = max(width - L - 14 - 6, 4)
            rank = {i: r for r, i in enumerate(sorted(range(len(counts)), key=lambda i: -counts[i]))}
            for i, (label, count) in enumerate(zip(labels, counts)):
                n = count / top * bar_w
                bar = "█" * int(n) + ("▌" if n - int(n) >= 0.5 else "")
                line = Line().label(f"  {label}".ljust(L + 12)).add(bar.ljust(bar_w), "$series")
                line.label(f" {fmt_pct(count / total)}".rjust(6))
                rows.add(line, 7 + rank[i] / 100)  # short of rows: the fullest bins stay

        dv = alarms.mark(
            judge_high(g.ema_drift, warn=thr.grad_drift) if g.ema_drift is not None else Verdict.NA,
            ("gradient_drift",),
            value=g.ema_drift,
            word="DRIFT",
        )
        verdicts.append(dv.verdict)
        line = Line().label("EMA", L).val(g.ema_total_norm).label("  drift ")
        if g.ema_drift is None:
            line.label("warming up")
        else:
            line.val(g.ema_drift, dv).label(f" (limit {fmt_limit(thr.grad_drift)})")
        if g.zero_fraction is not None:
            line.label("  zero ").val(g.zero_fraction, fmt=fmt_pct)
        rows.add(line, 3)
        return verdicts

    def chart_spec(self, view: View) -> ChartSpec | None:
        assert view.snap is not None
        cap = max_grad_norm_of(view.snap)
        return ChartSpec("pre-clip gradient norm", "gradients.total_norm", {cap: "cap"} if cap else {})
