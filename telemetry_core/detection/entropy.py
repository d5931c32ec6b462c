"""``entropy_collapse``: per head, on entropy normalised by log(number of actions)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, finite, fmt
from telemetry_core.schema import Anomaly, PolicyStats

__all__ = ["EntropyCollapseRule", "head_entropies"]

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normally distributed values


def head_entropies(p: PolicyStats, n_actions: Mapping[str, int]) -> dict[str, float | None]:
    """Normalised entropy per head: the reported one, else raw / log(actions) when known."""
    out: dict[str, float | None] = {}
    for head in sorted(set(p.entropy_normalized) | set(p.entropy)):
        value = finite(p.entropy_normalized.get(head))
        if value is None and head not in p.entropy_normalized:
            n = n_actions.get(head)
            raw = finite(p.entropy.get(head))
            if raw is not None and isinstance(n, int) and n > 1:
                value = raw / math.log(n)
        out[head] = value
    return out


class EntropyCollapseRule(Rule):
    """``entropy_collapse`` per head, on entropy normalised by log(number of actions).

    Collapsed (latched, with hysteresis): a head whose normalised entropy stays below its limit
    (``entropy_limit(head)``) for ``entropy_patience`` consecutive updates collapses, and stays
    collapsed - reported every update, so the dashboard shows it as active - until its entropy
    rises above ``entropy_clear_factor`` x limit. Critical while below
    ``entropy_critical_fraction`` x limit (deterministic: an entropy bonus of the right sign
    does not allow that), warning otherwise (a healthy run may end with a nearly decided head).

    Collapsing (warning, not latched), for a head not yet collapsed, against the median of its
    last ``entropy_baseline_window`` unflagged updates (once ``baseline_min_updates`` are known):

    * falling fast: its entropy fell by more than ``entropy_fall_step`` (a fraction of the previous
      update's value) in each of the last ``entropy_fall_updates`` updates and is now below
      ``entropy_fall_fraction`` x that median - a sustained slide, not one or two noisy dips;
    * pushed down: it fell by more than ``entropy_throttled_fall_step`` in each of the last
      ``entropy_fall_updates`` updates, the loop's target-KL early stop cut every one of them
      short, and it is below ``entropy_throttled_fall_fraction`` x that median - the optimiser
      spends the whole trust region on sharpening the policy, update after update;
    * dropped: it is below ``entropy_drop_fraction`` x that median, however it got there;
    * sliding against its own spread: it fell in each of the last ``entropy_spread_updates`` (or
      more) updates, and the fall since the slide began, less the head's recent trend (the median
      of its update-to-update changes, when falling), exceeds both ``entropy_spread_k`` robust
      sigmas of those changes x sqrt(updates) and ``entropy_spread_min_fraction`` of that median.
      A head that learns smoothly (a feed-forward agent's) has a small spread, so a wrong-sign
      coefficient stands out within two updates; a head that learns in noisy bursts (the demo's)
      has a large one, so its bursts do not.

    * sharpened within the update: from the update's first epoch to its last (every epoch sees the
      same rollout, so the change is what the update itself did, free of the rollout's noise) the
      head lost more than ``entropy_sharpen_fraction`` of its entropy, and that change lies more than
      ``entropy_sharpen_k`` robust sigmas below the median of its changes over the rolling baseline.
      A wrong-sign entropy coefficient makes every update sharpen the policy as far as the optimiser
      allows (-7% to -10% per update on feed-forward Acrobot heads whose update-to-update entropy
      moves +-5% while they learn, where the slide rules need four updates or more); healthy heads
      change by a few percent within an update. Needs two or more epochs per update.

    The loss's own sign: a loop that reports its entropy coefficient (``PolicyStats.entropy_coef``)
    below ``entropy_coef_min`` is told at once, critical, for the whole run - the loss rewards
    determinism, and near the uniform policy the entropy's gradient vanishes, so the heads may not
    move measurably for two or three updates (Acrobot, feed-forward, no target KL); while it is,
    every head alarm above is critical.

    A fast, sustained slide is critical before it bottoms out: a head flagged (collapsing or
    collapsed) for at least ``entropy_slide_critical_updates`` and at most
    ``entropy_slide_critical_window`` updates in a row that is below
    ``entropy_slide_critical_fraction`` x that median (the median of the updates before the slide,
    since flagged updates stay out of it) lost most of its entropy within a few updates and kept
    losing it - a wrong-sign entropy coefficient; so is a head sharpening within the update
    ``entropy_sharpen_critical_updates`` updates in a row. It stays critical until the head's alarm
    ends. (A head sliding against its own spread alone stays a warning: a feed-forward head's first
    learning slide from 0.98 falls beyond its quiet warm-up spread five updates in a row.) A
    head that decides slowly (a converged feed-forward agent's head below the limit for hundreds of
    updates, drifting from 0.1 to 0.06) never loses that much within the window.

    Healthy PPO lowers entropy slowly and noisily: a head can lose a third of its entropy in
    two or three updates while it learns, then it rises again, and the target-KL stop fires in
    about one update in eight, in short bursts. A wrong-sign entropy coefficient makes every
    update sharpen the policy as far as the trust region allows: the stop fires every update
    (the trust region is what slows the collapse, to 5-40% per update) and the entropy keeps
    falling, so one of the slide rules fires two to three updates after onset, long before the
    absolute limit (calibration: ``benchmarks/detection_matrix.py``).

    A missing or NaN entropy holds the head's state (no verdict; NaN is numerical_instability).
    """

    KIND = "entropy_collapse"

    def reset(self) -> None:
        self.below: dict[str, int] = {}
        self.collapsed: dict[str, bool] = {}
        self.hist: dict[str, deque[float]] = {}
        self.last: dict[str, float] = {}
        self.falls: dict[str, int] = {}
        self.throttled: dict[str, int] = {}
        self.flagged: dict[str, int] = {}  # consecutive updates with an alarm, per head
        self.slid: dict[str, bool] = {}  # the current alarm became a fast slide (critical)
        self.down: dict[str, int] = {}  # consecutive updates whose entropy fell, per head
        self.top: dict[str, float] = {}  # the entropy before the first of those falls
        self.sharp_hist: dict[str, deque[float]] = {}  # within-update relative changes, unflagged updates
        self.sharp: dict[str, int] = {}  # consecutive updates sharpening, per head

    def state_dict(self) -> dict[str, Any]:
        return {
            "below": dict(self.below),
            "collapsed": dict(self.collapsed),
            "hist": {h: list(d) for h, d in self.hist.items()},
            "last": dict(self.last),
            "falls": dict(self.falls),
            "throttled": dict(self.throttled),
            "flagged": dict(self.flagged),
            "slid": dict(self.slid),
            "down": dict(self.down),
            "top": dict(self.top),
            "sharp_hist": {h: list(d) for h, d in self.sharp_hist.items()},
            "sharp": dict(self.sharp),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.below = {str(k): int(v) for k, v in state["below"].items()}
        self.collapsed = {str(k): bool(v) for k, v in state["collapsed"].items()}
        for head, values in state["hist"].items():
            self._hist(str(head)).extend(float(v) for v in values)
        self.last = {str(k): float(v) for k, v in state["last"].items()}
        self.falls = {str(k): int(v) for k, v in state["falls"].items()}
        self.throttled = {str(k): int(v) for k, v in state["throttled"].items()}
        self.flagged = {str(k): int(v) for k, v in state["flagged"].items()}
        self.slid = {str(k): bool(v) for k, v in state["slid"].items()}
        # absent in a state saved before the spread rule: no slide in progress
        self.down = {str(k): int(v) for k, v in state.get("down", {}).items()}
        self.top = {str(k): float(v) for k, v in state.get("top", {}).items()}
        # absent in a state saved before the within-update rule: nothing sharpened yet
        for head, values in state.get("sharp_hist", {}).items():
            self._sharp_hist(str(head)).extend(float(v) for v in values)
        self.sharp = {str(k): int(v) for k, v in state.get("sharp", {}).items()}

    def _hist(self, head: str) -> deque[float]:
        hist = self.hist.get(head)
        if hist is None:
            hist = self.hist[head] = deque(maxlen=max(1, self.t.entropy_baseline_window))
        return hist

    def _sharp_hist(self, head: str) -> deque[float]:
        hist = self.sharp_hist.get(head)
        if hist is None:
            hist = self.sharp_hist[head] = deque(maxlen=max(1, self.t.entropy_sharpen_window))
        return hist

    def _sharpened(self, head: str, epochs: list[float] | None) -> tuple[float, float, float, float] | None:
        """(relative change, allowed change, first epoch's entropy, last epoch's) when the head
        sharpened within this update beyond both limits; else None. Records an unflagged change."""
        if not epochs or len(epochs) < 2:
            return None
        first, last = finite(epochs[0]), finite(epochs[-1])
        if first is None or last is None or first <= 0:
            return None
        t = self.t
        change = (last - first) / first
        hist = self._sharp_hist(head)
        if len(hist) >= max(3, t.baseline_min_updates):
            centre = statistics.median(hist)
            sigma = MAD_SCALE * statistics.median(abs(d - centre) for d in hist)
            allowed = min(-t.entropy_sharpen_fraction, centre - t.entropy_sharpen_k * sigma)
            if change < allowed:
                return change, allowed, first, last
        hist.append(change)
        return None

    @staticmethod
    def _spread(hist: deque[float]) -> tuple[float, float] | None:
        """(median, robust sigma) of the head's update-to-update changes over its baseline."""
        if len(hist) < 3:
            return None
        steps = [b - a for a, b in itertools.pairwise(hist)]
        centre = statistics.median(steps)
        return centre, MAD_SCALE * statistics.median(abs(d - centre) for d in steps)

    def _spread_slide(self, head: str, e: float, base: float, hist: deque[float]) -> float | None:
        """The entropy level the head had to fall below for the spread rule, when it did; else None."""
        t = self.t
        down = self.down.get(head, 0)
        top = self.top.get(head)
        spread = self._spread(hist)
        if down < t.entropy_spread_updates or top is None or spread is None:
            return None
        centre, sigma = spread
        expected = top + down * min(centre, 0.0)  # a head that was already declining keeps its pace
        margin = max(t.entropy_spread_k * sigma * math.sqrt(down), t.entropy_spread_min_fraction * base)
        level = expected - margin
        return level if e < level else None

    def check(self, ctx: Context) -> list[Anomaly]:
        p = ctx.snapshot.policy
        if p is None:
            return []
        t = self.t
        step = ctx.step
        out: list[Anomaly] = []
        coef = finite(p.entropy_coef) if p.entropy_coef is not None else None
        wrong_sign = coef is not None and coef < t.entropy_coef_min
        if wrong_sign and coef is not None:
            out.append(
                self.anomaly(
                    CRITICAL,
                    step,
                    f"The entropy coefficient is {fmt(coef)}, below {fmt(t.entropy_coef_min)}: the loss rewards "
                    f"determinism, so every update will sharpen the policy until it stops exploring.",
                    value=coef,
                    threshold=t.entropy_coef_min,
                )
            )
        for head, e in head_entropies(p, ctx.heads).items():
            if e is None:
                continue
            limit = t.entropy_limit(head)
            below = self.below.get(head, 0) + 1 if e < limit else 0
            collapsed = self.collapsed.get(head, False)
            if not collapsed and below >= t.entropy_patience:
                collapsed = True
            elif collapsed and e > t.entropy_clear_factor * limit:
                collapsed = False
            self.below[head] = below
            self.collapsed[head] = collapsed
            last = self.last.get(head)
            fell = last is not None and e < (1.0 - t.entropy_fall_step) * last
            pushed = p.early_stopped and last is not None and e < (1.0 - t.entropy_throttled_fall_step) * last
            falls = self.falls.get(head, 0) + 1 if fell else 0
            throttled = self.throttled.get(head, 0) + 1 if pushed else 0
            # a fall for the spread rule: more than one robust sigma of the head's own changes, so a
            # dither after one large drop does not make it a slide
            spread = self._spread(self._hist(head))
            dropped_by = last - e if last is not None else 0.0
            down = self.down.get(head, 0) + 1 if dropped_by > (spread[1] if spread else 0.0) else 0
            if down == 1 and last is not None:
                self.top[head] = last
            self.down[head] = down
            self.last[head] = e
            self.falls[head] = falls
            self.throttled[head] = throttled
            hist = self._hist(head)
            base = statistics.median(hist) if len(hist) >= max(1, t.baseline_min_updates) else None
            slide: tuple[float, str] | None = None  # (the entropy level it fell below, words)
            spread_level: float | None = None
            sharpened = self._sharpened(head, p.entropy_normalized_per_epoch.get(head))
            sharp = self.sharp.get(head, 0) + 1 if sharpened is not None else 0
            self.sharp[head] = sharp
            if base is not None and base > 0:
                spread_level = self._spread_slide(head, e, base, hist)
                if falls >= t.entropy_fall_updates and e < t.entropy_fall_fraction * base:
                    slide = (t.entropy_fall_fraction * base, f" after falling for {falls} updates in a row")
                elif throttled >= t.entropy_fall_updates and e < t.entropy_throttled_fall_fraction * base:
                    slide = (
                        t.entropy_throttled_fall_fraction * base,
                        f" after falling for {throttled} updates in a row, each cut short by the "
                        f"target-KL early stop",
                    )
                elif e < t.entropy_drop_fraction * base:
                    slide = (t.entropy_drop_fraction * base, "")
                elif spread_level is not None:
                    slide = (
                        spread_level,
                        f" after falling for {self.down[head]} updates in a row, far beyond its own "
                        f"update-to-update spread",
                    )
            shown = e  # the value a collapsing alarm reports: the update's entropy, or its last epoch's
            sharp_level: float | None = None  # the last epoch's entropy had to fall below this
            by_sharpening = False  # the within-update rule alone flagged this update
            if sharpened is not None and sharp >= t.entropy_sharpen_updates:
                change, allowed, first, last = sharpened
                sharp_level = first * (1.0 + allowed)
                if slide is None:
                    shown, by_sharpening = last, True
                    slide = (
                        sharp_level,
                        f"; within the update it went from {fmt(first)} in the first epoch to {fmt(last)} in "
                        f"the last ({change:+.1%}, beyond its usual change {allowed:+.1%})"
                        + (f", {sharp} updates in a row" if sharp > 1 else ""),
                    )
            flagged = self.flagged.get(head, 0) + 1 if collapsed or slide is not None else 0
            self.flagged[head] = flagged
            sustained = flagged > 0 and (
                self.slid.get(head, False)
                or (
                    base is not None
                    and t.entropy_slide_critical_updates <= flagged <= t.entropy_slide_critical_window
                    and e < t.entropy_slide_critical_fraction * base
                )
                or sharp >= t.entropy_sharpen_critical_updates
                or wrong_sign
            )
            self.slid[head] = sustained
            slid = (
                f"; it lost {1 - e / base:.0%} of its recent median {fmt(base)} and has been flagged for "
                f"{flagged} updates in a row"
                if sustained and base is not None
                else ""
            )
            # the level a critical slide is judged against: the spread rule's, else the fraction's
            if by_sharpening and sharp >= t.entropy_sharpen_critical_updates:
                critical_level = sharp_level
            elif wrong_sign and slide is not None:
                critical_level = slide[0]
            else:
                critical_level = t.entropy_slide_critical_fraction * base if base is not None else None
            if collapsed:
                critical = e < t.entropy_critical_fraction * limit
                since = (
                    f"has been below {fmt(limit)} for {below} updates"
                    if below
                    else f"has not yet risen above {fmt(t.entropy_clear_factor * limit)}"
                )
                if critical:
                    limit_now = t.entropy_critical_fraction * limit
                elif sustained and critical_level is not None:
                    limit_now = critical_level
                else:
                    limit_now = limit
                out.append(
                    self.anomaly(
                        CRITICAL if critical or sustained else WARNING,
                        step,
                        f"Head '{head}' is nearly deterministic: normalised entropy {fmt(e)} {since}{slid}; "
                        f"it has stopped exploring.",
                        value=e,
                        threshold=limit_now,
                        head=head,
                    )
                )
            elif slide is not None and base is not None:
                level, how = slide
                out.append(
                    self.anomaly(
                        CRITICAL if sustained else WARNING,
                        step,
                        f"Head '{head}' is collapsing: normalised entropy fell to {fmt(e)}, "
                        f"{e / base:.0%} of its recent median {fmt(base)}{how}"
                        + (f", flagged for {flagged} updates in a row." if sustained else "."),
                        value=shown,
                        threshold=critical_level if sustained and critical_level is not None else level,
                        head=head,
                    )
                )
            else:
                hist.append(e)
        return out
