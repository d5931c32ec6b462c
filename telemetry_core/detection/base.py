"""What every rule shares: the severities, tolerant number readers, a rolling baseline, the
:class:`Rule` base class (one kind, its own state) and the per-update :class:`Context`."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from telemetry_core.config import Phase, Thresholds
from telemetry_core.kinds import SPECS
from telemetry_core.schema import Anomaly, Snapshot

__all__ = [
    "CRITICAL",
    "WARNING",
    "Context",
    "HeadBaselineRule",
    "Rolling",
    "Rule",
    "count",
    "finite",
    "fmt",
    "isinf",
    "names",
    "nonfinite",
    "num",
]

WARNING = "warning"
CRITICAL = "critical"


def num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not a number (bools are not numbers)."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def finite(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, NaN and inf all mean "no verdict")."""
    v = num(x)
    return v if v is not None and math.isfinite(v) else None


def nonfinite(x: Any) -> bool:
    v = num(x)
    return v is not None and not math.isfinite(v)


def isinf(x: Any) -> bool:
    v = num(x)
    return v is not None and math.isinf(v)


def count(x: Any) -> int:
    """A non-negative count, tolerating floats and garbage (garbage counts as 0)."""
    v = finite(x)
    return int(v) if v is not None and v > 0 else 0


def fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def names(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class Rolling:
    """The last ``window`` values of one statistic; a verdict against it needs ``min_known`` values."""

    def __init__(self, window: int, min_known: int) -> None:
        self.values: deque[float] = deque(maxlen=max(1, int(window)))
        self.min_known = max(1, int(min_known))

    @property
    def known(self) -> bool:
        return len(self.values) >= self.min_known

    def append(self, value: float) -> None:
        self.values.append(value)

    def median(self) -> float | None:
        return statistics.median(self.values) if self.known else None

    def largest(self) -> float | None:
        return max(self.values) if self.known else None

    def dump(self) -> list[float]:
        return list(self.values)

    def load(self, values: Iterable[Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in values)


@dataclass(frozen=True)
class Context:
    """One update as every rule sees it: the snapshot, its step, training phase and planned updates."""

    snapshot: Snapshot
    step: int
    phase: Phase
    total: int | None
    heads: Mapping[str, int]  # head -> number of actions (constructor's, then the run's)


class Rule:
    """Judges one anomaly kind (``KIND``, whose spec in ``telemetry_core.kinds`` names this class).

    A rule owns its state across updates (counters, rolling baselines), which :meth:`state_dict`
    returns as plain JSON-safe Python types and :meth:`load_state_dict` restores (raising
    KeyError/TypeError/ValueError on a malformed entry; the detector turns those into one error).
    """

    KIND: ClassVar[str] = ""

    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.action = SPECS[self.KIND].action
        self.reset()

    def reset(self) -> None:
        """Forget everything learned from earlier updates."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"{self.KIND} state must be a mapping, got {type(state).__name__}")

    def check(self, ctx: Context) -> list[Anomaly]:
        raise NotImplementedError

    def rolling(self, window_field: str) -> Rolling:
        return Rolling(getattr(self.t, window_field), self.t.baseline_min_updates)

    def anomaly(
        self,
        severity: str,
        step: int,
        message: str,
        *,
        value: float | None,
        threshold: float | None,
        head: str | None = None,
    ) -> Anomaly:
        return Anomaly(
            kind=self.KIND,
            severity=severity,
            step=step,
            message=message,
            action=self.action,
            value=value,
            threshold=threshold,
            head=head,
        )


class HeadBaselineRule(Rule):
    """A rule that keeps, per action head, a rolling baseline of one statistic (the median of its
    last ``BASELINE_WINDOW`` unflagged updates): a flagged update stays out of it, so a sustained
    pathology stays flagged instead of becoming the new normal."""

    BASELINE_WINDOW: ClassVar[str] = ""  # the Thresholds field holding the window length

    def reset(self) -> None:
        self.base: dict[str, Rolling] = {}

    def _base(self, head: str) -> Rolling:
        base = self.base.get(head)
        if base is None:
            base = self.base[head] = self.rolling(self.BASELINE_WINDOW)
        return base

    def state_dict(self) -> dict[str, Any]:
        return {"base": {h: r.dump() for h, r in self.base.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for head, values in state["base"].items():
            self._base(str(head)).load(values)
