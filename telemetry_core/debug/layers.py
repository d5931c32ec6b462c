"""The per-layer gradient table: exact statistics of every element, a fixed number of kernels per backward.

Per backward the gradients of one (device, dtype) bucket are copied with one ``_foreach_copy_`` into a
persistent (chunks, ``CHUNK``) buffer in which every parameter starts on a chunk boundary (the cells
after its last element, "padding", stay 0). Every statistic is then a row reduction over chunks
followed by one ``index_add_`` / ``scatter_reduce_`` from chunks to parameters, so the number of
dispatches per backward does not depend on the number of parameter tensors:

Slab by slab (``SLAB_ROWS`` chunks, so the scratch stays in cache between the pass that writes it
and the reductions that read it), per chunk:

* five counts from ``|g|`` by a comparison into a scratch buffer and a float row sum (exact: a chunk
  holds 1024 elements, far below float32's 2**24): ``== 0``, ``< small``, ``> large``, ``== inf``,
  NaN. Padding is subtracted afterwards (a host constant per parameter);
* the finite part (non-finite elements as 0) into the scratch buffer, then its sum, L2 norm, min
  and max. The copy itself stays raw.

Taking non-finite elements as 0 keeps sums exact; for min and max a 0 could stand in for a NaN,
so the chunks where it can matter are recomputed from the raw copy with a mask: every parameter's last chunk (it
holds the padding) and up to ``MIXED_CHUNKS`` chunks that hold both non-finite and non-zero finite
elements, found with ``topk`` on the device. Beyond that many mixed chunks, min and max may include
a 0 in place of a NaN (a tensor with NaN scattered over more than 64k elements). Chunks with no
finite element contribute nothing.

Cost (thread CPU time, one thread, float32, LSTM-shaped sets of 10M and 40M parameters; BENCHMARKS.md):
about 12-13 passes of a bare ``torch._foreach_norm`` per examined backward (3 elementwise passes,
5 comparisons, 9 row reductions), against 116-195 for the former loop of ~20 kernels per parameter
tensor. Memory: one buffer of the bucket's size (float32; float64 for float64 gradients) and two
slab-sized scratch buffers.

Because even that is many times a NORMAL backward, the table examines every ``every``-th backward
of the run (a counter that continues across updates; ``every="auto"`` is 1 up to
``AUTO_ELEMENTS`` gradient elements and grows with the model above it). The L2 norm of every
parameter, the pre-clip total norm and which parameters hold a NaN/Inf are taken on *every*
backward (one fused ``_foreach_norm``), whether the table examines it or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from telemetry_core.reductions.transfer import accumulation_dtype, to_device
from telemetry_core.schema import LayerRow

__all__ = ["AUTO_ELEMENTS", "CHUNK", "MIXED_CHUNKS", "LayerTable", "float32_norms"]

CHUNK = 1024
MIXED_CHUNKS = 64
# ``every="auto"``: the table examines every ceil(elements / AUTO_ELEMENTS)-th backward, which keeps its
# average cost per backward at a few bare norm passes at any model size (~13 when it runs).
AUTO_ELEMENTS = 1 << 21
# Columns summed from chunks into parameters (then over the examined backwards of the update).
_SUM, _SUMSQ, _ZERO, _SMALL, _LARGE, _NAN, _INF = range(7)
_NS = 7
# Rows of the per-chunk results: counts of |g| == 0, < small, > large, == inf, NaN; then the
# finite part's sum, L2 norm, max and min.
_R_ZERO, _R_SMALL, _R_LARGE, _R_INF, _R_NAN, _R_SUM, _R_NORM, _R_MAX, _R_MIN = range(9)
SLAB_ROWS = 256  # chunks per slab: 1 MiB of float32 scratch, which stays in cache
_HALF = (torch.float16, torch.bfloat16)


def float32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms as float32 with fused ``_foreach_norm`` calls (half inputs accumulate in
    float32, so fp16 gradients cannot overflow; float64 ones are reduced in float64, then cast)."""
    wide = [i for i, g in enumerate(grads) if g.dtype == torch.float64]
    if not wide:
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    out: list[torch.Tensor | None] = [None] * len(grads)
    narrow = [i for i in range(len(grads)) if grads[i].dtype != torch.float64]
    if narrow:
        for i, n in zip(narrow, torch._foreach_norm([grads[i] for i in narrow], 2, dtype=torch.float32)):
            out[i] = n
    for i, n in zip(wide, torch._foreach_norm([grads[i] for i in wide], 2)):
        out[i] = n.to(torch.float32)
    return [n for n in out if n is not None]


@dataclass
class _Bucket:
    """The present gradients of one (device, dtype) and the buffers they are copied into."""

    device: torch.device
    positions: list[int]  # positions of its gradients in the list observe() is given
    members: list[int]  # the parameters (indices into the table's) those gradients belong to
    x: torch.Tensor  # (chunks, CHUNK): the copy
    a: torch.Tensor  # (SLAB_ROWS, CHUNK): |g| of one slab
    scratch: torch.Tensor  # (SLAB_ROWS, CHUNK): comparisons, then the finite part, of one slab
    res: torch.Tensor  # (9, chunks): per-chunk results (_R_*)
    views: list[torch.Tensor]  # per member, a view of ``x`` shaped like its gradient
    owner: torch.Tensor  # (chunks,) int64: member position of each chunk
    lengths: torch.Tensor  # (chunks,) int64: real (non-padding) cells of each chunk
    tails: torch.Tensor  # (members,) int64: each member's last chunk
    pads: torch.Tensor  # (members,) padding cells of each member, accumulation dtype
    member_index: torch.Tensor  # (members,) int64: ``members`` on the device
    span: torch.Tensor  # (CHUNK,) int64: 0..CHUNK-1


class LayerTable:
    """Accumulates the per-layer statistics of the examined backwards of one update, on the device."""

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        small: float,
        large: float,
        every: int | str = "auto",
    ) -> None:
        self.names = list(names)
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.small = float(small)
        self.large = float(large)
        if every == "auto":
            every = max(1, math.ceil(sum(self.numels) / AUTO_ELEMENTS))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"table_every must be a positive int or 'auto', got {every!r}")
        self.every = every
        self._counter = 0  # backwards seen by the run, for the schedule
        self._buckets: dict[tuple[object, ...], list[_Bucket]] = {}
        self.device = torch.device("meta")
        self.reset()

    def reset(self) -> None:
        dev = self.params[0].device if self.params else torch.device("cpu")
        if dev != self.device:
            self.device = dev
            self._buckets.clear()
        self.dtype = accumulation_dtype(dev)
        p = len(self.params)
        self.grad_calls = [0] * p  # per parameter: backwards of the update that had its gradient
        self.table_calls = [0] * p  # ... of which the table examined
        self.backwards = 0  # examined backwards of this update
        self._norms: torch.Tensor | None = None  # (P, 3): sum and max of per-call norms, non-finite calls
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self._sums: torch.Tensor | None = None  # (P, _NS)
        self._min: torch.Tensor | None = None  # (P,)
        self._max: torch.Tensor | None = None

    def due(self) -> bool:
        """Whether the table examines the coming backward (advances the run's schedule)."""
        due = self._counter % self.every == 0
        self._counter += 1
        return due

    # ------------------------------------------------------------------------------------------
    def observe(self, present: list[int], grads: list[torch.Tensor]) -> torch.Tensor:
        """Fold one backward's gradients (``grads[k]`` belongs to parameter ``present[k]``).

        Every backward: the per-parameter L2 norms (returned, float32, in ``present`` order). Every
        ``every``-th backward of the run, also the table's statistics of every element.
        """
        norms = torch.stack(float32_norms(grads))
        if norms.device != self.device:
            norms = norms.to(self.device, non_blocking=True)
        key_p = tuple(present)
        index = self._index.get(key_p)
        if index is None:
            index = self._index[key_p] = to_device(torch.tensor(present, dtype=torch.int64), self.device)
        wide = norms.to(self.dtype)
        if self._norms is None:
            self._norms = torch.zeros(len(self.params), 3, dtype=self.dtype, device=self.device)
            self._norms[:, 1] = -math.inf
        acc = self._norms
        acc[:, 0].index_add_(0, index, wide)
        acc[:, 1].scatter_reduce_(0, index, wide, "amax")
        acc[:, 2].index_add_(0, index, (~wide.isfinite()).to(self.dtype))
        for i in present:
            self.grad_calls[i] += 1
        if self.due():
            self._examine(present, grads)
        return norms

    def _examine(self, present: list[int], grads: list[torch.Tensor]) -> None:
        key = tuple((i, g.dtype, g.device) for i, g in zip(present, grads))
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = self._buckets[key] = self._make_buckets(present, grads)
        for b in buckets:
            self._observe_bucket(b, [grads[k] for k in b.positions])
        for i in present:
            self.table_calls[i] += 1
        self.backwards += 1

    def _observe_bucket(self, b: _Bucket, gs: list[torch.Tensor]) -> None:
        x, a, scratch, res = b.x, b.a, b.scratch, b.res
        torch._foreach_copy_(b.views, gs)  # one call; widens half gradients to float32 exactly
        comparisons = (
            (torch.eq, 0.0),
            (torch.lt, self.small),
            (torch.gt, self.large),
            (torch.eq, math.inf),
        )
        # Slab by slab so the scratch stays in cache between the pass that writes it and the row
        # reductions that read it (measured ~2x faster than whole-buffer passes on a CPU).
        n_chunks = x.shape[0]
        for r0 in range(0, n_chunks, SLAB_ROWS):
            r1 = min(n_chunks, r0 + SLAB_ROWS)
            xs, a_s, s_s = x[r0:r1], a[: r1 - r0], scratch[: r1 - r0]
            torch.abs(xs, out=a_s)
            for col, (op, threshold) in enumerate(comparisons):
                op(a_s, threshold, out=s_s)  # exact 0/1; a row sums to at most CHUNK
                torch.sum(s_s, 1, out=res[_R_ZERO + col, r0:r1])
            torch.ne(a_s, a_s, out=s_s)  # NaN
            torch.sum(s_s, 1, out=res[_R_NAN, r0:r1])
            torch.nan_to_num(xs, 0.0, 0.0, 0.0, out=s_s)  # finite part; the copy stays raw
            torch.sum(s_s, 1, out=res[_R_SUM, r0:r1])
            torch.linalg.vector_norm(s_s, dim=1, out=res[_R_NORM, r0:r1])
            torch.amax(s_s, 1, out=res[_R_MAX, r0:r1])
            torch.amin(s_s, 1, out=res[_R_MIN, r0:r1])
        zero, _, _, inf, nan, s1, q, mx, mn = res.unbind(0)
        # Chunks whose min/max a 0 in place of a NaN/Inf, or padding, could have changed, redone from
        # the raw copy with a mask: each member's last chunk (its padding) and the chunks holding
        # both non-finite and non-zero finite values (at most MIXED_CHUNKS of them, worst first).
        bad = nan + inf
        mixed = (bad > 0).to(x.dtype) * (CHUNK - zero - bad)
        k = min(MIXED_CHUNKS, n_chunks)
        rows = torch.cat([b.tails, torch.topk(mixed, k, sorted=False).indices])
        vals = x.index_select(0, rows)
        valid = vals.isfinite() & (b.span < b.lengths.index_select(0, rows).unsqueeze(1))
        fix_max = torch.where(valid, vals, -math.inf).amax(1)
        fix_min = torch.where(valid, vals, math.inf).amin(1)
        mx = mx.index_copy(0, rows, fix_max)  # duplicates hold the same exact value
        mn = mn.index_copy(0, rows, fix_min)
        # a chunk with no finite element has no min/max (its 0 would stand in for a NaN/Inf)
        fin = b.lengths.to(x.dtype) - bad
        mx = torch.where(fin > 0, mx, -math.inf)
        mn = torch.where(fin > 0, mn, math.inf)
        counts = res[_R_ZERO : _R_NAN + 1]  # zero, small, large, inf, NaN
        acc = self.dtype
        cols = torch.cat([s1.unsqueeze(0), q.square().unsqueeze(0), counts[:3], counts[4:5], counts[3:4]]).T
        cols = cols.to(acc)
        n_b = len(b.members)
        per = torch.zeros(n_b, _NS, dtype=acc, device=b.device).index_add_(0, b.owner, cols)
        per[:, _ZERO] -= b.pads  # padding cells are 0: counted as zero and as small
        per[:, _SMALL] -= b.pads
        hi = torch.full((n_b,), -math.inf, dtype=acc, device=b.device)
        hi = hi.scatter_reduce(0, b.owner, mx.to(acc), "amax")
        lo = torch.full((n_b,), math.inf, dtype=acc, device=b.device)
        lo = lo.scatter_reduce(0, b.owner, mn.to(acc), "amin")
        if b.device != self.device:
            per, hi, lo = (t.to(self.device, non_blocking=True) for t in (per, hi, lo))
        index = b.member_index if b.device == self.device else b.member_index.to(self.device)
        if self._sums is None or self._min is None or self._max is None:
            p = len(self.params)
            self._sums = torch.zeros(p, _NS, dtype=acc, device=self.device)
            self._max = torch.full((p,), -math.inf, dtype=acc, device=self.device)
            self._min = torch.full((p,), math.inf, dtype=acc, device=self.device)
        self._sums.index_add_(0, index, per)
        self._max.scatter_reduce_(0, index, hi, "amax")
        self._min.scatter_reduce_(0, index, lo, "amin")

    def _make_buckets(self, present: list[int], grads: list[torch.Tensor]) -> list[_Bucket]:
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, g in enumerate(grads):
            by_key.setdefault((g.device, g.dtype), []).append(k)
        out = []
        for (device, dtype), ks in by_key.items():
            buf_dtype = torch.float32 if dtype in _HALF else dtype
            if buf_dtype == torch.float64 and accumulation_dtype(device) != torch.float64:
                buf_dtype = torch.float32
            chunks_of = [max(1, math.ceil(grads[k].numel() / CHUNK)) for k in ks]
            total = sum(chunks_of)
            x = torch.zeros(total, CHUNK, dtype=buf_dtype, device=device)
            slab = min(SLAB_ROWS, total)
            flat = x.view(-1)
            views, owner, lengths, tails, pads = [], [], [], [], []
            start = 0
            for pos, (k, n_chunks) in enumerate(zip(ks, chunks_of)):
                n = grads[k].numel()
                views.append(flat[start * CHUNK : start * CHUNK + n].view(grads[k].shape))
                owner += [pos] * n_chunks
                lengths += [CHUNK] * (n_chunks - 1) + [n - (n_chunks - 1) * CHUNK]
                tails.append(start + n_chunks - 1)
                pads.append(n_chunks * CHUNK - n)
                start += n_chunks
            acc = accumulation_dtype(device)
            out.append(
                _Bucket(
                    device=device,
                    positions=ks,
                    members=[present[k] for k in ks],
                    x=x,
                    a=torch.empty(slab, CHUNK, dtype=buf_dtype, device=device),
                    scratch=torch.empty(slab, CHUNK, dtype=buf_dtype, device=device),
                    res=torch.empty(9, total, dtype=buf_dtype, device=device),
                    views=views,
                    owner=to_device(torch.tensor(owner, dtype=torch.int64), device),
                    lengths=to_device(torch.tensor(lengths, dtype=torch.int64), device),
                    tails=to_device(torch.tensor(tails, dtype=torch.int64), device),
                    pads=to_device(torch.tensor(pads, dtype=acc), device),
                    member_index=to_device(torch.tensor([present[k] for k in ks], dtype=torch.int64), device),
                    span=torch.arange(CHUNK, device=device),  # made on the device: no copy
                )
            )
        return out

    # ------------------------------------------------------------------------------------------
    def pending(self) -> dict[str, torch.Tensor]:
        """``layer.norms`` (P x 3), and after an examined backward ``layer.sums`` (P x 7: sum, sum of
        squares, zero, small, large, NaN, Inf elements) and ``layer.minmax`` (P x 2)."""
        out: dict[str, torch.Tensor] = {}
        if self._norms is not None:
            out["layer.norms"] = self._norms
        if self._sums is not None and self._min is not None and self._max is not None:
            out["layer.sums"] = self._sums
            out["layer.minmax"] = torch.stack([self._min, self._max], 1)
        return out

    def build(self, host: Mapping[str, Sequence[float]], prefix: str) -> list[LayerRow]:
        """One row per parameter from the transferred values (host side)."""
        norms = host.get(prefix + "layer.norms")
        sums = host.get(prefix + "layer.sums")
        minmax = host.get(prefix + "layer.minmax")
        rows = []
        nan = math.nan
        for j, name in enumerate(self.names):
            numel, calls, examined = self.numels[j], self.grad_calls[j], self.table_calls[j]
            row = LayerRow(
                name=name, numel=numel, norm=nan, mean=nan, std=nan, min=nan, max=nan,
                zero_frac=nan, small_frac=nan, large_frac=nan, nan=0, inf=0, calls=calls,
            )  # fmt: skip
            if calls and norms is not None:
                row.norm = norms[3 * j] / calls
                row.norm_max = norms[3 * j + 1]
            if examined and sums is not None and minmax is not None:
                s = sums[_NS * j : _NS * (j + 1)]
                total = numel * examined
                n_nan, n_inf = round(s[_NAN]), round(s[_INF])
                fin = total - n_nan - n_inf
                row.nan, row.inf = n_nan, n_inf
                row.zero_frac = s[_ZERO] / total
                row.small_frac = (s[_SMALL] - s[_ZERO]) / total
                row.large_frac = (s[_LARGE] - s[_INF]) / total
                if fin > 0:
                    row.mean = s[_SUM] / fin
                    row.std = math.sqrt(max(s[_SUMSQ] - s[_SUM] * s[_SUM] / fin, 0.0) / fin)
                    row.min, row.max = minmax[2 * j], minmax[2 * j + 1]
            rows.append(row)
        return rows

    def nonfinite(self, host: Mapping[str, Sequence[float]], prefix: str) -> list[bool]:
        """Per parameter: a NaN/Inf gradient in some backward of the update (its norm says so on
        every backward; the table's counts on the examined ones)."""
        norms = host.get(prefix + "layer.norms")
        sums = host.get(prefix + "layer.sums")
        out = []
        for j in range(len(self.names)):
            bad = norms is not None and norms[3 * j + 2] > 0
            if sums is not None:
                bad = bad or sums[_NS * j + _NAN] > 0 or sums[_NS * j + _INF] > 0
            out.append(bool(bad))
        return out
