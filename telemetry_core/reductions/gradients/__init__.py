"""Gradient statistics after backward, before clipping, computed on the device with no host sync.

What is computed, and from which elements
-----------------------------------------
Exact, from every element of every gradient, on every observed backward:

* per-parameter L2 norm (``torch._foreach_norm``, float32 accumulation, one fused pass) and from it
  the pre-clip total norm (as ``clip_grad_norm_`` computes it), the clip flag, group norms, their
  sqrt(numel)-normalised values and ratios, and the vanishing / exploding parameter counts;
* per-parameter max |g| (``aminmax`` or ``_foreach_abs`` + ``_foreach_max`` on CPU,
  ``_foreach_norm(ord=inf)`` on CUDA: one more pass);
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

Why a sample: an exact histogram of every element costs many times the L2 pass by itself (every
per-element binning kernel is slow on CPU), and exact NaN, Inf and zero counts one or more passes
each, against a target of 3x the bare norm for everything. So the design keeps what is exact *and*
cheap (two passes: L2 norms and max |g|) and bins a sample whose cost does not grow with the model.
``sample_size=None`` bins every element; the tests compare it with float64 references. The
measurements behind these choices are in BENCHMARKS.md (gradient statistics).

One pass for all categories: |x| is monotone in the float's bit pattern with the sign bit cleared,
so one ``bucketize`` of ``bits & 0x7F..F`` against the edges' bit patterns (each rounded *up* into
the gradient's dtype, so ``|g| >= edge`` holds exactly) sorts every element into zero, (0, e0),
[e0, e1), ..., [e_last, inf), +-inf or NaN at once, for float16, bfloat16, float32 and float64, on
CPU and CUDA (``bincount`` on CPU; ``index_add_`` on CUDA, whose ``bincount`` syncs to size its output).

Per call vs per update: ``observe`` does only what must read this backward's gradients. Per
(device, dtype) bucket: one fused ``_foreach_norm``, the extremes, one ``stack`` of them, and a
private copy of the sample (one strided view per tensor and one ``cat``). On CPU the extremes are
one ``aminmax`` per tensor of at least ``BIG_TENSOR`` elements (its vectorised path; the read
dominates the dispatch) and one ``_foreach_abs`` + ``_foreach_max`` for all the smaller ones, so the
dispatches per backward grow with the model's size, not with its number of tensors (besides the
sample's views); on CUDA one fused ``_foreach_norm(inf)``. A CPU bucket of at most ``FLAT_MAX``
elements is copied flat in one dispatch instead and reduced in the fold. The fold (in ``pending``,
or every ``FOLD_EVERY`` calls, which bounds the memory the samples hold) bins the samples of every
call at once and hands each bucket's rows of norms and extremes and its sampled Inf / NaN counts to
the update's one transfer, unconverted and in bucket order. Every other reduction (max |g| from the
extremes, parameter order, totals, clip rate, groups, vanishing/exploding, NaN/Inf estimates, which
tensors hold NaN/Inf) runs on the host in ``build``, vectorised in float64 numpy over (calls x
parameters) arrays: on the device each of those small operations is a kernel launch, which on CPU
after the gradient passes costs more than the numpy operation.

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
