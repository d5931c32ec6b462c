"""Episodes finished during one update's rollout: count, return mean/min/max, length mean. MINIMAL+.

The loop hands them over however it has them. Python lists (what most vector-env loops collect from
``info``) are reduced on the host with numpy at once: they are already host data, so no tensor and
no transfer is involved. Tensors (a loop that tracks episodes on the device) stay on the device and
ride in the hub's single transfer. Either may be empty: an update in which no episode ended reports
``count = 0`` and NaN statistics. Integer returns and lengths are fine (they are converted); NaN
returns are kept and make the return statistics NaN, so a broken reward is seen, not averaged away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.advantage import acc_dtype
from telemetry_core.schema import EpisodeStats

__all__ = ["EpisodeReducer"]


def _as_host(name: str, value: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers or a tensor: {exc}") from None
    if arr.ndim > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr.reshape(-1)


def _as_device(name: str, value: torch.Tensor) -> torch.Tensor:
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
    return value.detach().reshape(-1)


class EpisodeReducer:
    """Accumulates finished episodes over one update (several calls add up)."""

    PREFIX = "ep."

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._host_returns: list[np.ndarray] = []
        self._host_lengths: list[np.ndarray] = []
        self._dev_returns: list[torch.Tensor] = []
        self._dev_lengths: list[torch.Tensor] = []

    def observe(
        self,
        returns: Sequence[float] | torch.Tensor,
        lengths: Sequence[int] | torch.Tensor | None = None,
        *,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """Returns of the episodes that ended, and optionally their lengths (same count)."""
        if isinstance(returns, torch.Tensor):
            ret_d = _as_device("episode_returns", returns)
            count = ret_d.numel()
        else:
            ret_h = _as_host("episode_returns", returns)
            count = ret_h.size
        len_d = len_h = None
        if lengths is not None:
            if isinstance(lengths, torch.Tensor):
                len_d = _as_device("episode_lengths", lengths)
                n_len = len_d.numel()
            else:
                len_h = _as_host("episode_lengths", lengths)
                n_len = len_h.size
            if n_len != count:
                raise ValueError(
                    f"episode_lengths has {n_len} entries but episode_returns has {count}; "
                    "one length per finished episode"
                )
        if level <= TelemetryLevel.OFF or count == 0:
            return
        if isinstance(returns, torch.Tensor):
            self._dev_returns.append(ret_d)
        else:
            self._host_returns.append(ret_h)
        if len_d is not None:
            self._dev_lengths.append(len_d)
        elif len_h is not None:
            self._host_lengths.append(len_h)

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if level <= TelemetryLevel.OFF:
            return out
        with torch.no_grad():
            if self._dev_returns:
                dt = acc_dtype(self._dev_returns[0].device)
                ret = torch.cat([t.to(dt) for t in self._dev_returns])
                lo, hi = torch.aminmax(ret)
                out["ep.returns"] = torch.stack((ret.sum(), lo, hi))
            if self._dev_lengths:
                dt = acc_dtype(self._dev_lengths[0].device)
                out["ep.lengths"] = torch.cat([t.to(dt) for t in self._dev_lengths]).sum().reshape(1)
        return out

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> EpisodeStats | None:
        """The update's :class:`EpisodeStats`; None at OFF."""
        if level <= TelemetryLevel.OFF:
            return None
        n_dev = sum(t.numel() for t in self._dev_returns)
        n_host = sum(a.size for a in self._host_returns)
        count = n_dev + n_host
        stats = EpisodeStats(count=count)
        if count == 0:
            return stats
        total, lows, highs = 0.0, [], []
        if n_host:
            arr = np.concatenate(self._host_returns)
            total += float(arr.sum())
            lows.append(float(arr.min()))  # numpy min/max propagate NaN
            highs.append(float(arr.max()))
        if n_dev:
            s, lo, hi = host["ep.returns"]
            total += s
            lows.append(lo)
            highs.append(hi)
        nan = any(math.isnan(v) for v in lows + highs)
        stats.return_mean = total / count
        stats.return_min = math.nan if nan else min(lows)
        stats.return_max = math.nan if nan else max(highs)
        n_len = sum(t.numel() for t in self._dev_lengths) + sum(a.size for a in self._host_lengths)
        if n_len:
            len_total = sum(float(a.sum()) for a in self._host_lengths)
            if self._dev_lengths:
                len_total += host["ep.lengths"][0]
            stats.length_mean = len_total / n_len
        return stats
