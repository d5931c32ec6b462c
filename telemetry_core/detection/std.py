"""``std_collapse`` and ``std_explosion``: a continuous head's log standard deviation.

A Gaussian head has no normalised entropy (its differential entropy has no maximum and shifts with
the action scale), so these rules judge the log-std itself, in nats: its level against absolute
floors and ceilings, and its change against the head's own recent median. Both keep, per head, the
median of its last ``std_baseline_window`` unflagged updates; a flagged update stays out of it, so a
sustained pathology stays flagged instead of becoming the new normal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from telemetry_core.detection.base import CRITICAL, WARNING, Context, HeadBaselineRule, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["StdCollapseRule", "StdExplosionRule"]

Found = tuple[str, float, float, str]  # severity, value, limit, words


class _StdRule(HeadBaselineRule):
    """Per-head baselines of the mean log-std, and the tiers both rules judge in the same order:
    the extreme dimension beyond the critical level, the mean beyond the critical change against
    the baseline, then the same two at warning level. ``sign`` is -1 for a fall (collapse), +1 for
    a rise (explosion); every limit is a positive distance in that direction."""

    BASELINE_WINDOW = "std_baseline_window"

    def reset(self) -> None:
        super().reset()
        self.last: dict[str, float] = {}
        self.falls: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last": dict(self.last), "falls": dict(self.falls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.last = {str(k): float(v) for k, v in state["last"].items()}
        self.falls = {str(k): int(v) for k, v in state["falls"].items()}

    EXTREME: ClassVar[str] = ""  # the PolicyStats field of the dimension judged against the levels
    WORDS: ClassVar[tuple[str, str]] = ("", "")  # "std is <0>: its log-std (mean, <extreme>) ...; <1>"

    def _judge(self, head: str, mean: float, extreme: float, base: float | None) -> Found | None:
        raise NotImplementedError

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        out: list[Anomaly] = []
        extremes = getattr(p, self.EXTREME)
        for head in sorted(p.log_std_mean):
            mean = finite(p.log_std_mean.get(head))
            if mean is None:
                continue
            extreme = finite(extremes.get(head))
            extreme = mean if extreme is None else extreme
            base_roll = self._base(head)
            found = self._judge(head, mean, extreme, base_roll.median())
            if found is None:
                base_roll.append(mean)
                continue
            severity, value, limit, words = found
            state, tail = self.WORDS
            side = self.EXTREME.removeprefix("log_std_")
            out.append(
                self.anomaly(
                    severity,
                    ctx.step,
                    f"Head '{head}' std is {state}: its log-std (mean {fmt(mean)}, {side} {fmt(extreme)}) "
                    f"{words}; {tail}",
                    value=value,
                    threshold=limit,
                    head=head,
                )
            )
        return out

    @staticmethod
    def _tiers(
        sign: int,
        extreme: float,
        mean: float,
        base: float | None,
        levels: tuple[float, float],  # (warning, critical) log-std the extreme must not pass
        changes: tuple[float, float],  # (warning, critical) change of the mean against the baseline
        words: tuple[str, str],  # (warning, critical) words for the level
        moved: str,  # "lost" / "rose"
        against: str,  # "against" / "above"
    ) -> Found | None:
        change = sign * (mean - base) if base is not None else None
        shift = f"{moved} {{}} nats (std x{{}}) {against} its recent median {fmt(base) if base is not None else ''}"
        for i, severity in ((1, CRITICAL), (0, WARNING)):
            if sign * (extreme - levels[i]) > 0:
                return severity, extreme, levels[i], f"is {'below' if sign < 0 else 'above'} {fmt(levels[i])}: {words[i]}"
            if change is not None and base is not None and change > changes[i]:
                return severity, mean, base + sign * changes[i], shift.format(fmt(change), _ratio(-sign * change))
        return None


class StdCollapseRule(_StdRule):
    """``std_collapse`` per continuous head, on its log-std (nats).

    * Floor: the smallest log-std (any dimension) below ``std_collapse_log_std`` is a warning,
      below ``std_collapse_log_std_critical`` critical: the head samples (almost) its mean only.
    * Drop: the mean log-std more than ``std_drop`` below the median of its recent unflagged updates
      (once ``baseline_min_updates`` are known) is a warning, more than ``std_drop_critical`` below
      it critical: the head lost most of its spread in a few updates (a log-std forced down, a
      wrong-sign entropy term that has run for a while).
    * Slide: the mean log-std fell by more than ``std_fall_step`` in each of the last
      ``std_fall_updates`` updates and is more than ``std_slide_drop`` below that median: a
      sustained push on the log-std, which healthy learning makes only in noisy steps (warning).

    A missing or NaN log-std holds the head's state (no verdict; NaN is numerical_instability).
    """

    KIND = "std_collapse"
    EXTREME = "log_std_min"
    WORDS = ("collapsing", "it is running out of exploration.")

    def _judge(self, head: str, mean: float, extreme: float, base: float | None) -> Found | None:
        t = self.t
        last = self.last.get(head)
        falls = self.falls.get(head, 0) + 1 if last is not None and mean < last - t.std_fall_step else 0
        self.last[head], self.falls[head] = mean, falls
        found = self._tiers(
            -1,
            extreme,
            mean,
            base,
            (t.std_collapse_log_std, t.std_collapse_log_std_critical),
            (t.std_drop, t.std_drop_critical),
            ("nearly deterministic", "essentially deterministic"),
            "lost",
            "against",
        )
        if found is None and base is not None and falls >= t.std_fall_updates and base - mean > t.std_slide_drop:
            found = (
                WARNING,
                mean,
                base - t.std_slide_drop,
                f"fell for {falls} updates in a row, {fmt(base - mean)} nats below its recent median {fmt(base)}",
            )
        return found


class StdExplosionRule(_StdRule):
    """``std_explosion`` per continuous head, on its log-std (nats).

    * Ceiling: the largest log-std above ``std_explosion_log_std`` is a warning, above
      ``std_explosion_log_std_critical`` critical: the head's samples are noise far wider than any
      usual action range, and the clipped actions carry no signal.
    * Rise: the mean log-std more than ``std_rise`` above the median of its recent unflagged
      updates is a warning, more than ``std_rise_critical`` above it critical (an entropy
      coefficient far too large, a log-std forced up, a diverging std head).
    """

    KIND = "std_explosion"
    EXTREME = "log_std_max"
    WORDS = ("exploding", "its actions are mostly noise.")

    def _judge(self, head: str, mean: float, extreme: float, base: float | None) -> Found | None:
        t = self.t
        return self._tiers(
            1,
            extreme,
            mean,
            base,
            (t.std_explosion_log_std, t.std_explosion_log_std_critical),
            (t.std_rise, t.std_rise_critical),
            ("wider than a usual action range", "far wider than any action range"),
            "rose",
            "above",
        )


def _ratio(drop: float) -> str:
    """The std factor of a log-std change of ``-drop`` nats, e.g. ``0.14`` or ``20``."""
    return fmt(math.exp(-drop))
