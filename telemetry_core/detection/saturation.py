"""``action_saturation``: a continuous head's actions pinned beyond their bounds."""

from __future__ import annotations

from telemetry_core.detection.base import CRITICAL, WARNING, Context, HeadBaselineRule, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["ActionSaturationRule"]


class ActionSaturationRule(HeadBaselineRule):
    """``action_saturation`` per continuous head, on the share of its worst dimension's actions that
    lie beyond the action bounds before clipping (``|tanh| > 0.99`` for a squashed head).

    Beyond the bound the environment clips: every such sample acts the same, so the policy gradient
    no longer reaches the mean through it and the log-prob of the clipped action misstates what was
    done. Healthy control can ride its bounds (bang-bang torque) and a wide Gaussian spills over
    them, so the share alone is not a verdict: it must be above ``action_saturation_warning`` *and*
    more than ``action_saturation_jump`` above the median of the head's recent unflagged updates
    (warning), or above ``action_saturation_critical`` and that far above the median (critical).
    Until ``baseline_min_updates`` are known only the critical share gives a warning.
    """

    KIND = "action_saturation"
    BASELINE_WINDOW = "action_saturation_baseline_window"

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        out: list[Anomaly] = []
        for head in sorted(p.action_saturation_max):
            share = finite(p.action_saturation_max.get(head))
            if share is None:
                continue
            overall = finite(p.action_saturation.get(head))
            base_roll = self._base(head)
            base = base_roll.median()
            severity: str | None = None
            limit = t.action_saturation_warning
            if base is None:
                if share > t.action_saturation_critical:
                    severity, limit = WARNING, t.action_saturation_critical
            elif share > base + t.action_saturation_jump:
                if share > t.action_saturation_critical:
                    severity, limit = CRITICAL, t.action_saturation_critical
                elif share > t.action_saturation_warning:
                    severity = WARNING
            if severity is None:
                base_roll.append(share)
                continue
            was = f" (recent median {share_text(base)})" if base is not None else ""
            every = f", {share_text(overall)} of all its action values" if overall is not None else ""
            out.append(
                self.anomaly(
                    severity,
                    ctx.step,
                    f"Head '{head}' is saturating: {share_text(share)} of its worst dimension's actions lie "
                    f"beyond the action bounds before clipping{was}{every}; clipped actions carry no "
                    f"gradient to the mean.",
                    value=share,
                    threshold=limit,
                    head=head,
                )
            )
        return out


def share_text(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 or x == 0 else fmt(x)
