"""The end-of-update device fold of the gradient reducer: the calls stored by ``observe`` reduced to
what crosses to the host (per call and parameter: L2 norm, max |g|, sampled Inf and NaN counts; the
histogram summed over calls), including the small CPU buckets' norms, extremes and samples taken from
their flat copies."""

from __future__ import annotations

import math

import numpy as np
import torch

from telemetry_core.reductions.gradients.categories import _HALF, ROTATION, categorize, count_categories
from telemetry_core.reductions.gradients.host import PREFIX
from telemetry_core.reductions.gradients.plan import _Bucket, _Call, _Folded
from telemetry_core.reductions.transfer import accumulation_dtype, to_device

__all__: list[str] = []

LUT_MIN = 8192


class _DeviceFold:
    """Reduces the stored calls on the device, a few kernels per plan whatever the number of calls."""

    params: list[torch.nn.Parameter]
    _nb: int
    _home: torch.device | None
    _calls: list[_Call]
    _kept: int
    _hist: torch.Tensor | None
    _pieces: dict[str, torch.Tensor]
    _folded: list[_Folded]
    _call_scales: list[list[float]]

    def _fold(self) -> None:
        """Reduce the stored calls to what crosses to the host, on the device, per plan and bucket: the
        calls' rows of norms and extremes stacked, their samples binned (one categorisation and one
        count for all of them), the histogram summed, the sampled Inf / NaN counts kept. Nothing is
        converted, scattered into parameter order or reduced over parameters here: the transfer's one
        ``cat`` converts, and the host (``build``) does the rest, where each of those small
        operations costs a fraction of a kernel launch."""
        if not self._calls:
            return
        assert self._home is not None
        home = self._home
        calls, self._calls = self._calls, []
        self._kept = 0
        first = len(self._call_scales)
        by_plan: dict[int, list[int]] = {}
        for i, call in enumerate(calls):
            by_plan.setdefault(id(call.plan), []).append(i)
        for idx in by_plan.values():
            group = [calls[i] for i in idx]
            keys = self._reduce(group, home, f"{PREFIX}{len(self._folded)}.")
            self._folded.append(_Folded(group[0].plan, np.asarray(idx, dtype=np.int64) + first, keys))
        self._call_scales.extend(call.plan.scale_host for call in calls)

    def _reduce(self, calls: list[_Call], home: torch.device, prefix: str) -> list[str]:
        """Rows and counts of calls that share one plan, stored in ``_pieces`` under the returned
        names (one per bucket); the histogram added to ``_hist``."""
        plan = calls[0].plan
        c = len(calls)
        keys = []
        for bi, b in enumerate(plan.buckets):
            if b.small:
                v, cats = self._small_stats(b, calls, bi)
            else:
                v = calls[0].vecs[bi] if c == 1 else torch.stack([call.vecs[bi] for call in calls])
                kept = [call.samples[bi] for call in calls]
                s = kept[0] if c == 1 else torch.stack(kept)  # type: ignore[arg-type]
                assert s is not None
                # with sample_size=None the counts were binned per call
                cats = s.view(c, len(b.indices), self._nb) if b.slot_offset is None else self._bin(b, s, c)
            if b.device != home:
                v, cats = v.to(home, non_blocking=True), cats.to(home, non_blocking=True)
            hist = cats.sum((0, 1))
            self._hist = hist if self._hist is None else self._hist + hist
            key = f"{prefix}{bi}."
            self._pieces[key + "v"] = v
            self._pieces[key + "k"] = cats[..., -2:]  # sampled Inf and NaN counts
            keys.append(key)
        return keys

    def _device_rows(self) -> torch.Tensor:
        """(C, 4, P) on the device, in call and parameter order: L2 norm (-inf: no gradient), max
        |g|, sampled Inf and NaN counts; what the host assembles in ``build``, for what must be
        reduced on the device before the transfer (``rank_sums``)."""
        home = self._home
        assert home is not None and self._folded
        acc = accumulation_dtype(home)
        n_params = len(self.params)
        parts, order = [], []
        for folded in self._folded:
            plan, c = folded.plan, len(folded.positions)
            ns, xs, ks = [], [], []
            for b, key in zip(plan.buckets, folded.keys):
                v = self._pieces[key + "v"].reshape(c, -1).to(acc)
                ns.append(v.index_select(1, to_device(torch.from_numpy(b.norm_col), home)))
                e = v.abs()
                xs.append(
                    torch.maximum(
                        e.index_select(1, to_device(torch.from_numpy(b.ext_a), home)),
                        e.index_select(1, to_device(torch.from_numpy(b.ext_b), home)),
                    )
                )
                ks.append(self._pieces[key + "k"].to(acc))
            n, x, k = (t[0] if len(t) == 1 else torch.cat(t, 1) for t in (ns, xs, ks))
            if not plan.identity:  # scatter into parameter order; -inf marks "no gradient this call"
                index = plan.param_index
                n = torch.full((c, n_params), -math.inf, dtype=acc, device=home).index_copy_(1, index, n)
                x = torch.zeros(c, n_params, dtype=acc, device=home).index_copy_(1, index, x)
                k = torch.zeros(c, n_params, 2, dtype=acc, device=home).index_copy_(1, index, k)
            parts.append(torch.cat([n.unsqueeze(1), x.unsqueeze(1), k.transpose(1, 2)], 1))
            order.extend(folded.positions.tolist())
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):  # the present gradients changed within the update: call order
            rows = rows.index_select(0, to_device(torch.tensor(np.argsort(order)), home))
        return rows

    def _small_stats(self, b: _Bucket, calls: list[_Call], bi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, 3 P_b) rows of norms, maxima and minima, and (C, P_b, nb) category counts of a small
        bucket from its C flat copies, ~20 kernels for the whole fold: the tensors of at most PAD_MAX elements
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
        row = torch.cat(norms + highs + lows, dim=1)  # see _Bucket.norm_col for the columns
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
        return row, self._bin(b, sample, c)

    def _bin(self, b: _Bucket, samples: torch.Tensor, c: int) -> torch.Tensor:
        """(C, P_b, nb) category counts of the (C, S) sampled elements of C calls ((S,) for one call):
        one categorisation and one count for all of them (slot = call * P_b * nb + parameter * nb +
        category)."""
        assert b.slot_offset is not None
        nb, p_b = self._nb, len(b.indices)
        # The binade tables cost ~9 dispatches and ~3-4 ns per element, bucketize one dispatch and
        # ~12-20 ns: below LUT_MIN elements (one backward's default sample) bucketize is cheaper.
        lut = b.lut if samples.numel() >= LUT_MIN else None
        idx = categorize(samples.view(b.int_dtype) & b.mask, lut, b.boundaries) + b.slot_offset
        if c > 1:
            idx += torch.arange(0, c * p_b * nb, p_b * nb, dtype=idx.dtype, device=b.device).unsqueeze(1)
        return count_categories(idx.view(-1), c * p_b * nb, b.device).view(c, p_b, nb)

    # -- per call ---------------------------------------------------------------------------------
