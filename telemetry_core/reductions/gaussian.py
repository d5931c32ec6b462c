"""Statistics of continuous (diagonal Gaussian, possibly tanh-squashed) action heads.

Ratios, KL, clipping and ESS of a Gaussian head are those of any head (:mod:`.policy`); what only a
continuous head has is measured here, for the :class:`~telemetry_core.reductions.policy.PolicyReducer`
that owns this reducer:

* ``log_std_mean/min/max[head]``: of every log standard deviation observed in the update
  (:meth:`GaussianReducer.observe_log_std`: a state-independent ``(dims,)`` parameter, or per-sample
  ``(..., dims)`` values), pooled over calls; ``log_std_dims[head]``: the mean of each dimension
  (the last axis) over samples and calls (when every call had the same number of dimensions; at most
  ``MAX_DIMS`` are sent).
* ``entropy_differential[head]``: the differential entropy of the (pre-squash) Gaussian in nats,
  ``sum over dims of (log sigma_d + log(2 pi e) / 2)``, averaged over samples: computed from the
  log-stds, so a loop that passes no entropies still has it (for a squashed head it is the entropy
  before the tanh, which bounds the squashed one from above).
* ``log_std_trend[head]``: the least-squares slope, in nats per update, of ``log_std_mean`` over the
  last ``TREND_WINDOW`` updates that had a finite one (this one included); absent until two are known.
* ``action_saturation[head]``: the share of observed action elements (samples x bounded dimensions)
  beyond the action bounds *before clipping* (``< low`` or ``> high``), or for a tanh-squashed head
  with ``|tanh(u)| > SQUASH_SATURATION`` of the pre-squash values ``u``; ``action_saturation_max[head]``:
  the share of the worst dimension. Dimensions without finite bounds are left out. A NaN action
  makes both NaN (it is neither inside nor beyond; ``numerical_instability`` reports it).

All device work is deferred: each call makes one small float64 row (a few kernels, no sync), and
:meth:`pending` stacks them per head for the hub's single transfer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from telemetry_core.reductions.advantage import acc_dtype, check_float_tensor
from telemetry_core.reductions.transfer import to_device
from telemetry_core.schema import PolicyStats

__all__ = ["HALF_LOG_2PI_E", "MAX_DIMS", "SQUASH_SATURATION", "TREND_WINDOW", "GaussianReducer", "slope"]

HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))  # differential entropy of N(0, 1), nats
SQUASH_SATURATION = 0.99  # |tanh(u)| above this: the squash's gradient is below 2 % of its peak
TREND_WINDOW = 8  # updates in the log-std trend's fit
MAX_DIMS = 256  # per-dimension log-stds sent per head (the dashboard shows far fewer)

# Layout of one log-std row: [sum, count, min, max, rows], then the per-dimension sums.
_L_SUM, _L_COUNT, _L_MIN, _L_MAX, _L_ROWS = range(5)
_L_FIXED = 5


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (per step); NaN for fewer than two."""
    n = len(values)
    if n < 2:
        return math.nan
    x_mean = (n - 1) / 2.0
    y_mean = math.fsum(values) / n
    num = math.fsum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    den = math.fsum((i - x_mean) ** 2 for i in range(n))
    return num / den


def _bounds(name: str, value: object, dims: int) -> np.ndarray:
    """A bound as a float64 array of ``dims`` values (a number is broadcast)."""
    if isinstance(value, torch.Tensor):
        # reading a device tensor's values would sync the device on every call
        raise TypeError(f"{name} must be host values (a number, a sequence or a numpy array such as the "
                        "action space's), not a tensor")
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(dims, float(arr[0]))
    if arr.size != dims:
        raise ValueError(f"{name} must hold 1 or {dims} values (the actions' last axis), got {arr.size}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not hold NaN")
    return arr


class GaussianReducer:
    """Log-std, differential entropy, log-std trend and action saturation of continuous heads.

    :meth:`reset` starts an update (the trend's history is kept across updates); the observe methods
    never sync; :meth:`pending` returns device tensors named ``policy.log_std.*`` and
    ``policy.saturation.*``; :meth:`fill` writes the statistics into the update's ``PolicyStats``.
    """

    def __init__(self, heads: Sequence[str]) -> None:
        self.heads = tuple(heads)
        self._history: dict[str, deque[float]] = {h: deque(maxlen=TREND_WINDOW) for h in self.heads}
        # (head, low bytes, high bytes, squashed, device) -> (lower, upper, bounded mask) on the device
        self._bound_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        self._log_std: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}
        self._saturation: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}

    def reset_history(self) -> None:
        """Forget the trend's earlier updates (a new run)."""
        for hist in self._history.values():
            hist.clear()

    def check_head(self, method: str, head: str) -> None:
        if head not in self._log_std:
            raise ValueError(f"{method}: unknown head {head!r}; known heads: {list(self.heads)}")

    # -- observing -----------------------------------------------------------------------------
    def observe_log_std(self, head: str, log_std: torch.Tensor) -> None:
        """A head's log standard deviations, ``(dims,)`` or ``(..., dims)``; a 0-d tensor is one
        dimension. About ten kernels, no sync."""
        self.check_head("observe_log_std", head)
        t = check_float_tensor("log_std", log_std)  # (refuses an empty tensor)
        with torch.no_grad():
            x = t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])
            x = x.to(acc_dtype(t.device))
            lo, hi = torch.aminmax(x)
            rows, dims = x.shape
            fixed = torch.stack(
                (
                    x.sum(),
                    torch.full((), float(rows * dims), dtype=x.dtype, device=x.device),
                    lo,
                    hi,
                    torch.full((), float(rows), dtype=x.dtype, device=x.device),
                )
            )
            self._log_std[head].append(torch.cat((fixed, x.sum(0))))

    def observe_actions(
        self,
        head: str,
        actions: torch.Tensor,
        *,
        low: object = None,
        high: object = None,
        squashed: bool = False,
    ) -> None:
        """A head's actions before clipping, ``(..., dims)`` (a 1-D tensor is one dimension), against
        its bounds ``low``/``high`` (numbers or ``dims`` values, e.g. the action space's), or, with
        ``squashed=True``, its pre-tanh values against ``|tanh(u)| > SQUASH_SATURATION`` (no bounds).
        A few kernels, no sync (the bounds reach the device once per head and layout)."""
        self.check_head("observe_actions", head)
        t = check_float_tensor("actions", actions)
        x = t.reshape(-1, 1) if t.dim() <= 1 else t.reshape(-1, t.shape[-1])
        dims = x.shape[1]
        if squashed:
            if low is not None or high is not None:
                raise ValueError("observe_actions: a squashed head takes no low/high (its bounds are tanh's)")
            key: tuple[Any, ...] = (head, None, None, True, t.device, dims)
        else:
            if low is None or high is None:
                raise ValueError("observe_actions needs low= and high= (or squashed=True)")
            lo_arr, hi_arr = _bounds("low", low, dims), _bounds("high", high, dims)
            if (lo_arr > hi_arr).any():
                raise ValueError("observe_actions: low must not exceed high")
            key = (head, lo_arr.tobytes(), hi_arr.tobytes(), False, t.device, dims)
        cached = self._bound_cache.get(key)
        if cached is None:
            if len(self._bound_cache) > 64:  # bounds that change every call: do not grow without end
                self._bound_cache.clear()
            if squashed:
                limit = math.atanh(SQUASH_SATURATION)
                lo_arr, hi_arr = np.full(dims, -limit), np.full(dims, limit)
            bounded = np.isfinite(lo_arr) | np.isfinite(hi_arr)
            cached = (
                to_device(torch.from_numpy(lo_arr), t.device),
                to_device(torch.from_numpy(hi_arr), t.device),
                to_device(torch.from_numpy(bounded), t.device),
            )
            self._bound_cache[key] = cached
        lower, upper, bounded = cached
        with torch.no_grad():
            v = x.to(acc_dtype(t.device))
            # float64 bounds compared with the float64 upcast of the actions: a float32 action equal
            # to its float32 bound is not beyond it
            beyond = ((v < lower.to(v.dtype)) | (v > upper.to(v.dtype))) & bounded
            row = torch.cat(
                (
                    torch.full((1,), float(x.shape[0]), dtype=v.dtype, device=v.device),
                    bounded.to(v.dtype),
                    beyond.sum(0).to(v.dtype),
                    torch.isnan(v).sum(0).to(v.dtype),
                )
            )
            self._saturation[head].append(row)

    # -- the transfer --------------------------------------------------------------------------
    def pending(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for head, parts in self._log_std.items():
                if not parts:
                    continue
                if len({p.numel() for p in parts}) == 1:
                    p = torch.stack(parts)  # (calls, 5 + dims)
                    dim_sums = p[:, _L_FIXED : _L_FIXED + MAX_DIMS].sum(0)
                else:  # calls with different dimensions: no per-dimension means
                    p = torch.stack([q[:_L_FIXED] for q in parts])
                    dim_sums = p[:, :0].sum(0)
                out[f"policy.log_std.{head}"] = torch.cat(
                    (
                        p[:, _L_SUM : _L_COUNT + 1].sum(0),
                        p[:, _L_MIN].amin().reshape(1),
                        p[:, _L_MAX].amax().reshape(1),
                        p[:, _L_ROWS].sum().reshape(1),
                        dim_sums,
                    )
                )
            for head, parts in self._saturation.items():
                if not parts or len({p.numel() for p in parts}) != 1:
                    continue  # (calls with different dimensions: no saturation for this update)
                p = torch.stack(parts)  # (calls, 1 + 3 dims): rows, bounded, beyond, nan
                dims = (p.shape[1] - 1) // 3
                out[f"policy.saturation.{head}"] = torch.cat(
                    (p[:, :1].sum(0), p[:, 1 : 1 + dims].amax(0), p[:, 1 + dims :].sum(0))
                )
        return out

    def fill(self, stats: PolicyStats, host: Mapping[str, list[float]]) -> None:
        """Write the update's continuous-head statistics into ``stats`` from the transferred values."""
        for head in self.heads:
            log_std = host.get(f"policy.log_std.{head}")
            if log_std is not None:
                total, count, rows = log_std[_L_SUM], log_std[_L_COUNT], log_std[_L_ROWS]
                mean = total / count
                stats.log_std_mean[head] = mean
                stats.log_std_min[head], stats.log_std_max[head] = log_std[_L_MIN], log_std[_L_MAX]
                stats.entropy_differential[head] = total / rows + HALF_LOG_2PI_E * (count / rows)
                if len(log_std) > _L_FIXED:
                    stats.log_std_dims[head] = [s / rows for s in log_std[_L_FIXED:]]
                hist = self._history[head]
                if math.isfinite(mean):
                    hist.append(mean)
                if len(hist) >= 2:
                    stats.log_std_trend[head] = slope(list(hist))
            sat = host.get(f"policy.saturation.{head}")
            if sat is not None:
                dims = (len(sat) - 1) // 3
                rows = sat[0]
                bounded = [b > 0 for b in sat[1 : 1 + dims]]
                beyond, nans = sat[1 + dims : 1 + 2 * dims], sat[1 + 2 * dims :]
                judged = [d for d in range(dims) if bounded[d]]
                if not judged or rows <= 0:
                    continue
                if any(nans[d] > 0 for d in judged):
                    stats.action_saturation[head] = stats.action_saturation_max[head] = math.nan
                    continue
                stats.action_saturation[head] = sum(beyond[d] for d in judged) / (rows * len(judged))
                stats.action_saturation_max[head] = max(beyond[d] for d in judged) / rows
