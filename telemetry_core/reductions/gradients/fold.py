"""The end-of-update device fold of the gradient reducer: the calls stored by ``observe`` reduced to
what crosses to the host (per call and parameter: L2 norm, max |g|, sampled Inf and NaN counts; the
histogram summed over calls), including the small CPU buckets' norms, extremes and samples taken from
their flat copies."""

from __future__ import annotations

import math

import torch

from telemetry_core.reductions.gradients.categories import _HALF, ROTATION, categorize, count_categories
from telemetry_core.reductions.gradients.plan import _Bucket, _Call
from telemetry_core.reductions.transfer import accumulation_dtype, to_device

__all__: list[str] = []


class _DeviceFold:
    """Reduces the stored calls on the device, a few kernels per plan whatever the number of calls."""

    params: list[torch.nn.Parameter]
    _nb: int
    _home: torch.device | None
    _calls: list[_Call]
    _kept: int
    _hist: torch.Tensor | None
    _rows: list[torch.Tensor]
    _call_scales: list[list[float]]

    def _fold(self) -> None:
        """Reduce the stored calls to what crosses to the host (all on the device): per call and
        parameter the L2 norm, max |g| and the sampled Inf / NaN counts, and the histogram summed
        over calls. A few kernels per plan, whatever the number of calls (binning the samples of
        every call included)."""
        if not self._calls:
            return
        assert self._home is not None
        home = self._home
        calls, self._calls = self._calls, []
        self._kept = 0
        by_plan: dict[int, list[int]] = {}
        for i, call in enumerate(calls):
            by_plan.setdefault(id(call.plan), []).append(i)
        parts = [self._per_param([calls[i] for i in idx], home) for idx in by_plan.values()]
        if len(parts) == 1:
            n, x, k = parts[0]
        else:  # the present gradients changed within the update: back to call order
            order = [i for idx in by_plan.values() for i in idx]
            position = [0] * len(order)
            for pos, i in enumerate(order):
                position[i] = pos
            perm = to_device(torch.tensor(position, dtype=torch.int64), home)
            n, x, k = (torch.cat(list(t)).index_select(0, perm) for t in zip(*parts))
        acc = accumulation_dtype(home)
        hist = k.sum((0, 1)).to(acc)
        self._hist = hist if self._hist is None else self._hist + hist
        # (C, 4, P): norms (-inf: no gradient), max |g|, sampled Inf and NaN counts
        self._rows.append(torch.stack([n.to(acc), x.to(acc), k[..., -2].to(acc), k[..., -1].to(acc)], 1))
        self._call_scales.extend(call.plan.scale_host for call in calls)

    def _per_param(
        self, calls: list[_Call], home: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(norms, max |g|, category counts), each (C, P, ...) in parameter order, for calls that
        share one plan. Norms are -inf and max |g| 0 where a parameter had no gradient."""
        plan = calls[0].plan
        c = len(calls)
        norm_parts, max_parts, cat_parts = [], [], []
        for bi, b in enumerate(plan.buckets):
            p_b = len(b.indices)
            if b.small:
                norms_b, max_b, cats_b = self._small_stats(b, calls, bi)
                norm_parts.append(norms_b)
                max_parts.append(max_b)
                cat_parts.append(cats_b)
                continue
            v = calls[0].vecs[bi].unsqueeze(0) if c == 1 else torch.stack([call.vecs[bi] for call in calls])
            if v.device != home or v.dtype != torch.float32:
                v = v.to(home, torch.float32, non_blocking=True)
            norm_parts.append(v[:, :p_b])
            max_parts.append(v[:, p_b:].reshape(c, p_b, b.width).abs().amax(-1))
            kept = [call.samples[bi] for call in calls]
            s = kept[0].unsqueeze(0) if c == 1 else torch.stack(kept)  # type: ignore[arg-type,union-attr]
            cats = s if b.slot_offset is None else self._bin(b, s)  # None: counts binned per call
            cat_parts.append(cats if b.device == home else cats.to(home, non_blocking=True))
        n = norm_parts[0] if len(norm_parts) == 1 else torch.cat(norm_parts, 1)
        x = max_parts[0] if len(max_parts) == 1 else torch.cat(max_parts, 1)
        k = cat_parts[0] if len(cat_parts) == 1 else torch.cat(cat_parts, 1)
        if not plan.identity:  # scatter into parameter order; -inf marks "no gradient this call"
            n_params, index = len(self.params), plan.param_index
            n = torch.full((c, n_params), -math.inf, device=home).index_copy_(1, index, n)
            x = torch.zeros(c, n_params, device=home).index_copy_(1, index, x)
            k = torch.zeros(c, n_params, self._nb, dtype=torch.int64, device=home).index_copy_(1, index, k)
        return n, x, k

    def _small_stats(
        self, b: _Bucket, calls: list[_Call], bi: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C, P_b) norms, (C, P_b) max |g| and (C, P_b, nb) category counts of a small bucket from
        its C flat copies, ~20 kernels for the whole fold: the tensors of at most PAD_MAX elements
        gathered into one padded (C, tensors, longest) block and reduced at once, each larger one
        by itself."""
        flats = [call.vecs[bi] for call in calls]
        f = flats[0].unsqueeze(0) if len(flats) == 1 else torch.stack(flats)  # (C, N_b)
        c = f.shape[0]
        acc = {"dtype": torch.float32} if b.dtype in _HALF else {}
        norms, highs, lows = [], [], []
        if b.pad is not None:
            index, keep = b.pad  # (P_pad, L) positions in the flat copy, and which are real
            block = f.index_select(1, index.view(-1)).view(c, *index.shape)
            highs.append(block.amax(2))  # the padding repeats real elements: harmless for extremes
            lows.append(block.amin(2))
            norms.append(torch.linalg.vector_norm(torch.where(keep, block, 0.0), dim=2, **acc))
        for start, n in b.alone:
            part = f[:, start : start + n]
            norms.append(torch.linalg.vector_norm(part, dim=1, keepdim=True, **acc))
            highs.append(part.amax(dim=1, keepdim=True))  # amax and amin apart: aminmax over one
            lows.append(part.amin(dim=1, keepdim=True))  # dimension is ~25x slower on CPU
        norm, high, low = (
            parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in (norms, highs, lows)
        )
        largest = torch.stack((high, low), dim=2).abs().amax(2)  # max |g|; NaN wherever a NaN is
        if b.order is not None:  # back to the bucket's tensor order
            norm, largest = norm.index_select(1, b.order), largest.index_select(1, b.order)
        if b.flat_index is None:  # every element
            sample = f
        else:  # each call's rotated sample, exactly as sample_plan picks it
            first = calls[0].round_index
            rounds = [call.round_index for call in calls]
            if rounds == [(first + k) % ROTATION for k in range(len(calls))]:  # consecutive: a view
                index = b.flat_index[first : first + len(calls)]
            else:  # calls of another plan came between: pick the rows
                index = b.flat_index.index_select(0, to_device(torch.tensor(rounds), f.device))
            sample = f.gather(1, index)
        return norm.to(torch.float32), largest.to(torch.float32), self._bin(b, sample)

    def _bin(self, b: _Bucket, samples: torch.Tensor) -> torch.Tensor:
        """(C, P_b, nb) category counts of the (C, S) sampled elements of C calls: one categorisation
        and one count for all of them (slot = call * P_b * nb + parameter * nb + category)."""
        assert b.slot_offset is not None
        c, nb, p_b = samples.shape[0], self._nb, len(b.indices)
        idx = categorize(samples.view(b.int_dtype) & b.mask, b.lut, b.boundaries) + b.slot_offset
        if c > 1:
            idx += torch.arange(0, c * p_b * nb, p_b * nb, dtype=idx.dtype, device=b.device).unsqueeze(1)
        return count_categories(idx.view(-1), c * p_b * nb, b.device).view(c, p_b, nb)

    # -- per call ---------------------------------------------------------------------------------
