"""``performance_degradation``: the rolling mean episode return fell far below its best."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import WARNING, Context, Rule, count, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["PerformanceRule"]


class PerformanceRule(Rule):
    """``performance_degradation`` (warning): the rolling mean episode return fell far below its best.

    The rolling mean covers the last ``perf_window`` updates that finished episodes; its best
    value so far is the reference. Degraded when ``best - current`` exceeds ``perf_drop`` x
    ``max(|best|, best - first)`` - a share of the return's magnitude, or of the gain since
    the first full window for returns near or below zero. Not judged before the window is full
    nor during the first ``perf_warmup_fraction`` of the planned updates (early returns are
    noise around exploration).
    """

    KIND = "performance_degradation"

    def reset(self) -> None:
        self.hist: deque[float] = deque(maxlen=max(1, self.t.perf_window))
        self.best: float | None = None
        self.first: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"hist": list(self.hist), "best": self.best, "first": self.first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.hist.extend(float(v) for v in state["hist"])
        self.best = None if state["best"] is None else float(state["best"])
        self.first = None if state["first"] is None else float(state["first"])

    def check(self, ctx: Context) -> list[Anomaly]:
        t = self.t
        e = ctx.snapshot.episodes
        ret = finite(e.return_mean) if e is not None and count(e.count) else None
        if ret is None:
            return []
        self.hist.append(ret)
        if len(self.hist) < max(1, t.perf_window):
            return []
        current = sum(self.hist) / len(self.hist)
        if self.first is None:
            self.first = current
        if self.best is None or current > self.best:
            self.best = current
        if ctx.total and ctx.step < t.perf_warmup_fraction * ctx.total:
            return []
        best = self.best
        scale = max(abs(best), best - self.first)
        drop = best - current
        if scale <= 0 or drop <= t.perf_drop * scale:
            return []
        return [
            self.anomaly(
                WARNING,
                ctx.step,
                f"Mean episode return over the last {len(self.hist)} updates is {fmt(current)}, "
                f"down {drop / scale:.0%} from its best {fmt(best)}.",
                value=current,
                threshold=best - t.perf_drop * scale,
            )
        ]
