"""Critic statistics of one PPO update: value loss, explained variance, value and error distributions.

* ``observe_rollout(values, returns)``: once per update on the rollout buffer. Moments of the values,
  the returns and the prediction error ``value - return`` in float64 on the device (MINIMAL and up);
  the error's p5/p50/p95 (NORMAL and up) by a device sort, numpy's "linear" definition, over the
  whole buffer up to ``quantile_max_exact`` elements and a seeded uniform sample above that
  (``error_quantile_n`` says how many were used; ``torch.quantile`` itself refuses > 2**24 inputs).
* ``observe_minibatch(value_loss)``: every minibatch; mean and max over the update.

Explained variance ``1 - Var(returns - values) / Var(returns)`` is decided on the host after the
transfer: it is ``None`` (undefined, not 0) when the returns are constant — judged by
``min == max`` exactly, because a float mean of identical values can be off by one ulp and leave a
"variance" of 1e-34 that would turn EV into a huge negative number. NaN inputs give NaN.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.advantage import (
    QUANTILE_MAX_EXACT,
    MomentAccumulator,
    QuantileSampler,
    ScalarSeries,
    acc_dtype,
    check_float_tensor,
    check_same_layout,
    moments_from_host,
    quantiles,
)
from telemetry_core.schema import ValueStats

__all__ = ["ValueReducer", "explained_variance"]

_N, _MEAN, _M2 = 0, 1, 2
_MIN, _MAX = 5, 6


def explained_variance(returns_moments: list[float], error_moments: list[float]) -> float | None:
    """EV from two transferred merged moment vectors; None when the returns are constant."""
    if returns_moments[_N] == 0:
        return None
    if returns_moments[_MIN] == returns_moments[_MAX]:
        return None
    var_ret = returns_moments[_M2]
    if var_ret == 0.0:
        return None
    return 1.0 - error_moments[_M2] / var_ret


class ValueReducer:
    """Accumulates critic statistics over one PPO update (see the module docstring)."""

    PREFIX = "value."
    ERROR_QS = (0.05, 0.50, 0.95)

    def __init__(self, *, seed: int = 0, quantile_max_exact: int = QUANTILE_MAX_EXACT) -> None:
        self._sampler = QuantileSampler(seed, quantile_max_exact)
        self.reset()

    def reset(self) -> None:
        self._series = MomentAccumulator()  # values, returns, errors
        self._error_data: list[torch.Tensor] = []
        self._loss = ScalarSeries("value_loss")
        self._q_used = 0

    def observe_rollout(
        self,
        values: torch.Tensor,
        returns: torch.Tensor,
        *,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """The critic's predictions on the rollout and the returns they target (same shape)."""
        v = check_float_tensor("values", values)
        r = check_float_tensor("returns", returns)
        check_same_layout("values", v, "returns", r)
        if level <= TelemetryLevel.OFF:
            return
        with torch.no_grad():
            dt = acc_dtype(v.device)
            v64 = v.reshape(-1).to(dt)
            r64 = r.reshape(-1).to(dt)
            err = v64 - r64  # a new tensor: safe to keep until pending
            self._series.add(torch.stack((v64, r64, err)))  # a private copy; reduced in pending
            if level >= TelemetryLevel.NORMAL:
                self._error_data.append(err)

    def observe_minibatch(
        self, value_loss: torch.Tensor | float, *, level: TelemetryLevel = TelemetryLevel.NORMAL
    ) -> None:
        """The value loss of one minibatch (a tensor stays on the device; a number is taken as is)."""
        checked = self._loss.check(value_loss)
        if level <= TelemetryLevel.OFF:
            return
        self._loss.add(checked)

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if level <= TelemetryLevel.OFF:
            return out
        with torch.no_grad():
            merged = self._series.pending()  # (3, 9): the three series at once
            if merged is not None:
                for k, name in enumerate(("values", "returns", "error")):
                    out[f"value.{name}"] = merged[k]
            if self._error_data and level >= TelemetryLevel.NORMAL:
                data = self._error_data[0] if len(self._error_data) == 1 else torch.cat(self._error_data)
                out["value.error_q"], self._q_used = quantiles(data, self.ERROR_QS, self._sampler)
            loss = self._loss.pending()
            if loss is not None:
                out["value.loss"] = loss
        return out

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> ValueStats | None:
        """The update's :class:`ValueStats`; None at OFF."""
        if level <= TelemetryLevel.OFF:
            return None
        stats = ValueStats()
        stats.value_loss, stats.value_loss_max = self._loss.result(host.get("value.loss"))
        if "value.values" in host:
            values = moments_from_host(host["value.values"])
            returns = moments_from_host(host["value.returns"])
            error = moments_from_host(host["value.error"])
            stats.explained_variance = explained_variance(host["value.returns"], host["value.error"])
            stats.value_mean, stats.value_std = values.mean, values.std
            stats.value_min, stats.value_max = values.min, values.max
            stats.return_std = returns.std
            stats.error_mean, stats.error_std = error.mean, error.std
        if "value.error_q" in host:
            stats.error_p5, stats.error_p50, stats.error_p95 = host["value.error_q"]
            stats.error_quantile_n = self._q_used
        return stats
