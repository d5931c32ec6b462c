"""Gradient statistics after backward, before clipping, computed on the device with no host sync.

What is computed, and from which elements
-----------------------------------------
Exact, from every element of every gradient, on every observed backward:

* per-parameter L2 norm (``torch._foreach_norm``, float32 accumulation, one fused pass) and from it
  the pre-clip total norm (as ``clip_grad_norm_`` computes it), the clip flag, group norms, their
  sqrt(numel)-normalised values and ratios, and the vanishing / exploding parameter counts;
* per-parameter max |g| (``aminmax`` on CPU, ``_foreach_norm(ord=inf)`` on CUDA: one more pass);
* which tensors hold a NaN (their L2 norm is NaN) or an Inf (their max |g| is inf): ``nan_params``
  / ``inf_params``. A tensor holding both counts as NaN (its max |g| is NaN).

From a bounded, systematic sample (every element with ``sample_size=None``): the magnitude
histogram, the zero fraction and the NaN / Inf *element* counts. Each parameter contributes every
``stride``-th element (all of it or at least ``MIN_PER_PARAM``, else its share of ``sample_size``),
from an offset that rotates with every call, so successive backwards examine different elements.
Element counts are scaled to the tensor with exactness where it matters: a tensor without NaN
reports exactly 0 (its norm says so), one with a NaN at least 1, one examined in full or entirely NaN
the exact count. ``examined_elements`` / ``total_elements`` say how much was binned. The default
``sample_size="auto"`` is numel/512 clamped to [4096, 32768] elements per backward.

Why a sample, and why this shape (measured on this project's 2-core AMD EPYC CPU, float32)
----------------------------------------------------------------------------------------
In units of one bare ``torch._foreach_norm`` pass over the same 10M-45M elements: ``aminmax`` 0.6-1.5,
``amax`` 1.1, ``count_nonzero`` 1.1-2.1, ``_foreach_norm(ord=inf)`` 3.9-10 and ``ord=0`` 1.5-4.6
(their CPU paths are not vectorised), an elementwise op into a reused buffer (compare, bitwise and,
``nan_to_num``) 2-3, ``isnan().sum()`` 10, and every per-element binning kernel 20-58:
``torch.histogram`` 31-50, ``torch.histc`` 19-37, ``torch.bucketize`` 29-58; ``torch.compile`` of the
whole set fused into one kernel 11-14 after 15-52 s of compilation. An exact histogram of every
element thus costs 20x by itself, and exact NaN, Inf and zero counts 2-4x each, against a target of
3x for everything. So the design keeps what is exact *and* cheap (two passes: L2 norms and max |g|)
and bins a sample whose cost does not grow with the model (about 12 ns per sampled element).
``sample_size=None`` bins every element (31-61x bare in benchmarks/bench_gradients.py); the tests compare
it with float64 references.
Interleaving the norm and ``aminmax`` per 256K-element chunk so the second read hits cache saved
~0.25x single-threaded but collapsed with two threads on a loaded machine: rejected.

One pass for all categories: |x| is monotone in the float's bit pattern with the sign bit cleared,
so one ``bucketize`` of ``bits & 0x7F..F`` against the edges' bit patterns (each rounded *up* into
the gradient's dtype, so ``|g| >= edge`` holds exactly) sorts every element into zero, (0, e0),
[e0, e1), ..., [e_last, inf), +-inf or NaN at once, for float16, bfloat16, float32 and float64, on
CPU and CUDA (``bincount`` on CPU; ``index_add_`` on CUDA, whose ``bincount`` syncs to size its output).

Per call vs per update: ``observe`` does only what must read this backward's gradients. Per
(device, dtype) bucket: one fused ``_foreach_norm``, the extremes (one ``aminmax`` per tensor on CPU,
its vectorised path; one fused ``_foreach_norm(inf)`` on CUDA), one ``stack`` of them, and a private
copy of the sample (one strided view per tensor and one ``cat``): 4 + 2 per tensor dispatches on
CPU, 5 + 1 per tensor on CUDA, no reduction. Binning the samples of every call (one
categorisation and one count for all of them) runs on the device in ``pending`` (or every
``FOLD_EVERY`` calls, which bounds the memory the samples hold), which then hands over, in the
update's one transfer, the histogram and 4 numbers per parameter per call (L2 norm, max |g|, the
sampled Inf and NaN counts). Every reduction over parameters and calls (totals, clip rate, groups,
vanishing/exploding, NaN/Inf estimates, which tensors hold NaN/Inf) runs on the host in ``build``,
vectorised in float64 numpy over those (calls x parameters) arrays: on the device each of those few
dozen small operations was a kernel launch (~80 per update, the largest cost of a one-backward
update of a 1M-parameter model). Figures: BENCHMARKS.md (``benchmarks/bench_gradients.py``). The
histogram's binning is the largest per-element part of what remains
for a small model: about 12 ns per sampled element, ``sample_size`` elements per backward.

Precision: norms accumulate in float32 (``_foreach_norm(..., dtype=torch.float32)`` for float16 and
bfloat16, so squares that overflow float16 do not), never through a float64 copy of the gradients;
like ``clip_grad_norm_``, a gradient above ~1.8e19 has a square beyond float32 and an inf norm.
Gradients are grouped by (device, dtype) like ``torch.nn.utils.clip_grad_norm_``.

Parameters whose ``.grad`` is None (frozen, or unused by that backward) or sparse are skipped and counted in
``skipped_params``; their per-parameter norm is the mean over the calls that had a gradient, NaN when
none did (not measured: neither zero nor vanishing), and they add nothing to total and group norms,
exactly as ``clip_grad_norm_`` ignores them. A call in which no parameter has a gradient is not a
call (observe before backward). Zero-element parameters are ignored (norm NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors  # one dispatch for the copy of a whole bucket (DDP uses it)

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.transfer import accumulation_dtype
from telemetry_core.schema import GradientStats

__all__ = [
    "AUTO_SAMPLE",
    "FLAT_MAX",
    "MIN_PER_PARAM",
    "GradientReducer",
    "categorize",
    "category_boundaries",
    "category_lut",
    "default_groups",
    "resolve_groups",
    "sample_plan",
]

PREFIX = "grad."
# Elements binned per backward for histogram / zero / NaN / Inf counts with sample_size="auto":
# numel // AUTO_SAMPLE[0], clamped to [AUTO_SAMPLE[1], AUTO_SAMPLE[2]] (about 12 ns per element).
AUTO_SAMPLE = (512, 4096, 32768)
ROTATION = 64  # sample offsets repeat after this many calls (their plans are cached)
MIN_PER_PARAM = 32  # every parameter contributes at least this many elements (or all of them)

# Integer views and magnitude masks for the float dtypes: |x| is monotone in (bits & mask).
_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFF_FFFF),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF),
}
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def _prefix_matches(name: str, prefix: str) -> bool:
    """Module-name prefix: ``"actor"`` and ``"actor."`` match ``actor.0.weight``, not ``actor_head.w``."""
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def resolve_groups(
    named_params: Sequence[tuple[str, torch.Tensor]],
    spec: Mapping[str, Any],
) -> dict[str, list[int]]:
    """Turn the user's group spec into ``name -> indices into named_params``.

    Each value is an iterable of parameters (matched by identity), a module-name prefix string
    (``"actor"`` or ``"actor."``) or a list of prefixes. Raises ValueError naming the group when a
    spec matches nothing or names a tensor that is not a parameter of the model; TypeError when a
    value is of the wrong kind. Groups may overlap; order within a group follows ``named_params``.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"groups must be a mapping of group name -> parameters or prefixes, got {type(spec)!r}"
        )
    names = [n for n, _ in named_params]
    by_id = {id(p): i for i, (_, p) in enumerate(named_params)}
    out: dict[str, list[int]] = {}
    for group, value in spec.items():
        if not isinstance(group, str) or not group:
            raise TypeError(f"groups keys must be non-empty strings, got {group!r}")
        if isinstance(value, str):
            value = [value]
        if isinstance(value, torch.Tensor):
            value = [value]
        if not isinstance(value, Iterable):
            raise TypeError(
                f"groups[{group!r}] must be parameters or module-name prefixes, got {type(value)!r}"
            )
        items = list(value)
        if not items:
            raise ValueError(f"groups[{group!r}] is empty")
        if all(isinstance(v, str) for v in items):
            chosen = [i for i, n in enumerate(names) if any(_prefix_matches(n, pre) for pre in items)]
            if not chosen:
                tops = sorted({n.split(".", 1)[0] for n in names})
                raise ValueError(
                    f"groups[{group!r}]: prefix {items if len(items) > 1 else items[0]!r} matches no parameter "
                    f"(top-level modules: {', '.join(tops[:12])})"
                )
        elif all(isinstance(v, torch.Tensor) for v in items):
            chosen_set: set[int] = set()
            for v in items:
                index = by_id.get(id(v))
                if index is None:
                    raise ValueError(
                        f"groups[{group!r}] names a tensor of shape {tuple(v.shape)} that is not a parameter "
                        "of the model"
                    )
                chosen_set.add(index)
            chosen = sorted(chosen_set)
        else:
            raise TypeError(f"groups[{group!r}] mixes prefixes and tensors; give one kind")
        out[group] = chosen
    return out


def default_groups(named_params: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[int]]:
    """One group per top-level module (``lstm``, ``actor``, ``critic``, ``heads`` ...).

    Used when the user gives no groups: it is the split an RL engineer looks at first. A model
    with a single top-level module gets no groups (the group would equal the whole model).
    """
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named_params):
        groups.setdefault(name.split(".", 1)[0], []).append(i)
    return groups if len(groups) > 1 else {}


# --------------------------------------------------------------------------------------------
# Sampling and categories (public so tests and tools can reproduce exactly what was binned)
# --------------------------------------------------------------------------------------------


def sample_plan(
    numels: Sequence[int], sample_size: int | None, round_index: int
) -> list[tuple[int, int, int]]:
    """``(offset, stride, count)`` per tensor: elements ``offset + k * stride`` for ``k < count``.

    Each tensor gets its share of ``sample_size`` (at least ``MIN_PER_PARAM`` elements or all of
    them); the count per tensor is fixed for a given set of sizes and the offset rotates with
    ``round_index`` so successive calls examine different elements. ``sample_size=None``: all.
    """
    total = sum(numels)
    plan = []
    for i, n in enumerate(numels):
        if sample_size is None or n == 0:
            plan.append((0, 1, n))
            continue
        quota = max(min(n, MIN_PER_PARAM), (sample_size * n) // max(total, 1))
        stride = max(1, n // max(quota, 1))
        count = n // stride
        # Low-discrepancy rotation (golden-ratio Weyl sequence) over the residues of the stride;
        # max index offset + (count-1)*stride <= stride-1 + (n//stride - 1)*stride <= n-1.
        offset = int(((round_index * 0.6180339887498949 + i * 0.7548776662466927) % 1.0) * stride)
        plan.append((offset, stride, count))
    return plan


def _ceil_bits(edge: float, dtype: torch.dtype) -> int:
    """Bit pattern of the smallest value of ``dtype`` that is >= ``edge`` (edge > 0)."""
    int_dtype, _ = _BITS[dtype]
    t = torch.tensor(edge, dtype=torch.float64).to(dtype)
    bits = int(t.view(int_dtype).item())  # construction time only, never in the hot path
    if math.isinf(edge):
        return bits
    if float(t) < edge:
        bits += 1  # next representable magnitude up (also turns an underflowed 0 into the min subnormal)
    return bits


def category_boundaries(edges: Sequence[float], dtype: torch.dtype) -> list[int]:
    """Bit-pattern boundaries for ``bucketize(bits & mask, boundaries, right=True)``.

    Category index = number of boundaries <= the magnitude bits: 0 zero, 1 (0, e0), 2 [e0, e1), ...,
    ``len(edges) + 1`` [e_last, inf), ``len(edges) + 2`` +-inf, ``len(edges) + 3`` NaN.
    """
    if dtype not in _BITS:
        raise TypeError(
            f"gradient dtype {dtype} is not a supported float type (float16/bfloat16/float32/float64)"
        )
    inf_bits = _ceil_bits(math.inf, dtype)
    return [1, *(_ceil_bits(e, dtype) for e in edges), inf_bits, inf_bits + 1]


# Mantissa bits per dtype: ``bits >> MANTISSA`` is the binade (the biased exponent) of a magnitude.
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def category_lut(
    boundaries: Sequence[int], dtype: torch.dtype
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Per-binade tables that categorise a magnitude with two lookups instead of a binary search.

    For each binade e (``bits >> shift``, ``shift`` = the dtype's mantissa bits): ``above[e]`` = 1 +
    the boundaries <= the binade's first bit pattern, ``inner[e]`` = the one boundary strictly
    inside the binade (or the dtype's largest bit pattern, which only the top binade holds, and its
    NaN boundary is always inside). Then ``category = above[e] - (bits < inner[e])``, exactly what
    ``bucketize(bits, boundaries, right=True)`` gives, provided no binade holds two boundaries; None
    otherwise (e.g. float16, whose subnormal binade holds several of the default edges). On CPU
    ``bucketize`` costs ~12-20 ns per element, this ~3-4. Tables on the host, in the bits' dtype.
    """
    int_dtype = _BITS[dtype][0]
    shift = _MANTISSA[dtype]
    binades = 1 << (int_dtype.itemsize * 8 - 1 - shift)
    largest = (1 << (int_dtype.itemsize * 8 - 1)) - 1
    above, inner = [], []
    for e in range(binades):
        start, end = e << shift, (e + 1) << shift
        inside = [b for b in boundaries if start < b < end]
        if len(inside) > 1:
            return None
        above.append(1 + sum(1 for b in boundaries if b <= start))
        inner.append(inside[0] if inside else largest)
    return shift, torch.tensor(above, dtype=int_dtype), torch.tensor(inner, dtype=int_dtype)


def categorize(
    bits: torch.Tensor, lut: tuple[int, torch.Tensor, torch.Tensor] | None, boundaries: torch.Tensor
) -> torch.Tensor:
    """int64 category of every magnitude bit pattern (``bits & mask``): by the binade tables of
    :func:`category_lut` (on the bits' device) or, without them, ``bucketize``; int32 or the bits' dtype."""
    if lut is None:
        return torch.bucketize(bits, boundaries, right=True, out_int32=True)
    shift, above, inner = lut
    flat = bits.reshape(-1)
    binade = flat >> shift  # index_select takes int32 indices too: no int64 copy (int16 it does not)
    if binade.dtype == torch.int16:
        binade = binade.int()
    # bits >= inner as 0/1 without a bool tensor (whose mixed-dtype add costs a conversion pass):
    # both are non-negative, so bits - inner cannot overflow and its sign bit is "bits < inner".
    below_inner = (flat - inner.index_select(0, binade)) >> (bits.element_size() * 8 - 1)
    return (above.index_select(0, binade) + below_inner).view(bits.shape)


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------


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
    width: int  # extremes per tensor in the per-call vector: 2 (CPU min, max) or 1 (max |g|)
    small: bool  # a small CPU bucket: observe() keeps one flat copy, the fold does the rest (FLAT_MAX)
    starts: list[int]  # where each tensor starts in the bucket's flat copy
    flat_index: torch.Tensor | None  # small sampled buckets: sample positions in the flat copy by round
    pad: tuple[torch.Tensor, torch.Tensor] | None  # small buckets: padded block of the tensors <= PAD_MAX
    alone: list[tuple[int, int]]  # small buckets: (start, numel) of the tensors reduced one by one
    order: torch.Tensor | None  # small buckets: bucket position of each computed column, if reordered
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

    ``vecs[b]``: one stacked vector per bucket, ``[L2 norms (P_b), extremes (P_b * width)]`` where the
    extremes are ``(min, max)`` pairs (CPU ``aminmax``) or max |g| (CUDA, width 1). ``samples[b]``:
    a private copy of the sampled elements (sampled mode; binned in the fold) or the ``(P_b, nb)``
    category counts already binned (every-element mode, where a copy would be the whole gradient).
    A small bucket keeps only ``vecs[b]``, the flat copy of its gradients (``samples[b]`` is None).
    """

    plan: _Plan
    vecs: list[torch.Tensor]
    samples: list[torch.Tensor | None]
    round_index: int


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
NONFINITE_NAMES = 16  # GradientStats.nonfinite_params lists at most this many names


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host constant -> device without a blocking copy (pinned, non_blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class GradientReducer:
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
        self._vanish_thr = thresholds.grad_vanishing_rel * self.max_grad_norm
        self._explode_thr = thresholds.grad_exploding_rel * self.max_grad_norm
        self._edges = tuple(float(e) for e in thresholds.grad_hist_edges)
        self._nb = len(self._edges) + 4  # zero, (0,e0), ..., [e_last,inf), inf, nan
        # Bit-pattern boundaries per dtype, computed here so observe() never reads tensor values.
        self._bounds = {dt: category_boundaries(self._edges, dt) for dt in _BITS}
        self._luts = {dt: category_lut(self._bounds[dt], dt) for dt in _BITS}
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._round = 0  # sampling rotation, continued across updates
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
        self._total_sum: torch.Tensor | None = None  # (1,) sum over calls of the total norm (pending)
        self._rows: list[torch.Tensor] = []  # per fold, (C, 4, P): see _fold
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
            if b.width == 2:  # CPU: aminmax is one vectorised pass; _foreach_norm(inf) is 4-10x slower
                extremes = [t for g in gs for t in torch.aminmax(g)]
            else:  # one fused multi-tensor kernel
                extremes = torch._foreach_norm(gs, math.inf)
            vecs.append(torch.stack([*norms, *extremes]))  # promotes half extremes to float32: exact
            samples.append(self._sample(b, gs, round_index))
        return vecs, samples

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        """``{"grad.stats": vector}`` with what the update's statistics are reduced from (empty if none)."""
        if level <= TelemetryLevel.OFF or self.calls == 0:
            return {}
        self._fold()
        assert self._hist is not None
        rows = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        n = rows[:, 0]
        n0 = torch.where(n != -math.inf, n, 0.0)  # absent -> 0, NaN stays NaN
        totals = (n0 * n0).sum(1).sqrt()  # (C,): the pre-clip norm clip_grad_norm_ computes
        # the sum over calls is taken here once, so that build() and rank_sums() agree to the bit
        self._total_sum = totals.sum().unsqueeze(0)
        return {PREFIX + "stats": torch.cat([self._hist, self._total_sum, totals, rows.reshape(-1)])}

    def rank_sums(self) -> torch.Tensor:
        """(3,) on the device, after :meth:`pending`: the sum over calls of the pre-clip total norm
        and the NaN and Inf element estimates, as :meth:`build` computes them. For what must be
        reduced across ranks before the transfer (torch.distributed); a dozen kernels, no sync."""
        assert self._rows and self._total_sum is not None
        rows = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        n, x, k_inf, k_nan = rows.unbind(1)
        scale = _to_device(torch.tensor(self._call_scales, dtype=rows.dtype), rows.device)
        has_nan = n.isnan()
        has_inf = (x == math.inf) & ~has_nan
        total = self._total_sum[0]
        inf_est = torch.maximum((k_inf * scale).round() * (has_inf | has_nan), has_inf.to(rows.dtype)).sum()
        nan_est = torch.maximum((k_nan * scale).round() * has_nan, has_nan.to(rows.dtype)).sum()
        return torch.stack([total, nan_est, inf_est])

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

    # -- the per-update reduction -----------------------------------------------------------------
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
            perm = _to_device(torch.tensor(position, dtype=torch.int64), home)
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
                index = b.flat_index.index_select(0, _to_device(torch.tensor(rounds), f.device))
            sample = f.gather(1, index)
        return norm.to(torch.float32), largest.to(torch.float32), self._bin(b, sample)

    def _round_plan(self, b: _Bucket, round_index: int) -> list[tuple[int, int, int]]:
        plan = b.rounds.get(round_index)
        if plan is None:
            plan = b.rounds[round_index] = sample_plan(b.numels, self.sample_size, round_index)
        return plan

    def _bin(self, b: _Bucket, samples: torch.Tensor) -> torch.Tensor:
        """(C, P_b, nb) category counts of the (C, S) sampled elements of C calls: one categorisation
        and one count for all of them (slot = call * P_b * nb + parameter * nb + category)."""
        assert b.slot_offset is not None
        c, nb, p_b = samples.shape[0], self._nb, len(b.indices)
        idx = categorize(samples.view(b.int_dtype) & b.mask, b.lut, b.boundaries) + b.slot_offset
        if c > 1:
            idx += torch.arange(0, c * p_b * nb, p_b * nb, dtype=idx.dtype, device=b.device).unsqueeze(1)
        return self._count(idx.view(-1), c * p_b * nb, b.device).view(c, p_b, nb)

    # -- per call ---------------------------------------------------------------------------------
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
                rows.append(self._count(idx, nb, b.device))
            return torch.stack(rows)
        views = []
        for g, (offset, stride, count) in zip(gs, self._round_plan(b, round_index)):
            if g.is_contiguous():  # one strided view (half the dispatch cost of reshape + slice)
                views.append(g.as_strided((count,), (stride,), g.storage_offset() + offset))
            else:
                views.append(g.reshape(-1)[offset : offset + count * stride : stride])
        return torch.cat(views)  # a copy: clipping or zeroing the gradients later cannot change it

    @staticmethod
    def _count(idx: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return torch.bincount(idx, minlength=n)
        # CUDA bincount reads the max index back to size its output (a sync); index_add_ does not.
        ones = torch.ones_like(idx, dtype=torch.int64)
        return torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, idx, ones)

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
                slot_offset = _to_device(torch.repeat_interleave(slots, torch.tensor(counts)), device)
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
                flat_index = _to_device(base + offsets.index_select(1, tensor_of), device)
            pad = order = None
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
                    pad = (_to_device(index, device), _to_device(keep, device))
                computed = padded + [k for k in range(len(numels)) if k not in padded]
                if computed != list(range(len(numels))):
                    position = [computed.index(k) for k in range(len(numels))]
                    order = _to_device(torch.tensor(position), device)
            bounds = _to_device(torch.tensor(self._bounds[dtype], dtype=int_dtype), device)
            tables = self._luts[dtype]
            lut = None
            if tables is not None:
                lut = (tables[0], _to_device(tables[1], device), _to_device(tables[2], device))
            width = 2 if device.type == "cpu" else 1
            buckets.append(
                _Bucket(
                    device, dtype, idx, numels, bounds, int_dtype, mask, slot_offset, {}, width,
                    small, starts, flat_index, pad, alone, order, lut,
                )
            )  # fmt: skip
        return _Plan(
            home=home,
            present=present,
            skipped=skipped,
            buckets=buckets,
            identity=present == list(range(len(self.params))),
            param_index=_to_device(torch.tensor(present, dtype=torch.int64), home),
            scale_host=scale,
            numel=sum(self.numels[i] for i in present),
            examined=examined,
            graph=any(grads[i].requires_grad for i in present),  # type: ignore[union-attr]
            small_numel=sum(sum(b.numels) for b in buckets if b.small),
        )
