"""Gradient drift: how far this update's gradient norm sits from its exponential moving average.

Host side and torch-free: it consumes the floats of the update's single transfer, once per update.

``drift = |x - ema| / (|ema| + eps)`` is measured against the EMA *before* it absorbs ``x`` (the
question is "how unusual is this update given the history"), then ``ema <- m * ema + (1 - m) * x``.
The first finite value initialises the EMA (no zero-start bias). For the first ``warmup`` values the
EMA is too short to judge by, so the drift is ``None`` (no verdict).

Non-finite inputs (a NaN or inf norm) are not absorbed: one NaN backward would otherwise poison the
EMA forever (and inf would pin it). Such an update gets no drift verdict (``None``; the numerical
instability check reports it) and is counted in ``skipped``.

Besides the main series it tracks named extra series (e.g. group norms), each with its own EMA,
count and warm-up, so a group that appears later warms up on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_EPS", "EMASeries", "GradientEMA"]

DEFAULT_EPS = 1e-8


@dataclass
class EMASeries:
    """One tracked scalar: its EMA, the finite values absorbed and the non-finite ones refused."""

    ema: float | None = None
    count: int = 0
    skipped: int = 0
    last_drift: float | None = None

    def update(self, x: float, momentum: float, warmup: int, eps: float) -> float | None:
        x = float(x)
        if not math.isfinite(x):
            self.skipped += 1
            self.last_drift = None
            return None
        if self.ema is None:
            drift = None
            self.ema = x
        else:
            drift = abs(x - self.ema) / (abs(self.ema) + eps) if self.count >= warmup else None
            self.ema = momentum * self.ema + (1.0 - momentum) * x
        self.count += 1
        self.last_drift = drift
        return drift

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "count": self.count, "skipped": self.skipped, "last_drift": self.last_drift}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], where: str) -> EMASeries:
        if not isinstance(state, Mapping) or set(state) != {"ema", "count", "skipped", "last_drift"}:
            raise ValueError(f"{where} must hold exactly ema, count, skipped and last_drift")
        ema, last = state["ema"], state["last_drift"]
        for key, value in (("ema", ema), ("last_drift", last)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ValueError(f"{where}.{key} must be a finite number or None, got {value!r}")
        for key in ("count", "skipped"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{key} must be a non-negative int, got {value!r}")
        if (ema is None) != (state["count"] == 0):
            raise ValueError(f"{where}: ema is None exactly when count is 0")
        return cls(
            ema=None if ema is None else float(ema),
            count=state["count"],
            skipped=state["skipped"],
            last_drift=None if last is None else float(last),
        )


class GradientEMA:
    """EMA drift tracker for the pre-clip total gradient norm (and optional named extras).

    ``update(x, extras)`` returns the drift of ``x`` (``None`` during warm-up or for a non-finite
    ``x``); ``value`` is the EMA after the update; ``extras_drift`` / ``extras_value`` hold the
    extras' results of the last update. ``state_dict()`` is plain Python (JSON-safe) and
    ``load_state_dict`` restores it exactly.
    """

    def __init__(self, momentum: float = 0.99, warmup: int = 10, eps: float = DEFAULT_EPS) -> None:
        for name, value in (("momentum", momentum), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must lie in (0, 1), got {momentum!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.momentum = float(momentum)
        self.warmup = warmup
        self.eps = float(eps)
        self.main = EMASeries()
        self.extras: dict[str, EMASeries] = {}
        self.extras_drift: dict[str, float | None] = {}

    @classmethod
    def from_thresholds(cls, thresholds: Any) -> GradientEMA:
        """Momentum and warm-up from a :class:`telemetry_core.config.Thresholds`."""
        return cls(momentum=thresholds.grad_ema_momentum, warmup=thresholds.grad_drift_warmup)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, value: float, extras: Mapping[str, float] | None = None) -> float | None:
        """Absorb one update's value (and extras); return the main series' drift or None."""
        if extras is not None and not isinstance(extras, Mapping):
            raise TypeError(f"extras must be a mapping of name -> float, got {type(extras).__name__}")
        drift = self.main.update(self._number(value, "value"), self.momentum, self.warmup, self.eps)
        self.extras_drift = {}
        for name, x in (extras or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"extras keys must be strings, got {name!r}")
            series = self.extras.setdefault(name, EMASeries())
            x = self._number(x, f"extras[{name!r}]")
            self.extras_drift[name] = series.update(x, self.momentum, self.warmup, self.eps)
        return drift

    @staticmethod
    def _number(x: Any, name: str) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a float (a transferred host value), got {type(x).__name__}")
        return float(x)

    # -- readings --------------------------------------------------------------------------------
    @property
    def value(self) -> float | None:
        """The EMA of the main series (None before the first finite value)."""
        return self.main.ema

    @property
    def drift(self) -> float | None:
        """Drift of the last update (None in warm-up or for a non-finite value)."""
        return self.main.last_drift

    @property
    def count(self) -> int:
        return self.main.count

    @property
    def warmed_up(self) -> bool:
        """Whether the next finite value gets a drift verdict."""
        return self.main.count >= self.warmup

    @property
    def extras_value(self) -> dict[str, float | None]:
        return {name: s.ema for name, s in self.extras.items()}

    def drifting(self, threshold: float) -> bool | None:
        """Whether the last drift exceeds ``threshold`` (None: no verdict)."""
        d = self.main.last_drift
        return None if d is None else d > threshold

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "warmup": self.warmup,
            "eps": self.eps,
            "main": self.main.state_dict(),
            "extras": {name: s.state_dict() for name, s in self.extras.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError naming the key when it is malformed."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = {"momentum", "warmup", "eps", "main", "extras"} - set(state)
        if missing:
            raise ValueError(f"GradientEMA state lacks {sorted(missing)}")
        fresh = GradientEMA(state["momentum"], state["warmup"], state["eps"])  # validates them
        main = EMASeries.from_state(state["main"], "state['main']")
        if not isinstance(state["extras"], Mapping):
            raise ValueError("state['extras'] must be a mapping of name -> series state")
        extras = {
            str(k): EMASeries.from_state(v, f"state['extras'][{k!r}]") for k, v in state["extras"].items()
        }
        self.momentum, self.warmup, self.eps = fresh.momentum, fresh.warmup, fresh.eps
        self.main, self.extras = main, extras
        self.extras_drift = {}
