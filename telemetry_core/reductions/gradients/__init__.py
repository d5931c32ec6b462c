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

Modules: ``categories`` (the sample and the magnitude categories), ``groups`` (parameter groups),
``plan`` (buckets and their device constants), ``reducer`` (the protocol and the per-backward work),
``fold`` (the end-of-update device reduction), ``host`` (the statistics on the host).
"""

from __future__ import annotations

from telemetry_core.reductions.gradients.categories import (
    AUTO_SAMPLE,
    MIN_PER_PARAM,
    ROTATION,
    categorize,
    category_boundaries,
    category_lut,
    sample_plan,
)
from telemetry_core.reductions.gradients.groups import default_groups, resolve_groups
from telemetry_core.reductions.gradients.host import NONFINITE_NAMES, PREFIX
from telemetry_core.reductions.gradients.plan import FLAT_MAX, FOLD_EVERY, PAD_MAX
from telemetry_core.reductions.gradients.reducer import GradientReducer

__all__ = [
    "AUTO_SAMPLE",
    "FLAT_MAX",
    "FOLD_EVERY",
    "MIN_PER_PARAM",
    "NONFINITE_NAMES",
    "PAD_MAX",
    "PREFIX",
    "ROTATION",
    "GradientReducer",
    "categorize",
    "category_boundaries",
    "category_lut",
    "default_groups",
    "resolve_groups",
    "sample_plan",
]
