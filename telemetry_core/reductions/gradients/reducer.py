"""The gradient reducer: its protocol (reset, observe after each backward, pending, build) and the
per-backward work, which reads each gradient once or twice and defers every reduction to the fold."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors  # one dispatch for the copy of a whole bucket (DDP uses it)

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.gradients.categories import (
    _BITS,
    _HALF,
    AUTO_SAMPLE,
    ROTATION,
    categorize,
    category_boundaries,
    category_lut,
    count_categories,
)
from telemetry_core.reductions.gradients.fold import _DeviceFold
from telemetry_core.reductions.gradients.groups import default_groups
from telemetry_core.reductions.gradients.host import PREFIX, _HostStatistics
from telemetry_core.reductions.gradients.plan import (
    FOLD_EVERY,
    SMALL_FOLD_ELEMENTS,
    _Bucket,
    _Call,
    _Folded,
    _Plan,
    _Planner,
)
from telemetry_core.reductions.transfer import to_device

__all__ = ["GradientReducer"]


class GradientReducer(_Planner, _DeviceFold, _HostStatistics):
    """Accumulates gradient statistics over the backward passes of one PPO update.

    Protocol: ``reset()`` at the start of an update; ``observe(level)`` after each
    ``loss.backward()`` and before ``clip_grad_norm_`` (reads ``p.grad``; no host sync);
    ``pending(level)`` -> ``{"grad.stats": vector}`` for the hub's single transfer;
    ``build(host, level)`` -> :class:`GradientStats`. ``skipped_params`` is the count the hub adds
    to ``Counters.inputs_skipped``.

    ``observe`` only computes per-parameter vectors (norms, max |g|) and copies the sample;
    ``pending`` bins the samples on the device; every reduction over parameters and calls runs once
    per update in ``build`` on the host, vectorised over the calls.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        max_grad_norm: float,
        thresholds: Thresholds,
        groups: Mapping[str, Sequence[int]] | None = None,
        sample_size: int | str | None = "auto",
    ) -> None:
        named_params = list(named_params)
        if not named_params:
            raise ValueError("named_params is empty: the model has no parameters to observe")
        seen: set[str] = set()
        for i, item in enumerate(named_params):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"named_params[{i}] must be a (name, parameter) pair, got {type(item)!r}")
            name, p = item
            if not isinstance(name, str):
                raise TypeError(f"named_params[{i}] name must be a string, got {type(name)!r}")
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"named_params[{i}] ({name!r}) is not a tensor but {type(p).__name__}")
            if p.dtype not in _BITS:
                raise TypeError(
                    f"named_params[{i}] ({name!r}) has dtype {p.dtype}; gradient statistics need "
                    "float16, bfloat16, float32 or float64 parameters"
                )
            if name in seen:
                raise ValueError(f"named_params has the name {name!r} twice")
            seen.add(name)
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
            raise TypeError(f"max_grad_norm must be a positive number, got {type(max_grad_norm).__name__}")
        if not (math.isfinite(float(max_grad_norm)) and float(max_grad_norm) > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
        thresholds.validate()
        if sample_size == "auto":
            per, low, high = AUTO_SAMPLE
            sample_size = min(high, max(low, sum(p.numel() for _, p in named_params) // per))
        if sample_size is not None and (
            isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
        ):
            raise ValueError(
                f"sample_size must be a positive int, 'auto' or None (every element), got {sample_size!r}"
            )

        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.numels = [p.numel() for p in self.params]
        self.max_grad_norm = float(max_grad_norm)
        self.thresholds = thresholds
        self.sample_size = sample_size
        group_map = default_groups(named_params) if groups is None else dict(groups)
        if not isinstance(group_map, dict):
            raise TypeError("groups must be a mapping of group name -> parameter indices")
        for g, idx in group_map.items():
            if not isinstance(g, str) or not g:
                raise TypeError(f"groups keys must be non-empty strings, got {g!r}")
            if isinstance(idx, (str, bytes)) or not isinstance(idx, Iterable):
                raise TypeError(
                    f"groups[{g!r}] must be indices into named_params (use resolve_groups for prefixes)"
                )
            idx = list(idx)
            if not idx:
                raise ValueError(f"groups[{g!r}] is empty")
            for j in idx:
                if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(self.params):
                    raise ValueError(f"groups[{g!r}] has index {j!r}, outside 0..{len(self.params) - 1}")
            group_map[g] = sorted(set(idx))
        self.groups: dict[str, list[int]] = group_map
        self.group_names = list(group_map)
        self._numel = np.asarray(self.numels, dtype=np.float64)
        sizes = [len(group_map[g]) for g in self.group_names]
        self._group_cols = np.asarray([i for g in self.group_names for i in group_map[g]], dtype=np.int64)
        self._group_starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        self._vanish_thr = thresholds.grad_vanishing_rel * self.max_grad_norm
        self._explode_thr = thresholds.grad_exploding_rel * self.max_grad_norm
        self._edges = tuple(float(e) for e in thresholds.grad_hist_edges)
        self._nb = len(self._edges) + 4  # zero, (0,e0), ..., [e_last,inf), inf, nan
        # Bit-pattern boundaries per dtype, computed here so observe() never reads tensor values.
        self._bounds = {dt: category_boundaries(self._edges, dt) for dt in _BITS}
        self._luts = {dt: category_lut(self._bounds[dt], dt) for dt in _BITS}
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._round = 0  # sampling rotation, continued across updates
        # Set when rank_sums() will be asked for (the hub's cross-rank aggregation): the totals are
        # then computed on the device, once, and build() uses them so that both agree to the bit.
        self.device_totals = False
        self.reset()

    # -- protocol -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new update: forget the rows and partial sums of the previous one."""
        self.calls = 0
        self.skipped: set[int] = set()
        self.total_elements = 0
        self.examined_elements = 0
        self._calls: list[_Call] = []
        self._kept = 0  # elements of the flat copies the stored calls hold
        self._hist: torch.Tensor | None = None  # (nb,) category counts summed over calls
        self._pieces: dict[str, torch.Tensor] = {}  # what the folds hand over: see _fold
        self._folded: list[_Folded] = []  # ... and how to read it back
        self._rows: torch.Tensor | None = None  # (C, 4, P) on the device, with device_totals only
        self._total_sum: torch.Tensor | None = None  # (1,) sum over calls of the total norm (idem)
        self._call_scales: list[list[float]] = []  # per call, numel / examined elements per parameter
        self._home: torch.device | None = None
        signature = [(p.dtype, p.device) for p in self.params]
        if signature != getattr(self, "_signature", signature):  # the model was moved or cast
            self._plans.clear()
        self._signature = signature

    @property
    def skipped_params(self) -> int:
        """Parameters whose ``.grad`` was None (or sparse) in at least one observed call of this update."""
        return len(self.skipped)

    def observe(self, level: TelemetryLevel) -> None:
        """Record per-parameter statistics of the gradients now in ``p.grad``. No host sync.

        Per (device, dtype) bucket only what must read this backward's gradients: one fused L2 pass,
        the extremes, one ``stack`` and one ``cat`` copying the sample out (4 + 2 * tensors ops on
        CPU, 5 + tensors on CUDA, views included). Binning and every reduction wait for the fold.
        """
        if level <= TelemetryLevel.OFF:
            return
        grads = [p.grad for p in self.params]
        # A gradient has its parameter's dtype, device and shape (PyTorch enforces it), and those are
        # checked once per update in reset(): per call only presence, layout and graph can change.
        key = tuple([None if g is None else (g.layout, g.requires_grad) for g in grads])
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(grads)
            self._plans[key] = plan
        if plan.skipped:
            self.skipped.update(plan.skipped)
        if not plan.present:
            return  # no gradient at all (observe before backward?): counted as skipped, not a call
        if self._home is None:
            self._home = plan.home
        round_index = self._round
        self._round = (round_index + 1) % ROTATION
        if plan.graph:  # gradients of a create_graph backward: record nothing on their graph
            with torch.no_grad():
                vecs, samples = self._per_call(plan, grads, round_index)
        else:  # the usual case: no grad-mode switch (its Python context costs more than a kernel)
            vecs, samples = self._per_call(plan, grads, round_index)
        self._calls.append(_Call(plan, vecs, samples, round_index))
        self.calls += 1
        self.total_elements += plan.numel
        self.examined_elements += plan.examined
        self._kept += plan.small_numel
        if len(self._calls) >= FOLD_EVERY or self._kept > SMALL_FOLD_ELEMENTS:
            self._fold()

    def _per_call(
        self, plan: _Plan, grads: list[torch.Tensor | None], round_index: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        vecs: list[torch.Tensor] = []
        samples: list[torch.Tensor | None] = []
        for b in plan.buckets:
            gs = [grads[i] for i in b.indices]
            if b.small:  # ONE dispatch: the flat copy (views and a cat inside one C++ call)
                vecs.append(_flatten_dense_tensors(gs))
                samples.append(None)
                continue
            if b.dtype in _HALF:  # float32 accumulation and result: no float16 overflow of squares
                norms = torch._foreach_norm(gs, 2, dtype=torch.float32)
            else:
                norms = torch._foreach_norm(gs, 2)
            if b.device.type == "cpu":  # aminmax is one vectorised pass; _foreach_norm(inf) is 4-10x slower
                extremes = [t for k in b.big for t in torch.aminmax(gs[k])]
                if b.rest:  # the smaller tensors: two dispatches for all of them
                    rest = gs if not b.big else [gs[k] for k in b.rest]
                    extremes.extend(torch._foreach_max(torch._foreach_abs(rest)))
            else:  # one fused multi-tensor kernel
                extremes = torch._foreach_norm(gs, math.inf)
            vecs.append(torch.stack([*norms, *extremes]))  # promotes half extremes to float32: exact
            samples.append(self._sample(b, gs, round_index))
        return vecs, samples

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        """What the update's statistics are reduced from, for the hub's one transfer (empty if none):
        ``"grad.stats"`` (the histogram) and each fold's rows and sampled counts; with
        ``device_totals`` also ``"grad.totals"``, the sum over calls of the pre-clip norm and each
        call's, computed on the device."""
        if level <= TelemetryLevel.OFF or self.calls == 0:
            return {}
        self._fold()
        assert self._hist is not None
        out = {PREFIX + "stats": self._hist, **self._pieces}
        if self.device_totals:
            rows = self._rows = self._device_rows()
            n = rows[:, 0]
            n0 = torch.where(n != -math.inf, n, 0.0)  # absent -> 0, NaN stays NaN
            totals = (n0 * n0).sum(1).sqrt()  # (C,): the pre-clip norm clip_grad_norm_ computes
            # the sum over calls is taken here once, so that build() and rank_sums() agree to the bit
            self._total_sum = totals.sum().unsqueeze(0)
            out[PREFIX + "totals"] = torch.cat([self._total_sum, totals])
        return out

    def rank_sums(self) -> torch.Tensor:
        """(3,) on the device, after :meth:`pending` with ``device_totals`` set: the sum over calls of
        the pre-clip total norm and the NaN and Inf element estimates, as :meth:`build` computes them.
        For what must be reduced across ranks before the transfer (torch.distributed); a few dozen
        kernels, no sync."""
        rows, total_sum = self._rows, self._total_sum
        if rows is None or total_sum is None:
            raise RuntimeError("rank_sums() needs device_totals = True before pending()")
        n, x, k_inf, k_nan = rows.unbind(1)
        scale = to_device(torch.tensor(self._call_scales, dtype=rows.dtype), rows.device)
        has_nan = n.isnan()
        has_inf = (x == math.inf) & ~has_nan
        total = total_sum[0]
        inf_est = torch.maximum((k_inf * scale).round() * (has_inf | has_nan), has_inf.to(rows.dtype)).sum()
        nan_est = torch.maximum((k_nan * scale).round() * has_nan, has_nan.to(rows.dtype)).sum()
        return torch.stack([total, nan_est, inf_est])

    def _sample(self, b: _Bucket, gs: list[torch.Tensor], round_index: int) -> torch.Tensor:
        """This call's sample of bucket ``b``: a private (S,) copy of the examined elements, binned in
        the fold; with ``sample_size=None`` the (P_b, nb) counts of every element, binned now (a
        deferred copy would be the whole gradient)."""
        if b.slot_offset is None:  # every element: one pass per tensor, no concatenated copy
            nb = self._nb
            rows = []
            for g in gs:
                bits = g.reshape(-1).view(b.int_dtype)
                idx = categorize(bits & b.mask, b.lut, b.boundaries)
                rows.append(count_categories(idx, nb, b.device))
            return torch.stack(rows)
        views = []
        for g, (offset, stride, count) in zip(gs, self._round_plan(b, round_index)):
            if g.is_contiguous():  # one strided view (half the dispatch cost of reshape + slice)
                views.append(g.as_strided((count,), (stride,), g.storage_offset() + offset))
            else:
                views.append(g.reshape(-1)[offset : offset + count * stride : stride])
        return torch.cat(views)  # a copy: clipping or zeroing the gradients later cannot change it
