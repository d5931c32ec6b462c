"""The update's gradient statistics on the host: every reduction over parameters and calls (totals,
clip rate, groups, vanishing / exploding, NaN / Inf estimates and which tensors hold them) from the
transferred (calls x parameters) arrays, in float64 numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.gradients.plan import _Folded
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
    _folded: list[_Folded]
    _call_scales: list[list[float]]
    _vanish_thr: float
    _explode_thr: float
    _numel: np.ndarray  # (P,) float64 numels
    _group_cols: np.ndarray  # members of every group, one group after the other
    _group_starts: np.ndarray  # where each group starts in _group_cols

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
        nb, c_all = self._nb, self.calls
        cats = np.asarray(values, dtype=np.float64)
        n, x, k_inf, k_nan = self._assemble(host)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            present = n != -math.inf  # a NaN norm is present
            has_nan = np.isnan(n)
            has_inf = (x == math.inf) & ~has_nan
            n0 = np.where(present, n, 0.0)  # absent -> 0, NaN stays NaN
            sq = n0 * n0
            device = host.get(PREFIX + "totals")
            if device is not None:  # computed on the device, as rank_sums() reads them
                total_sum, total = device[0], np.asarray(device[1:], dtype=np.float64)
            else:  # (C,): the pre-clip norm clip_grad_norm_ computes
                total = np.sqrt(sq.sum(1))
                total_sum = float(total.sum())
            stats.total_norm = total_sum / c_all
            stats.total_norm_max = float(total.max())  # NaN if any call's is
            stats.total_norm_last = float(total[-1])
            stats.clip_rate = int(np.count_nonzero(total > self.max_grad_norm)) / c_all
            stats.max_abs = float(np.where(has_nan, n, x).max())  # max |g|; NaN wherever a NaN is
            stats.nan_params = int(np.count_nonzero(has_nan))
            stats.inf_params = int(np.count_nonzero(has_inf))
            if stats.nan_params or stats.inf_params:
                # NaN / Inf element estimates: sample counts scaled to the tensor, kept to tensors
                # whose flags (from every element) say they hold some, and at least 1 for each of
                # those; a NaN tensor may also hold inf (its flag cannot tell). Without any flag both
                # are exactly 0 and no tensor is named.
                scale = np.asarray(self._call_scales, dtype=np.float64)  # (C, P): numel / examined
                inf_est = np.maximum(np.round(k_inf * scale) * (has_inf | has_nan), has_inf)
                nan_est = np.maximum(np.round(k_nan * scale) * has_nan, has_nan)
                stats.inf_count = int(inf_est.sum())
                stats.nan_count = int(nan_est.sum())
                bad = (has_nan | has_inf).any(0)
                stats.nonfinite_params = [name for name, b in zip(self.names, bad) if b][:NONFINITE_NAMES]
            if level < TelemetryLevel.NORMAL:
                return stats
            numel = self._numel
            model_normalized = float((total / np.sqrt(present @ numel)).mean())
            calls_with = np.count_nonzero(present, axis=0)
            stats.param_norms = np.where(calls_with > 0, n0.sum(0) / calls_with, math.nan).tolist()
            if self.group_names:  # every group at once: its members' columns side by side
                cols, starts = self._group_cols, self._group_starts
                g_numel = np.add.reduceat((present * numel)[:, cols], starts, axis=1)  # (C, G)
                g_present = g_numel > 0
                c = np.count_nonzero(g_present, axis=0)  # (G,) calls in which the group had a gradient
                g_norm = np.sqrt(np.add.reduceat(sq[:, cols], starts, axis=1))  # a NaN stays in its group
                norm = np.where(g_present, g_norm, 0.0).sum(0) / c  # 0/0: NaN, as for no call
                normalized = np.where(g_present, g_norm / np.sqrt(g_numel), 0.0).sum(0) / c
                ratio = (
                    normalized / model_normalized if model_normalized > 0 else np.full_like(norm, math.nan)
                )
                stats.group_norms = dict(zip(self.group_names, norm.tolist()))
                stats.group_norms_normalized = dict(zip(self.group_names, normalized.tolist()))
                stats.group_ratios = dict(zip(self.group_names, ratio.tolist()))
            stats.vanishing_count = int(np.count_nonzero((n < self._vanish_thr) & present, axis=1).max())
            stats.exploding_count = int(np.count_nonzero(n > self._explode_thr, axis=1).max())
        stats.examined_elements = self.examined_elements
        stats.total_elements = self.total_elements
        stats.hist_counts = cats[: nb - 2].astype(np.int64).tolist()
        stats.zero_fraction = float(cats[0]) / self.examined_elements if self.examined_elements else None
        return stats  # ema_* fields: the hub's GradientEMA (host state that outlives updates)

    def _assemble(
        self, host: Mapping[str, list[float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(C, P) each, in call and parameter order, from each fold's rows (see ``_Bucket.norm_col``):
        L2 norm (-inf: no gradient), max |g| (0: no gradient), sampled Inf and NaN counts."""
        c_all, n_params = self.calls, len(self.params)
        if (
            len(self._folded) == 1
            and len(self._folded[0].plan.buckets) == 1
            and self._folded[0].plan.identity
        ):
            (b,), (key,) = self._folded[0].plan.buckets, self._folded[0].keys  # one bucket, every call
            v = np.asarray(host[key + "v"], dtype=np.float64).reshape(c_all, -1)
            k = np.asarray(host[key + "k"], dtype=np.float64).reshape(c_all, -1, 2)
            e = np.abs(v)
            return v[:, b.norm_col], np.maximum(e[:, b.ext_a], e[:, b.ext_b]), k[:, :, 0], k[:, :, 1]
        n = np.full((c_all, n_params), -math.inf)
        x = np.zeros((c_all, n_params))
        k_inf = np.zeros((c_all, n_params))
        k_nan = np.zeros((c_all, n_params))
        for folded in self._folded:
            c = len(folded.positions)
            whole = c == c_all  # every call of the update: plain column assignment
            for b, key in zip(folded.plan.buckets, folded.keys):
                v = np.asarray(host[key + "v"], dtype=np.float64).reshape(c, -1)
                k = np.asarray(host[key + "k"], dtype=np.float64).reshape(c, -1, 2)
                at = (slice(None), b.cols) if whole else np.ix_(folded.positions, b.cols)
                n[at] = v[:, b.norm_col]
                e = np.abs(v)
                x[at] = np.maximum(e[:, b.ext_a], e[:, b.ext_b])  # NaN wherever a NaN is
                k_inf[at] = k[:, :, 0]
                k_nan[at] = k[:, :, 1]
        return n, x, k_inf, k_nan
