"""Sampling and magnitude categories of gradient elements (public so tests and tools can reproduce
exactly what was binned): which elements a backward examines, and the bit-pattern tables that sort
every examined magnitude into zero, the histogram bins, +-inf or NaN in one pass."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "AUTO_SAMPLE",
    "MIN_PER_PARAM",
    "ROTATION",
    "categorize",
    "category_boundaries",
    "category_lut",
    "count_categories",
    "sample_plan",
]

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


def count_categories(idx: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """(n,) int64 occurrences of each index in ``idx``, without a host sync on any device."""
    if device.type == "cpu":
        return torch.bincount(idx, minlength=n)
    # CUDA bincount reads the max index back to size its output (a sync); index_add_ does not.
    ones = torch.ones_like(idx, dtype=torch.int64)
    return torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, idx, ones)
