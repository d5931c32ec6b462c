"""``kl_spike``, ``ratio_explosion`` and ``ratio_collapse``: how far one update moved the policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from telemetry_core.config import Thresholds
from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, count, finite, fmt
from telemetry_core.schema import Anomaly, PolicyStats

__all__ = ["KLSpikeRule", "RatioCollapseRule", "RatioExplosionRule", "tail_counts"]


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


def tail_counts(p: PolicyStats, t: Thresholds) -> tuple[int, int, int, int, int] | None:
    """(samples, above, above critical, below, below critical) when the trainer counted the ratio's
    tail against these very limits; None otherwise (an older trainer, or other limits)."""
    limits = [t.ratio_explosion, t.ratio_explosion_critical, t.ratio_collapse, t.ratio_collapse_critical]
    n = count(p.samples)
    counts = (p.ratio_above, p.ratio_above_critical, p.ratio_below, p.ratio_below_critical)
    if not n or any(c is None for c in counts) or list(p.ratio_tail_limits) != limits:
        return None
    return (n, *(count(c) for c in counts))  # type: ignore[return-value]


def tail_limit(n: int, share: float, t: Thresholds, minimum: int | None = None) -> float:
    """How many of ``n`` samples may lie beyond a limit before it is more than noise."""
    return max(float(t.ratio_tail_min_samples if minimum is None else minimum), share * n)


class _RatioTailRule(Rule):
    """A ratio rule judged by the mass of samples beyond its limit, scaled by the sample count.

    With the trainer's tail counts (``PolicyStats.ratio_above`` ... against these limits):
    warning when more than ``max(ratio_tail_min_samples, ratio_tail_share x samples)`` samples lie
    beyond the warning limit; critical when more than ``max(ratio_tail_critical_min_samples,
    ratio_tail_share x samples)`` lie beyond the critical limit, or more than
    ``ratio_tail_share_critical`` x samples beyond the warning limit. The single most extreme
    sample of a large update is noise (a 16k-sample update of a healthy recurrent agent reached
    2e-4), a broken update moves a large share of them. Without the counts (an older recording)
    the extreme alone gives at most a warning. One alarm per update for the whole run (its scope
    in the registry): the head that holds most of the tail is named in the message, not made the
    alarm's scope, so a tail that moves between heads stays one alarm. Stateless.
    """

    HIGH: ClassVar[bool]

    def _limits(self) -> tuple[float, float]:
        t = self.t
        if self.HIGH:
            return t.ratio_explosion, t.ratio_explosion_critical
        return t.ratio_collapse, t.ratio_collapse_critical

    def _words(self, beyond: str, extreme: float, where: str) -> str:
        raise NotImplementedError

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        warn, crit = self._limits()
        extreme = finite(p.ratio_max if self.HIGH else p.ratio_min)
        per_head = p.head_ratio_above if self.HIGH else p.head_ratio_below
        counts = tail_counts(p, t)
        if counts is None:
            if extreme is None or not (extreme > warn if self.HIGH else extreme < warn):
                return []
            head = worst_head(p.head_ratio_max if self.HIGH else p.head_ratio_min, high=self.HIGH)
            where = f", mostly {'from' if self.HIGH else 'in'} head '{head}'" if head else ""
            return [
                self.anomaly(
                    WARNING,
                    ctx.step,
                    self._words(
                        f"at least one sample {'above' if self.HIGH else 'below'} ratio {fmt(warn)} (this "
                        f"trainer does not count how many)",
                        extreme,
                        where,
                    ),
                    value=None,  # the share beyond the limit (the value of the other form) is unknown
                    threshold=None,
                )
            ]
        n, above, above_crit, below, below_crit = counts
        beyond, beyond_crit = (above, above_crit) if self.HIGH else (below, below_crit)
        share_limit = tail_limit(n, t.ratio_tail_share, t)
        crit_limit = tail_limit(n, t.ratio_tail_share, t, t.ratio_tail_critical_min_samples)
        if beyond_crit > crit_limit:
            sev, value, limit, at = CRITICAL, beyond_crit, crit_limit, crit
        elif beyond > tail_limit(n, t.ratio_tail_share_critical, t):
            sev, value, limit, at = CRITICAL, beyond, tail_limit(n, t.ratio_tail_share_critical, t), warn
        elif beyond > share_limit:
            sev, value, limit, at = WARNING, beyond, share_limit, warn
        else:
            return []
        heads = {h: c for h, x in per_head.items() if (c := count(x))}
        head = max(heads, key=heads.__getitem__) if heads else None
        where = f", mostly {'from' if self.HIGH else 'in'} head '{head}'" if head else ""
        side = "above" if self.HIGH else "below"
        what = f"{value} of {n} samples ({value / n:.1%}, limit {limit / n:.2%}) {side} ratio {fmt(at)}"
        return [
            self.anomaly(
                sev,
                ctx.step,
                self._words(what, extreme if extreme is not None else at, where),
                value=value / n,
                threshold=limit / n,
            )
        ]


class RatioExplosionRule(_RatioTailRule):
    """``ratio_explosion``: many sampled actions became far more likely than when they were sampled
    (joint probability ratio above ``ratio_explosion``; see :class:`_RatioTailRule`)."""

    KIND = "ratio_explosion"
    HIGH = True

    def _words(self, beyond: str, extreme: float, where: str) -> str:
        return (
            f"Actions became far more likely than when they were sampled: {beyond}, the largest "
            f"{fmt(extreme)}x{where}. The policy being optimised is far from the one that collected "
            f"the rollout."
        )


class RatioCollapseRule(_RatioTailRule):
    """``ratio_collapse``: many sampled actions lost most of their probability within one update
    (joint probability ratio below ``ratio_collapse``; see :class:`_RatioTailRule`)."""

    KIND = "ratio_collapse"
    HIGH = False

    def _words(self, beyond: str, extreme: float, where: str) -> str:
        return (
            f"Sampled actions lost most of their probability within one update: {beyond}, the "
            f"smallest {fmt(extreme)}{where}."
        )
