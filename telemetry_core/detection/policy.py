"""``kl_spike``, ``ratio_explosion`` and ``ratio_collapse``: how far one update moved the policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["KLSpikeRule", "RatioCollapseRule", "RatioExplosionRule"]


def worst_head(per_head: Mapping[str, float], *, high: bool) -> str | None:
    vals = {h: v for h, x in per_head.items() if (v := finite(x)) is not None}
    if not vals:
        return None
    return max(vals, key=vals.__getitem__) if high else min(vals, key=vals.__getitem__)


class KLSpikeRule(Rule):
    """``kl_spike`` on the update's mean k3 KL (unbiased, never negative).

    Critical above ``kl_spike_critical``; warning above ``kl_spike_warning``; also a warning above
    ``kl_relative_factor`` x the median of the last ``kl_baseline_window`` updates when that is
    above ``kl_relative_floor`` too - a jump relative to how far this run usually moves, even
    below the absolute limits. Updates judged a spike stay out of the baseline.
    """

    KIND = "kl_spike"

    def reset(self) -> None:
        self.base = self.rolling("kl_baseline_window")

    def state_dict(self) -> dict[str, Any]:
        return {"kl": self.base.dump()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.base.load(state["kl"])

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        kl = finite(p.kl_k3_mean)
        if kl is None:
            return []
        base = self.base.median()
        relative = max(t.kl_relative_floor, t.kl_relative_factor * base) if base is not None else None
        early = " (the loop's target-KL early stop fired)" if p.early_stopped else ""
        if kl > t.kl_spike_critical:
            sev, limit, why = CRITICAL, t.kl_spike_critical, "far outside the trust region"
        elif kl > t.kl_spike_warning:
            sev, limit, why = WARNING, t.kl_spike_warning, "past the usual target-KL range"
        elif relative is not None and base is not None and kl > relative:
            sev, limit = WARNING, relative
            why = f"{kl / base:.1f}x its recent median {fmt(base)}" if base > 0 else "far above its recent median"
        else:
            self.base.append(kl)
            return []
        return [
            self.anomaly(
                sev,
                ctx.step,
                f"The policy moved too far in one update: mean k3 KL {fmt(kl)} is {why}{early}.",
                value=kl,
                threshold=limit,
            )
        ]


class RatioExplosionRule(Rule):
    """``ratio_explosion``: the largest joint probability ratio exceeds ``ratio_explosion``.

    Warning above the limit; critical above ``ratio_explosion_critical``. The head with the
    largest per-head ratio is named when per-head ratios are known. Stateless.
    """

    KIND = "ratio_explosion"

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        r = finite(p.ratio_max)
        if r is None or r <= t.ratio_explosion:
            return []
        critical = r > t.ratio_explosion_critical
        head = worst_head(p.head_ratio_max, high=True)
        where = f", mostly from head '{head}'" if head else ""
        return [
            self.anomaly(
                CRITICAL if critical else WARNING,
                ctx.step,
                f"Some action became {fmt(r)}x more likely than when it was sampled{where}: the policy "
                f"being optimised is far from the one that collected the rollout.",
                value=r,
                threshold=t.ratio_explosion_critical if critical else t.ratio_explosion,
                head=head,
            )
        ]


class RatioCollapseRule(Rule):
    """``ratio_collapse``: the smallest joint probability ratio falls below ``ratio_collapse``.

    Warning below the limit; critical below ``ratio_collapse_critical``. The head with the
    smallest per-head ratio is named when known. Stateless.
    """

    KIND = "ratio_collapse"

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        r = finite(p.ratio_min)
        if r is None or r >= t.ratio_collapse:
            return []
        critical = r < t.ratio_collapse_critical
        head = worst_head(p.head_ratio_min, high=False)
        where = f", mostly in head '{head}'" if head else ""
        return [
            self.anomaly(
                CRITICAL if critical else WARNING,
                ctx.step,
                f"A sampled action lost most of its probability within one update (ratio {fmt(r)}){where}.",
                value=r,
                threshold=t.ratio_collapse_critical if critical else t.ratio_collapse,
                head=head,
            )
        ]
