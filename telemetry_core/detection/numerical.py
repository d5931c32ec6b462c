"""``numerical_instability``: any measured value of the update is NaN or inf."""

from __future__ import annotations

from telemetry_core.detection.base import CRITICAL, Context, Rule, count, isinf, names, nonfinite
from telemetry_core.schema import Anomaly

__all__ = ["NumericalRule"]


class NumericalRule(Rule):
    """``numerical_instability`` (always critical): any measured value is NaN or inf.

    Counted: NaN/inf gradient elements; a NaN/inf pre-clip norm or max |g| when gradients were
    observed (``calls > 0``); NaN/inf log-ratios, or NaN/inf ratio/KL when minibatches were
    observed; a NaN/inf entropy; a NaN/inf explained variance; inf anywhere in the value
    statistics (their NaN defaults mean "not measured", so only inf is unambiguous); NaN/inf
    advantage or return moments when samples were counted; NaN/inf in the LSTM state;
    non-finite weights, gradients or losses named by the DEBUG numerical report; non-finite
    episode returns. Nothing else fires on such an update: the other rules treat non-finite
    values as "no verdict" (and keep them out of their baselines). Stateless.
    """

    KIND = "numerical_instability"

    def check(self, ctx: Context) -> list[Anomaly]:
        snap = ctx.snapshot
        reasons: list[str] = []
        bad = 0
        g = snap.gradients
        if g is not None:
            nan, inf = count(g.nan_count), count(g.inf_count)
            if nan or inf:
                bad += nan + inf
                where = g.nonfinite_params
                # Named at the update the failure starts, at NORMAL: by the next update every tensor
                # downstream of the first bad step holds NaN and the origin is lost.
                at = f" in {names(where, 4)}" if where else ""
                reasons.append(f"{nan} NaN and {inf} inf gradient elements{at}")
            elif count(g.calls) and any(nonfinite(x) for x in (g.total_norm, g.total_norm_max, g.max_abs)):
                reasons.append("the pre-clip gradient norm is not finite")
        p = snap.policy
        if p is not None:
            n_lr = count(p.logratio_nan) + count(p.logratio_inf)
            fields = ("ratio_mean", "ratio_max", "ratio_min", "kl_k3_mean", "kl_k1_mean")
            if n_lr:
                reasons.append(f"{n_lr} samples have a NaN/inf log-probability ratio")
            elif count(p.minibatches) and any(nonfinite(getattr(p, n)) for n in fields):
                reasons.append("probability ratios or KL are not finite")
            if isinf(p.policy_loss):
                reasons.append("the policy loss is infinite")
            heads = sorted(h for h, e in {**p.entropy, **p.entropy_normalized}.items() if nonfinite(e))
            if heads:
                reasons.append(f"entropy of {names(heads)} is not finite")
        v = snap.value
        if v is not None:
            if nonfinite(v.explained_variance):
                reasons.append("explained variance is not finite (NaN values or returns)")
            fields = ("value_loss", "value_loss_max", "value_mean", "value_std", "value_min", "value_max")
            if any(isinf(getattr(v, n)) for n in fields):
                reasons.append("value predictions or the value loss are infinite")
        a = snap.advantage
        if a is not None:
            if count(a.raw.count) and any(nonfinite(x) for x in (a.raw.mean, a.raw.std)):
                reasons.append("advantages are not finite")
            if count(a.returns.count) and any(nonfinite(x) for x in (a.returns.mean, a.returns.std)):
                reasons.append("returns are not finite")
        lstm = snap.lstm
        if lstm is not None:
            n = sum(count(x) for x in (lstm.h_nan, lstm.h_inf, lstm.c_nan, lstm.c_inf))
            if n:
                reasons.append(f"the LSTM state holds {n} NaN/inf values")
            elif isinf(lstm.h_norm) or isinf(lstm.c_norm):
                reasons.append("the LSTM state norm is infinite")
        d = snap.debug
        if d is not None:
            report = d.numerical
            if report.nonfinite_weights:
                reasons.append(f"non-finite weights in {names(report.nonfinite_weights)}")
            if report.nonfinite_grads:
                reasons.append(f"non-finite gradients in {names(report.nonfinite_grads)}")
            if report.loss_finite is False or count(report.nonfinite_losses):
                reasons.append("the loss is not finite")
        e = snap.episodes
        if e is not None and count(e.count) and nonfinite(e.return_mean):
            reasons.append("episode returns are not finite (NaN/inf rewards)")
        if not reasons:
            return []
        return [
            self.anomaly(
                CRITICAL,
                ctx.step,
                "Non-finite numbers in this update: " + "; ".join(reasons) + ".",
                value=float(bad) if bad else None,
                threshold=0.0,
            )
        ]
