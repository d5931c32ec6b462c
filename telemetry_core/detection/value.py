"""``value_collapse`` and ``ev_low``: the critic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry_core.config import Phase
from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, count, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["EVLowRule", "ValueCollapseRule"]

IDR_PER_SIGMA = 2.5631  # p90 - p10 of a normal distribution, in standard deviations


class ValueCollapseRule(Rule):
    """``value_collapse``: the critic stopped tracking returns.

    Constant critic: after warm-up, std(values) / std(returns) below
    ``value_std_collapse_ratio`` while the returns vary (std above ``value_returns_std_min``),
    *and* std(values) below ``value_std_drop_fraction`` x its median over the last
    ``value_baseline_window`` updates, a median that was itself at least
    ``value_std_tracking_min`` x std(returns) - the critic tracked the returns and its spread
    collapsed (a reset or zeroed output layer, dead units). Critical. The drop condition
    matters: once a task is solved nearly every return is the same, rare failures inflate
    std(returns), and a critic that rightly predicts one value would otherwise look collapsed.
    The tracking condition too: a critic that never spread its predictions (an agent that has
    learnt nothing, every episode alike) has nothing to collapse from - unless its output became
    one constant: std(values) at or below ``value_std_constant_fraction`` x that median (a zeroed
    output layer gives exactly 0) is critical whatever the median was, since even a critic that
    learnt little moves its spread by a few times at most from update to update. Without a
    baseline there is no verdict (a fresh critic is flat; a critic zeroed before a restore shows as
    ev_low), and none in warm-up. Return std comes from ``ValueStats.return_std``, else from the advantage
    section's returns. A constant output is critical at once; a flat critic that still spreads its
    predictions a little is a warning, critical once it stays flat ``value_collapse_critical_updates``
    updates in a row (a healthy feed-forward critic on unnormalised returns dipped to 0.02x the
    return std for one update and recovered).

    Blown critic (warning): the value loss exceeds ``value_loss_relative_factor`` x its median
    over the last ``value_baseline_window`` updates and, when the return std is known, the
    returns' variance (worse than predicting their mean under either loss convention).

    Values flagged against a known baseline stay out of it.
    """

    KIND = "value_collapse"

    def reset(self) -> None:
        self.loss_base = self.rolling("value_baseline_window")
        self.std_base = self.rolling("value_baseline_window")
        self.flat = 0  # consecutive updates judged flat

    def state_dict(self) -> dict[str, Any]:
        return {"value_loss": self.loss_base.dump(), "value_std": self.std_base.dump(), "flat": self.flat}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_base.load(state["value_loss"])
        self.std_base.load(state["value_std"])
        self.flat = int(state.get("flat", 0))  # absent in a state saved before the patience

    def check(self, ctx: Context) -> list[Anomaly]:
        t = self.t
        snap, step = ctx.snapshot, ctx.step
        v = snap.value
        if v is None:
            return []
        vstd = finite(v.value_std)
        rstd = finite(v.return_std)
        if rstd is None and snap.advantage is not None and count(snap.advantage.returns.count):
            rstd = finite(snap.advantage.returns.std)
        found: Anomaly | None = None
        if vstd is not None:
            base = self.std_base.median()
            flat = (
                ctx.phase is not Phase.WARMUP
                and base is not None
                and rstd is not None
                and rstd > t.value_returns_std_min
                and vstd / rstd < t.value_std_collapse_ratio
                and vstd < t.value_std_drop_fraction * base
                and (base >= t.value_std_tracking_min * rstd or vstd <= t.value_std_constant_fraction * base)
            )
            self.flat = self.flat + 1 if flat else 0
            if flat and rstd is not None and base is not None:
                ratio = vstd / rstd
                constant = vstd <= t.value_std_constant_fraction * base
                found = self.anomaly(
                    CRITICAL if constant or self.flat >= t.value_collapse_critical_updates else WARNING,
                    step,
                    f"The critic predicts almost a constant: value std {fmt(vstd)} (recent median "
                    f"{fmt(base)}) is {fmt(ratio)}x the return std {fmt(rstd)}, so advantages are raw returns.",
                    value=ratio,
                    threshold=t.value_std_collapse_ratio,
                )
            else:
                self.std_base.append(vstd)
        loss = finite(v.value_loss)
        if loss is None:
            return [found] if found else []
        base = self.loss_base.median()
        if (
            base is not None
            and base > 0
            and loss > t.value_loss_relative_factor * base
            and (rstd is None or loss > rstd * rstd)
        ):
            return [
                found
                or self.anomaly(
                    WARNING,
                    step,
                    f"Value loss jumped to {fmt(loss)}, {loss / base:.0f}x its recent median "
                    f"{fmt(base)}: the critic no longer fits the returns.",
                    value=loss,
                    threshold=t.value_loss_relative_factor * base,
                )
            ]
        self.loss_base.append(loss)
        return [found] if found else []


class EVLowRule(Rule):
    """``ev_low`` (warning): explained variance below the phase's limit for ``ev_patience`` updates.

    Limits by phase (warm-up / early / mid / late, ``config.phase_of``): a young critic may be
    worse than a constant, a late one must be useful. An undefined EV (None: the returns have
    zero variance) is not low and resets the count, and so does EV of nearly constant returns
    (their spread below ``ev_return_cv_min`` x |mean|, from the advantage section's returns: a
    solved task's critic is accurate to a few hundredths and still scores EV -3). The spread is the
    smaller of the std and the normal-equivalent sigma of the inter-decile range (p90 - p10) / 2.563
    when the percentiles are measured (NORMAL): when nearly every return is the same and a rare
    failed episode alone makes the std, the critic cannot predict that failure and EV near 0 says
    nothing about it. NaN holds the count. When the
    updates of a streak were judged against different phases' limits, the message names each.
    """

    KIND = "ev_low"

    def reset(self) -> None:
        self.below = 0
        self.phases: list[str] = []  # the phases of the current streak, each once, in order

    def state_dict(self) -> dict[str, Any]:
        return {"below": self.below, "phases": list(self.phases)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.below = int(state["below"])
        self.phases = [Phase(p).value for p in state["phases"]]

    def check(self, ctx: Context) -> list[Anomaly]:
        t = self.t
        snap = ctx.snapshot
        v = snap.value
        if v is None:
            return []
        if v.explained_variance is None:
            self.below, self.phases = 0, []
            return []
        ev = finite(v.explained_variance)
        if ev is None:
            return []
        r = snap.advantage.returns if snap.advantage is not None else None
        if r is not None and count(r.count):
            rmean, rstd = finite(r.mean), finite(r.std)
            p10, p90 = finite(r.p10), finite(r.p90)
            if rstd is not None and p10 is not None and p90 is not None:
                # the bulk's spread: a few outliers (a solved task's rare failed episode) inflate std
                rstd = min(rstd, (p90 - p10) / IDR_PER_SIGMA)
            if rmean is not None and rstd is not None and rstd < t.ev_return_cv_min * abs(rmean):
                self.below, self.phases = 0, []  # nearly constant returns: EV is noise, as undefined
                return []
        limit = t.ev_limit(ctx.phase)
        if ev < limit:
            self.below += 1
            if ctx.phase.value not in self.phases:
                self.phases.append(ctx.phase.value)
        else:
            self.below, self.phases = 0, []
        if self.below < t.ev_patience:
            return []
        if len(self.phases) > 1:
            limits = ", ".join(f"{fmt(t.ev_limit(Phase(p)))} ({p})" for p in self.phases)
            since = f"below its phase's limit for {self.below} updates (limits {limits})"
        else:
            since = f"below {fmt(limit)} (the {ctx.phase.value} limit) for {self.below} updates"
        return [
            self.anomaly(
                WARNING,
                ctx.step,
                f"The critic explains too little of the returns: explained variance {fmt(ev)} has been "
                f"{since}.",
                value=ev,
                threshold=limit,
            )
        ]
