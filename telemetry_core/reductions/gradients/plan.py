"""Plans of the gradient reducer: present gradients bucketed by (device, dtype), and what each bucket's
per-backward work and end-of-update fold need on the device, prepared once per pattern of present
gradients and cached."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from telemetry_core.reductions.gradients.categories import _BITS, ROTATION, sample_plan
from telemetry_core.reductions.transfer import to_device

__all__ = ["BIG_TENSOR", "FLAT_MAX", "FOLD_EVERY", "PAD_MAX", "SMALL_FOLD_ELEMENTS"]


@dataclass
class _Bucket:
    """Present gradients of one (device, dtype): indices into the parameter list, in order."""

    device: torch.device
    dtype: torch.dtype
    indices: list[int]
    numels: list[int]
    boundaries: torch.Tensor  # category boundaries as the dtype's integer bit patterns, on device
    int_dtype: torch.dtype
    mask: int
    slot_offset: torch.Tensor | None  # slot * nb of every element binned in the fold, on device
    rounds: dict[int, list[tuple[int, int, int]]]  # sample plans by round % ROTATION
    # The fold hands over one row per call and bucket, reduced on the host: the bucket's k-th tensor
    # has L2 norm row[norm_col[k]] and max |g| = max(|row[ext_a[k]]|, |row[ext_b[k]]|). Per call, a
    # large bucket's row is [norms, extremes]: on CPU (min, max) of each tensor of at least BIG_TENSOR
    # elements (one aminmax each), then max |g| of the smaller ones (one foreach abs and one foreach
    # max for all of them); on CUDA max |g| of each (one fused foreach norm). A small bucket's row,
    # from the fold: [norms, maxima, minima] in the order they are computed (padded block first).
    big: list[int]  # bucket positions of the CPU tensors reduced by aminmax
    rest: list[int]  # ... and of the CPU tensors reduced by foreach abs + max
    norm_col: np.ndarray
    ext_a: np.ndarray
    ext_b: np.ndarray
    cols: np.ndarray  # ``indices`` as an array, for the host
    small: bool  # a small CPU bucket: observe() keeps one flat copy, the fold does the rest (FLAT_MAX)
    starts: list[int]  # where each tensor starts in the bucket's flat copy
    flat_index: torch.Tensor | None  # small sampled buckets: sample positions in the flat copy by round
    pad: tuple[torch.Tensor, torch.Tensor] | None  # small buckets: padded block of the tensors <= PAD_MAX
    alone: list[tuple[int, int]]  # small buckets: (start, numel) of the tensors reduced one by one
    lut: tuple[int, torch.Tensor, torch.Tensor] | None  # binade tables of category_lut, on device


@dataclass
class _Plan:
    """One pattern of present gradients: everything that can be prepared once and cached."""

    home: torch.device
    present: list[int]  # parameter indices in bucket order (the order of the per-call vectors)
    skipped: list[int]  # parameters without a usable gradient: None, or not strided (sparse)
    buckets: list[_Bucket]
    identity: bool  # present == range(P): per-call vectors need no scatter
    param_index: torch.Tensor  # present position -> parameter index (home device)
    scale_host: list[float]  # (P,): numel / examined elements per parameter (0 if absent)
    numel: int  # elements of all present parameters
    examined: int  # elements binned per call
    graph: bool  # some gradient requires grad (a create_graph backward)
    small_numel: int  # elements the small buckets copy per call


@dataclass
class _Call:
    """What one observe() call leaves for the fold, per bucket of its plan: nothing reduced yet.

    ``vecs[b]``: one stacked vector per bucket, ``[L2 norms (P_b), extremes]`` (see ``_Bucket.big``
    for the extremes' layout). ``samples[b]``:
    a private copy of the sampled elements (sampled mode; binned in the fold) or the ``(P_b, nb)``
    category counts already binned (every-element mode, where a copy would be the whole gradient).
    A small bucket keeps only ``vecs[b]``, the flat copy of its gradients (``samples[b]`` is None).
    """

    plan: _Plan
    vecs: list[torch.Tensor]
    samples: list[torch.Tensor | None]
    round_index: int


@dataclass
class _Folded:
    """Calls of one plan reduced by a fold: where they stand in the update's call order, and under
    which names each bucket's rows (``key + "v"``: C x the bucket's row) and sampled Inf / NaN counts
    (``key + "k"``: C x P_b x 2) wait for the transfer."""

    plan: _Plan
    positions: np.ndarray
    keys: list[str]


FOLD_EVERY = 64  # calls kept as rows before they are folded (bounds memory on long updates)
# A CPU bucket of at most this many elements is "small": observe() makes ONE dispatch, a flat copy
# of its gradients, and the fold computes norms, extremes and the sample from the copies, a few
# reductions per tensor per update instead of per backward. Inside a training step a CPU dispatch
# costs ~5-20 us, more for the first of each kind after the loop's own work (cold caches), so a
# dozen small tensors' per-call kernels cost far more than copying their elements (~0.1 ns each);
# past 2**17 elements per-element work dominates and the general path, which reads each gradient
# twice and copies only the sample, is cheaper. The copies are kept until the fold, at most
# SMALL_FOLD_ELEMENTS elements (16 MiB in float32) before an early one.
FLAT_MAX = 1 << 17
SMALL_FOLD_ELEMENTS = 1 << 22
PAD_MAX = 1024  # small-bucket tensors up to this size are reduced together, zero-padded
# In a CPU bucket past FLAT_MAX, a tensor of at least this many elements gets its own aminmax (one
# vectorised pass: the read dominates its dispatch); the smaller ones share one foreach abs and one
# foreach max, so the dispatches per backward grow with the model's size, not its tensor count.
BIG_TENSOR = 1 << 15


class _Planner:
    """Per (device, dtype) bucket plans of the reducer, cached by the pattern of present gradients:
    which tensors are reduced how, and every index or constant the device needs, built once."""

    params: list[torch.nn.Parameter]
    names: list[str]
    numels: list[int]
    sample_size: int | None
    _home: torch.device | None
    _nb: int
    _bounds: dict[torch.dtype, list[int]]
    _luts: dict[torch.dtype, tuple[int, torch.Tensor, torch.Tensor] | None]

    def _round_plan(self, b: _Bucket, round_index: int) -> list[tuple[int, int, int]]:
        plan = b.rounds.get(round_index)
        if plan is None:
            plan = b.rounds[round_index] = sample_plan(b.numels, self.sample_size, round_index)
        return plan

    def _make_plan(self, grads: list[torch.Tensor | None]) -> _Plan:
        """Buckets by (device, dtype) and device constants for one pattern of present gradients."""
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        skipped = []
        for i, g in enumerate(grads):
            if g is None or g.layout != torch.strided:  # sparse gradients: a counted skip, not a crash
                skipped.append(i)
                continue
            if g.numel() == 0:
                continue
            if g.shape != self.params[i].shape:
                raise ValueError(
                    f"{self.names[i]}.grad has shape {tuple(g.shape)}, its parameter {tuple(self.params[i].shape)}"
                )
            if g.dtype not in _BITS:
                raise TypeError(f"{self.names[i]}.grad has dtype {g.dtype}; expected a float type")
            by_key.setdefault((g.device, g.dtype), []).append(i)
        present = [i for idx in by_key.values() for i in idx]
        home = self._home or (next(iter(by_key))[0] if by_key else torch.device("cpu"))
        buckets = []
        scale = [0.0] * len(self.params)
        examined = 0
        for (device, dtype), idx in by_key.items():
            int_dtype, mask = _BITS[dtype]
            numels = [self.numels[i] for i in idx]
            counts = [c for _, _, c in sample_plan(numels, self.sample_size, 0)]
            for i, n, c in zip(idx, numels, counts):
                scale[i] = n / c
            examined += sum(counts)
            small = device.type == "cpu" and sum(numels) <= FLAT_MAX
            starts = [sum(numels[:k]) for k in range(len(numels))]
            slot_offset = None
            if self.sample_size is not None or small:  # every binned element's (tensor * nb) slot
                slots = torch.arange(len(idx), dtype=torch.int32) * self._nb
                slot_offset = to_device(torch.repeat_interleave(slots, torch.tensor(counts)), device)
            flat_index = None
            if small and self.sample_size is not None:  # every round's sample, as sample_plan picks it;
                # rows ROTATION.. repeat the first ones, so FOLD_EVERY consecutive rounds are one slice
                rounds = [
                    sample_plan(numels, self.sample_size, r % ROTATION) for r in range(ROTATION + FOLD_EVERY)
                ]
                offsets = torch.tensor([[offset for offset, _, _ in plan] for plan in rounds])  # (R, P_b)
                base = torch.cat([start + stride * torch.arange(count) for start, (_, stride, count) in
                                  zip(starts, rounds[0])])  # fmt: skip
                tensor_of = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(counts))
                flat_index = to_device(base + offsets.index_select(1, tensor_of), device)
            pad = None
            position = list(range(len(numels)))  # column of each tensor in the reduced row
            alone: list[tuple[int, int]] = []
            if small:  # tensors of at most PAD_MAX elements are reduced together, zero-padded
                padded = [k for k, n in enumerate(numels) if n <= PAD_MAX]
                if len(padded) < 2:
                    padded = []
                alone = [(starts[k], numels[k]) for k in range(len(numels)) if k not in padded]
                if padded:
                    longest = max(numels[k] for k in padded)
                    span = torch.arange(longest)
                    lengths = torch.tensor([numels[k] for k in padded]).unsqueeze(1)
                    first = torch.tensor([starts[k] for k in padded]).unsqueeze(1)
                    keep = span < lengths  # (P_pad, L)
                    index = first + torch.minimum(span, lengths - 1)  # padding repeats the last element
                    pad = (to_device(index, device), to_device(keep, device))
                computed = padded + [k for k in range(len(numels)) if k not in padded]
                position = [computed.index(k) for k in range(len(numels))]
            bounds = to_device(torch.tensor(self._bounds[dtype], dtype=int_dtype), device)
            tables = self._luts[dtype]
            lut = None
            if tables is not None:
                lut = (tables[0], to_device(tables[1], device), to_device(tables[2], device))
            big: list[int] = []
            rest: list[int] = []
            p_b = len(numels)
            norm_col = np.asarray(position, dtype=np.int64)
            if small:
                ext_a, ext_b = norm_col + p_b, norm_col + 2 * p_b
            elif device.type == "cpu":
                big = [k for k, n in enumerate(numels) if n >= BIG_TENSOR]
                rest = [k for k in range(p_b) if k not in big]
                ext_a = np.empty(p_b, dtype=np.int64)
                ext_a[big] = np.arange(p_b, p_b + 2 * len(big), 2)
                ext_a[rest] = np.arange(p_b + 2 * len(big), p_b + 2 * len(big) + len(rest))
                ext_b = ext_a.copy()
                ext_b[big] += 1
            else:
                ext_a = ext_b = norm_col + p_b
            buckets.append(
                _Bucket(
                    device, dtype, idx, numels, bounds, int_dtype, mask, slot_offset, {}, big, rest, norm_col, ext_a, ext_b, np.asarray(idx),
                    small, starts, flat_index, pad, alone, lut,
                )
            )  # fmt: skip
        return _Plan(
            home=home,
            present=present,
            skipped=skipped,
            buckets=buckets,
            identity=present == list(range(len(self.params))),
            param_index=to_device(torch.tensor(present, dtype=torch.int64), home),
            scale_host=scale,
            numel=sum(self.numels[i] for i in present),
            examined=examined,
            graph=any(grads[i].requires_grad for i in present),  # type: ignore[union-attr]
            small_numel=sum(sum(b.numels) for b in buckets if b.small),
        )
