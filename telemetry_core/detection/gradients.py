"""``gradient_exploding``, ``gradient_vanishing`` and ``gradient_drift``: the pre-clip gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, count, finite, fmt
from telemetry_core.schema import Anomaly, Snapshot

__all__ = ["GradientDriftRule", "GradientExplodingRule", "GradientVanishingRule", "clip_cap"]


def clip_cap(snapshot: Snapshot) -> float | None:
    """The loop's clipping cap: from the gradient stats, else from the run info."""
    for candidate in (
        snapshot.gradients.max_grad_norm if snapshot.gradients else None,
        snapshot.run.max_grad_norm,
    ):
        cap = finite(candidate)
        if cap is not None and cap > 0:
            return cap
    return None


class GradientExplodingRule(Rule):
    """``gradient_exploding``: the pre-clip total norm (mean over the update's backward passes).

    Critical above ``grad_total_exploding_critical_rel`` x max_grad_norm, warning above
    ``grad_total_exploding_rel`` x max_grad_norm - in both cases only when the norm is also
    ``grad_total_relative_factor`` x the median of the last ``grad_baseline_window`` updates:
    a run whose gradients always sit far above the cap (unnormalised returns) is clipped, not
    exploding; a sudden jump past the limits is. Before the baseline is known (a fresh or
    un-restored detector) only the critical limit gives a verdict, a warning: SB3's default PPO
    starts at 34-72x its cap of 0.5 and CleanRL-style agents at 11x, healthy levels that the first
    updates cannot tell from a jump. Parameters individually
    above ``grad_exploding_rel`` x max_grad_norm (``exploding_count``) are named in the message.
    Norms flagged against a known baseline stay out of it. No cap known: no verdict.
    """

    KIND = "gradient_exploding"

    def reset(self) -> None:
        self.base = self.rolling("grad_baseline_window")

    def state_dict(self) -> dict[str, Any]:
        return {"grad_norm": self.base.dump()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.base.load(state["grad_norm"])

    def check(self, ctx: Context) -> list[Anomaly]:
        g = ctx.snapshot.gradients
        if g is None:
            return []
        t = self.t
        cap = clip_cap(ctx.snapshot)
        tn = finite(g.total_norm)
        if cap is None or tn is None:
            return []
        base = self.base.median()
        jumped = base is None or tn > t.grad_total_relative_factor * base
        if jumped and base is not None and tn > t.grad_total_exploding_critical_rel * cap:
            sev, limit = CRITICAL, t.grad_total_exploding_critical_rel * cap
        elif jumped and base is not None and tn > t.grad_total_exploding_rel * cap:
            sev, limit = WARNING, t.grad_total_exploding_rel * cap
        elif base is None and tn > t.grad_total_exploding_critical_rel * cap:
            sev, limit = WARNING, t.grad_total_exploding_critical_rel * cap
        else:
            self.base.append(tn)
            return []
        if base is None:  # no baseline yet: a warning that cannot tell a level from a jump
            self.base.append(tn)
        n_exp = count(g.exploding_count)
        parts = [f"Pre-clip gradient norm {fmt(tn)} is {tn / cap:.0f}x max_grad_norm {fmt(cap)}"]
        if base is not None and base > 0:
            parts.append(f"{tn / base:.0f}x its recent median {fmt(base)}")
        if n_exp:
            parts.append(f"{n_exp} parameter tensor(s) individually above {fmt(t.grad_exploding_rel * cap)}")
        return [self.anomaly(sev, ctx.step, "; ".join(parts) + ".", value=tn, threshold=limit)]


class GradientVanishingRule(Rule):
    """``gradient_vanishing``: nothing (or little) is learning.

    Critical when the pre-clip total norm is below ``grad_total_vanishing_rel`` x max_grad_norm
    (the loss no longer reaches the weights). Warning when more than
    ``grad_vanishing_param_fraction`` of the parameter tensors are individually below
    ``grad_vanishing_rel`` x max_grad_norm (NORMAL: needs ``vanishing_count`` and the parameter
    list of ``run.param_names`` or ``param_norms``). Stateless.
    """

    KIND = "gradient_vanishing"

    def check(self, ctx: Context) -> list[Anomaly]:
        snap = ctx.snapshot
        g = snap.gradients
        cap = clip_cap(snap)
        if g is None or cap is None:
            return []
        t = self.t
        tn = finite(g.total_norm)
        if tn is not None and count(g.calls) and tn < t.grad_total_vanishing_rel * cap:
            return [
                self.anomaly(
                    CRITICAL,
                    ctx.step,
                    f"Pre-clip gradient norm {fmt(tn)} is below {fmt(t.grad_total_vanishing_rel)}x "
                    f"max_grad_norm: the loss barely reaches the weights.",
                    value=tn,
                    threshold=t.grad_total_vanishing_rel * cap,
                )
            ]
        n_params = len(snap.run.param_names) or len(g.param_norms)
        n_van = count(g.vanishing_count)
        if n_params and n_van / n_params > t.grad_vanishing_param_fraction:
            frac = n_van / n_params
            return [
                self.anomaly(
                    WARNING,
                    ctx.step,
                    f"{n_van} of {n_params} parameter tensors ({frac:.0%}) have gradient norms below "
                    f"{fmt(t.grad_vanishing_rel * cap)}: most of the network is not learning.",
                    value=frac,
                    threshold=t.grad_vanishing_param_fraction,
                )
            ]
        return []


class GradientDriftRule(Rule):
    """``gradient_drift`` (warning): the pre-clip norm's relative distance from its EMA,
    ``|x - ema| / ema``, above ``grad_drift`` for ``grad_drift_patience`` consecutive updates.
    ``ema_drift`` is None during the tracker's warm-up: no verdict, count reset.
    """

    KIND = "gradient_drift"

    def reset(self) -> None:
        self.above = 0

    def state_dict(self) -> dict[str, Any]:
        return {"above": self.above}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.above = int(state["above"])

    def check(self, ctx: Context) -> list[Anomaly]:
        g = ctx.snapshot.gradients
        if g is None:
            return []
        t = self.t
        drift = finite(g.ema_drift)
        if drift is None:
            if g.ema_drift is None:
                self.above = 0
            return []
        self.above = self.above + 1 if drift > t.grad_drift else 0
        if self.above < t.grad_drift_patience:
            return []
        ema = finite(g.ema_total_norm)
        ref = f" (EMA {fmt(ema)})" if ema is not None else ""
        return [
            self.anomaly(
                WARNING,
                ctx.step,
                f"Gradient norm has stayed {drift:.0%} away from its long-run average{ref} for "
                f"{self.above} updates.",
                value=drift,
                threshold=t.grad_drift,
            )
        ]
