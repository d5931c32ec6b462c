"""The update's gradient statistics on the host: every reduction over parameters and calls (totals,
clip rate, groups, vanishing / exploding, NaN / Inf estimates and which tensors hold them) from the
transferred (calls x parameters) arrays, in float64 numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.schema import GradientStats

__all__ = ["NONFINITE_NAMES", "PREFIX"]

PREFIX = "grad."
NONFINITE_NAMES = 16  # GradientStats.nonfinite_params lists at most this many names


class _HostStatistics:
    """``build``: the reducer's statistics from the one transfer of the update."""

    names: list[str]
    numels: list[int]
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    calls: int
    groups: dict[str, list[int]]
    group_names: list[str]
    examined_elements: int
    total_elements: int
    skipped_params: int  # a property of the reducer
    _nb: int
    _call_scales: list[list[float]]
    _vanish_thr: float
    _explode_thr: float

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> GradientStats:
        """The update's :class:`GradientStats` from the transferred values (host side).

        Every reduction over parameters and calls runs here, in float64 numpy over (calls x
        parameters) arrays: a few dozen vectorised operations on a few thousand numbers, where on
        the device each would be a kernel launch (the device has already read every gradient
        element; what crosses is 4 numbers per parameter per backward and the histogram).
        """
        stats = GradientStats(
            calls=self.calls, max_grad_norm=self.max_grad_norm, skipped_params=self.skipped_params
        )
        values = host.get(PREFIX + "stats")
        if level <= TelemetryLevel.OFF or self.calls == 0 or values is None:
            return stats
        n_params, nb = len(self.params), self._nb
        vec = np.asarray(values, dtype=np.float64)
        cats = vec[:nb]
        total_sum, total = float(vec[nb]), vec[nb + 1 : nb + 1 + self.calls]
        rows = vec[nb + 1 + self.calls :].reshape(self.calls, 4, n_params)
        n, x, k_inf, k_nan = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]  # (C, P) each
        scale = np.asarray(self._call_scales, dtype=np.float64)  # (C, P): numel / examined
        numel = np.asarray(self.numels, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            present = n != -math.inf  # a NaN norm is present
            has_nan = np.isnan(n)
            has_inf = (x == math.inf) & ~has_nan
            n0 = np.where(present, n, 0.0)  # absent -> 0, NaN stays NaN
            sq = n0 * n0
            stats.total_norm = total_sum / self.calls
            stats.total_norm_max = float(total.max())  # NaN if any call's is
            stats.total_norm_last = float(total[-1])
            stats.clip_rate = float((total > self.max_grad_norm).sum() / self.calls)
            stats.max_abs = float(np.where(has_nan, n, x).max())  # max |g|; NaN wherever a NaN is
            stats.nan_params = int(has_nan.sum())
            stats.inf_params = int(has_inf.sum())
            # NaN / Inf element estimates: sample counts scaled to the tensor, kept to tensors whose
            # flags (from every element) say they hold some, and at least 1 for each of those; a NaN
            # tensor may also hold inf (its flag cannot tell).
            inf_est = np.maximum(np.round(k_inf * scale) * (has_inf | has_nan), has_inf)
            nan_est = np.maximum(np.round(k_nan * scale) * has_nan, has_nan)
            stats.inf_count = int(inf_est.sum())
            stats.nan_count = int(nan_est.sum())
            bad = (has_nan | has_inf).any(0)
            stats.nonfinite_params = [name for name, b in zip(self.names, bad) if b][:NONFINITE_NAMES]
            if level < TelemetryLevel.NORMAL:
                return stats
            present_numel = present @ numel  # (C,)
            model_normalized = float((total / np.sqrt(present_numel)).mean())
            calls_with = present.sum(0)
            param_sum = n0.sum(0)
            stats.param_norms = [float(s / c) if c else math.nan for s, c in zip(param_sum, calls_with)]
            for name in self.group_names:
                members = self.groups[name]
                g_numel = present[:, members] @ numel[members]  # (C,)
                g_present = g_numel > 0
                c = int(g_present.sum())
                if not c:
                    stats.group_norms[name] = stats.group_norms_normalized[name] = math.nan
                    stats.group_ratios[name] = math.nan
                    continue
                g_norm = np.sqrt(sq[:, members].sum(1))  # a NaN stays in its own group
                norm = float(g_norm[g_present].sum() / c)
                normalized = float((g_norm[g_present] / np.sqrt(g_numel[g_present])).sum() / c)
                stats.group_norms[name] = norm
                stats.group_norms_normalized[name] = normalized
                stats.group_ratios[name] = normalized / model_normalized if model_normalized > 0 else math.nan
            stats.vanishing_count = int(((n < self._vanish_thr) & present).sum(1).max())
            stats.exploding_count = int((n > self._explode_thr).sum(1).max())
        stats.examined_elements = self.examined_elements
        stats.total_elements = self.total_elements
        stats.hist_counts = [int(c) for c in cats[: nb - 2]]
        stats.zero_fraction = float(cats[0]) / self.examined_elements if self.examined_elements else None
        return stats  # ema_* fields: the hub's GradientEMA (host state that outlives updates)
