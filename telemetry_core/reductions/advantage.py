"""Advantage and return distributions, and the input checks and distribution helpers the other reducers share.

Advantages are small tensors (one rollout, one minibatch), so every statistic here is computed in
float64 on the device: an extra elementwise pass over a few thousand values costs nothing next to a
forward pass, and it makes moments up to the fourth exact enough to compare with numpy to ~1e-12.

Moments are accumulated per *group* (the rollout, or one minibatch) as power sums about the group's
own mean (a two-pass, well-conditioned computation) and merged across groups once, in
:func:`merge_moment_rows`, by the exact binomial re-centring formula (Chan et al. / Pébay). Merging
many minibatches therefore gives the same result as one big batch, up to float64 rounding.

Percentiles use :func:`quantiles`, which sorts on the device and interpolates linearly exactly like
``numpy.quantile`` (method "linear"). ``torch.quantile`` is not used: it refuses inputs of more than
2**24 elements. Above ``max_exact`` elements (default 2**20) the percentiles are computed on a
uniform sample of ``max_exact`` elements drawn with replacement by a seeded ``torch.Generator`` (the
sample size is reported, so a sampled percentile is never passed off as exact).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.transfer import accumulation_dtype
from telemetry_core.schema import AdvantageStats, Moments, ReturnStats

__all__ = [
    "FOLD_ELEMENTS",
    "MOMENT_ROW",
    "QUANTILE_MAX_EXACT",
    "AdvantageReducer",
    "MomentAccumulator",
    "QuantileSampler",
    "ScalarSeries",
    "acc_dtype",
    "as_int",
    "as_real",
    "check_float_tensor",
    "check_same_layout",
    "merge_moment_rows",
    "moment_row",
    "moment_rows",
    "moments",
    "moments_from_host",
    "nan_max",
    "quantiles",
]

QUANTILE_MAX_EXACT = 1 << 20
# Per-minibatch inputs are kept as private copies until pending(); more stored elements
# than this are reduced early (to a few floats per chunk), which bounds the memory of huge updates.
FOLD_ELEMENTS = 1 << 20

# Layout of a moment row: one group's count, pivot (its mean), power sums of (x - pivot) of order
# 1..4, min, max, count of x > 0, count of NaN, plain sum (the mean's fallback when x holds +-inf).
MOMENT_ROW = ("n", "pivot", "s1", "s2", "s3", "s4", "min", "max", "n_pos", "n_nan", "sum")
# Layout of a merged moment vector (what crosses to the host).
_MERGED = ("n", "mean", "m2", "m3", "m4", "min", "max", "n_pos", "n_nan")


# ---------------------------------------------------------------------------------------------
# Input checks: a clear error naming the argument instead of a crash deep inside torch.
# ---------------------------------------------------------------------------------------------


def _number(name: str, value: object) -> object:
    """``value`` with a 0-d numpy array unwrapped to its scalar; TypeError naming the argument unless
    it is then a real number (bools and tensors are refused: a tensor would have to be read on the
    host, a device sync, and a bool is almost always the wrong argument)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        hint = " (reading a tensor would sync the device: pass a Python or numpy number)" if isinstance(
            value, torch.Tensor
        ) else ""
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}{hint}")
    return value


def as_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as a Python int. Python and numpy integers are accepted (``np.int64(3)``, what
    gymnasium's ``Discrete.n`` is, or a 0-d integer array); a non-number is a TypeError and a
    number that is not a whole integer (1.5, and 2.0 too: an epoch or a count arriving as a float is
    usually the wrong variable) or one below ``minimum`` a ValueError, each naming the argument."""
    if type(value) is not int:  # the common case costs one type() check
        value = _number(name, value)
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def as_real(name: str, value: object, *, minimum: float | None = None, above: float | None = None) -> float:
    """``value`` as a finite Python float. Python and numpy numbers are accepted (``np.float32(0.2)``,
    ``np.int64(1)``, a 0-d array); a non-number is a TypeError; NaN, an infinity, a value below
    ``minimum`` or not above ``above`` a ValueError, each naming the argument."""
    out = value if type(value) is float else float(_number(name, value))  # type: ignore[arg-type]
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    if above is not None and out <= above:
        raise ValueError(f"{name} must be a finite number > {above}, got {value!r}")
    return out


def check_float_tensor(name: str, value: object, *, allow_empty: bool = False) -> torch.Tensor:
    """Return ``value`` detached; TypeError unless it is a floating-point tensor, ValueError if empty.

    Integer and bool tensors are refused rather than cast: a log-prob or an advantage that arrives as
    an integer is almost always the wrong tensor (an action index, a mask).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype} "
            "(an integer tensor here is usually the wrong argument, e.g. actions)"
        )
    if not allow_empty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); nothing to measure")
    return value.detach() if value.requires_grad else value  # detach() is a dispatch: skip it when moot


def check_same_layout(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """ValueError naming both arguments unless ``a`` and ``b`` have the same shape and device."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "they must match element for element"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulation, except on MPS, which has no float64 (there: float32)."""
    return accumulation_dtype(device)


def nan_max(values: Sequence[float]) -> float:
    """max() that returns NaN when any value is NaN (Python's max is order-dependent with NaN)."""
    if not values:
        return math.nan
    if any(v != v for v in values):
        return math.nan
    return max(values)


# ---------------------------------------------------------------------------------------------
# Moments: per-group power sums about the group mean, merged exactly across groups.
# ---------------------------------------------------------------------------------------------


def moment_rows(x: torch.Tensor) -> torch.Tensor:
    """Moment rows (layout :data:`MOMENT_ROW`) of the S series of a non-empty ``(S, n)`` tensor at once.

    The pivot is each series' mean; the power sums of ``x - pivot`` are taken in the accumulation
    dtype. ``s1`` is kept (it is ~0 but not exactly) so the merge stays exact when the float mean is
    rounded. ~20 kernels however many series: batching series of one length (values, returns and
    errors of a rollout) costs what one series did.
    """
    dt = acc_dtype(x.device)
    flat = x.to(dt)
    s, n = flat.shape
    pivot = flat.mean(1, keepdim=True)
    c = flat - pivot
    c2 = c * c
    # Separate sums, not one stacked (S, 4, n) reduction: a rollout buffer can be large.
    sums = torch.stack((c.sum(1), c2.sum(1), (c2 * c).sum(1), (c2 * c2).sum(1)), dim=1)
    lo, hi = torch.aminmax(flat, dim=1)
    counts = torch.stack((flat > 0, torch.isnan(flat)), dim=1).sum(2).to(dt)
    head = torch.full((s, 1), float(n), dtype=dt, device=flat.device)
    return torch.cat(
        (head, pivot, sums, torch.stack((lo, hi), dim=1), counts, flat.sum(1, keepdim=True)), dim=1
    )


def moment_row(x: torch.Tensor) -> torch.Tensor:
    """One group's moment row (layout :data:`MOMENT_ROW`) of a non-empty tensor, on its device."""
    return moment_rows(x.reshape(1, -1))[0]


def merge_moment_rows(rows: torch.Tensor) -> torch.Tensor:
    """Merge a (..., G, 11) stack of moment rows into (..., 9): [n, mean, M2, M3, M4, min, max, n_pos, n_nan].

    ``M_k`` is the k-th central sum of the union: with ``d = pivot_g - mean``,
    ``sum_i (x_i - mean)^k = sum_j C(k, j) d^(k-j) s_j`` where ``s_0 = n_g`` (binomial theorem), so the
    merge is exact in exact arithmetic and loses nothing measurable in float64. With an infinite
    value the pivots are infinite and the re-centred mean NaN; the mean then falls back to the plain
    sum (inf, as numpy gives) while the central sums stay NaN. Leading dimensions are independent
    series merged at once (e.g. values, returns and errors of the same rollouts).
    """
    n, p, s1, s2, s3, s4 = (rows[..., k] for k in range(6))
    total = n.sum(-1)
    mean = (n * p + s1).sum(-1) / total
    d = p - mean.unsqueeze(-1)
    mean = torch.where(torch.isnan(mean), rows[..., 10].sum(-1) / total, mean)
    d2 = d * d
    m2 = s2 + 2 * d * s1 + n * d2
    m3 = s3 + 3 * d * s2 + 3 * d2 * s1 + n * d2 * d
    m4 = s4 + 4 * d * s3 + 6 * d2 * s2 + 4 * d2 * d * s1 + n * d2 * d2
    central = torch.stack((m2, m3, m4), dim=-2).sum(-1)
    return torch.cat(
        (
            torch.stack((total, mean), dim=-1),
            central,
            torch.stack((rows[..., 6].amin(-1), rows[..., 7].amax(-1)), dim=-1),
            rows[..., 8:10].sum(-2),
        ),
        dim=-1,
    )


def moments(x: torch.Tensor) -> torch.Tensor:
    """The merged vectors (layout of :func:`merge_moment_rows`) of the S series of a ``(S, n)`` tensor,
    straight from the data: a two-pass mean and central sums, ~17 kernels for all S series.

    What one merge of per-chunk rows gives when the chunks are all still at hand (the mean of data
    holding +-inf is the plain mean, inf or NaN as numpy gives, and the central sums NaN).
    """
    dt = acc_dtype(x.device)
    x = x.to(dt)
    s, n = x.shape
    mean = x.mean(1, keepdim=True)
    c = x - mean
    c2 = c * c
    central = torch.stack((c2.sum(1), (c2 * c).sum(1), (c2 * c2).sum(1)), dim=1)
    lo, hi = torch.aminmax(x, dim=1)
    counts = torch.stack((x > 0, torch.isnan(x)), dim=1).sum(2).to(dt)
    head = torch.full((s, 1), float(n), dtype=dt, device=x.device)
    return torch.cat((head, mean, central, torch.stack((lo, hi), dim=1), counts), dim=1)


class MomentAccumulator:
    """Moments of S parallel series handed over in chunks (rollouts, minibatches), merged exactly.

    Chunks are kept as private copies and reduced once, in :meth:`pending`, by :func:`moments` over
    their concatenation; when more than ``FOLD_ELEMENTS`` elements are kept they are reduced early
    to a moment row (11 floats per series) and the rows merged by :func:`merge_moment_rows`, which
    bounds the memory of huge updates. Either way the result is that of one big batch.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._data: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._elements = 0

    def add(self, x: torch.Tensor) -> None:
        """A (S, n) chunk the accumulator may keep (the caller must not modify it afterwards)."""
        self._data.append(x)
        self._elements += x.numel()
        if self._elements > FOLD_ELEMENTS:
            self._fold()

    def _fold(self) -> None:
        if self._data:
            data = self._data[0] if len(self._data) == 1 else torch.cat(self._data, dim=1)
            self._rows.append(moment_rows(data))
            self._data = []
            self._elements = 0

    def pending(self) -> torch.Tensor | None:
        """(S, 9) merged vectors on the device, or None when nothing was added."""
        if not self._rows:
            if not self._data:
                return None
            return moments(self._data[0] if len(self._data) == 1 else torch.cat(self._data, dim=1))
        self._fold()
        return merge_moment_rows(torch.stack(self._rows, dim=1))


def _nonneg(value: float) -> float:
    """A central sum that rounding pushed a hair below zero is zero; NaN stays NaN."""
    return value if value != value else max(value, 0.0)


def moments_from_host(values: Sequence[float]) -> Moments:
    """Build :class:`Moments` from a transferred merged vector (population moments, ddof=0).

    Skew and excess kurtosis are ``None`` (undefined) when the data are constant: decided by
    ``min == max`` (exact), not by a computed variance that rounding may leave at 1e-34.
    """
    n, mean, m2, m3, m4, lo, hi, n_pos, n_nan = values
    count = int(n)
    if count == 0:
        return Moments()
    var = _nonneg(m2) / n
    constant = lo == hi
    std = 0.0 if constant else math.sqrt(var) if var == var else math.nan
    skew: float | None
    kurt: float | None
    if constant or var == 0.0:
        skew = kurt = None
    else:
        skew = (m3 / n) / var**1.5
        kurt = (m4 / n) / (var * var) - 3.0
    frac_pos = math.nan if n_nan > 0 else n_pos / n
    return Moments(
        count=count, mean=mean, std=std, min=lo, max=hi, skew=skew, kurtosis=kurt, frac_positive=frac_pos
    )


# ---------------------------------------------------------------------------------------------
# Percentiles
# ---------------------------------------------------------------------------------------------


class QuantileSampler:
    """Seeded generators (one per device) for the sample that large percentile inputs are cut to.

    Seeded once at construction and advanced by every draw, so a run's percentiles are reproducible
    from its seed while successive updates see different samples.
    """

    def __init__(self, seed: int = 0, max_exact: int = QUANTILE_MAX_EXACT) -> None:
        if max_exact < 2:
            raise ValueError(f"max_exact must be >= 2, got {max_exact}")
        self.seed = seed
        self.max_exact = max_exact
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen


def quantiles(
    x: torch.Tensor, qs: Sequence[float], sampler: QuantileSampler | None = None
) -> tuple[torch.Tensor, int]:
    """Quantiles ``qs`` of a non-empty tensor on its device, and the number of elements used.

    numpy's default ("linear") definition: position ``q * (k - 1)`` in the sorted values, linear
    interpolation between the neighbours. Any NaN in ``x`` makes every quantile NaN (as numpy does).
    Inputs larger than ``sampler.max_exact`` are cut to a seeded uniform sample of that size.
    No host sync: positions depend only on the (static) size.
    """
    flat = x.reshape(-1).to(acc_dtype(x.device))
    n = flat.numel()
    sampler = sampler or QuantileSampler()
    used = flat
    if n > sampler.max_exact:
        idx = torch.randint(
            n, (sampler.max_exact,), generator=sampler.generator(flat.device), device=flat.device
        )
        used = flat.index_select(0, idx)
    k = used.numel()
    ordered = torch.sort(used).values
    parts = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} must lie in [0, 1]")
        pos = q * (k - 1)
        lo = math.floor(pos)
        frac = pos - lo
        if frac == 0.0 or lo + 1 >= k:
            parts.append(ordered[lo])
        else:
            parts.append(torch.lerp(ordered[lo], ordered[lo + 1], frac))
    out = torch.stack(parts).masked_fill(torch.isnan(flat).any(), math.nan)
    return out, k


# ---------------------------------------------------------------------------------------------
# Per-minibatch scalars (losses): mean and max over the update.
# ---------------------------------------------------------------------------------------------


class ScalarSeries:
    """Mean and max over the minibatches of a scalar handed over as a tensor or a Python number.

    Tensors stay on the device (detached; a multi-element tensor counts as its mean); Python numbers
    stay on the host. :meth:`pending` stacks the device values once; :meth:`result` merges both sides.
    """

    def __init__(self, argname: str) -> None:
        self.argname = argname
        self.reset()

    def reset(self) -> None:
        self._device: list[torch.Tensor] = []
        self._host: list[float] = []

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def check(self, value: object) -> torch.Tensor | float:
        """The value ready to add (a detached float tensor or a float); TypeError naming the argument."""
        if isinstance(value, torch.Tensor):
            return check_float_tensor(self.argname, value)
        if type(value) is float:
            return value
        try:  # Python and numpy numbers, a 0-d array; NaN and infinities stay (a broken loss must show)
            return float(_number(self.argname, value))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{self.argname} must be a tensor or a real number, got {type(value).__name__}"
            ) from None

    def add(self, value: torch.Tensor | float) -> None:
        self.add_checked(self.check(value))

    def add_checked(self, checked: torch.Tensor | float) -> None:
        """Add a value :meth:`check` returned. A one-element tensor costs one kernel, a private copy
        (the loop may reuse the tensor before the update ends; the cast to the accumulation dtype
        waits for :meth:`pending`, once for all); a larger one its mean in that dtype."""
        if isinstance(checked, torch.Tensor):
            if checked.numel() == 1:
                self._device.append((checked if checked.dim() == 0 else checked.reshape(())).clone())
            else:
                self._device.append(torch.mean(checked, dtype=acc_dtype(checked.device)))
        else:
            self._host.append(checked)

    def pending(self) -> torch.Tensor | None:
        """[sum, max] of the device values, or None when there are none."""
        if not self._device:
            return None
        s = torch.stack(self._device)
        s = s.to(acc_dtype(s.device))
        return torch.stack((s.sum(), s.amax()))

    def result(self, transferred: Sequence[float] | None) -> tuple[float, float]:
        """(mean, max) over every value added; NaN when none (or when any is NaN)."""
        count = len(self)
        if count == 0:
            return math.nan, math.nan
        total = math.fsum(self._host) if all(math.isfinite(v) for v in self._host) else sum(self._host)
        maxima = list(self._host)
        if self._device:
            if transferred is None:
                raise KeyError(f"the transferred values of {self.argname} are missing")
            total += transferred[0]
            maxima.append(transferred[1])
        return total / count, nan_max(maxima)


# ---------------------------------------------------------------------------------------------
# The reducer
# ---------------------------------------------------------------------------------------------


class AdvantageReducer:
    """Advantages before and after normalisation, and returns. NORMAL and above.

    Two views, because a policy can be healthy on raw advantages and broken by their normalisation
    (or the reverse):

    * ``observe_rollout(raw_advantages, returns)``: once per update on the rollout buffer (the
      advantages as GAE produced them, and the returns); a second call in the same update adds to
      the same statistics.
    * ``observe_minibatch(advantages)``: the advantages as fed to the loss (normalised or not, as the
      loop does it), every minibatch of every epoch; their moments are over all of them, as if they
      were one batch.

    Cost per minibatch: one kernel, a private copy of the minibatch's advantages (the loop may
    reuse its buffer); their moments are computed once per update in :meth:`pending` over the
    concatenation (:class:`MomentAccumulator`). Per rollout: one private float64 copy; in
    :meth:`pending` one batched moment pass over advantages and returns together, and one sort of
    the returns for p10/p50/p90. Nothing syncs before the hub's single transfer.
    """

    PREFIX = "adv."
    RETURN_QS = (0.10, 0.50, 0.90)

    def __init__(self, *, seed: int = 0, quantile_max_exact: int = QUANTILE_MAX_EXACT) -> None:
        self._sampler = QuantileSampler(seed, quantile_max_exact)
        self.reset()

    def reset(self) -> None:
        self._rollout = MomentAccumulator()  # 2 series: raw advantages, returns
        self._returns: list[torch.Tensor] = []  # private float64 copies, for the percentiles
        self._norm = MomentAccumulator()  # 1 series: the normalised minibatch advantages
        self._ret_used = 0

    def observe_rollout(
        self,
        raw_advantages: torch.Tensor,
        returns: torch.Tensor,
        *,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """Raw advantages as GAE produced them and the returns, same shape (any layout)."""
        adv = check_float_tensor("raw_advantages", raw_advantages)
        ret = check_float_tensor("returns", returns)
        check_same_layout("raw_advantages", adv, "returns", ret)
        if level < TelemetryLevel.NORMAL:
            return
        with torch.no_grad():
            # A private float64 copy: the caller may refill its buffer before the update ends.
            x = torch.stack((adv.reshape(-1), ret.reshape(-1))).to(acc_dtype(adv.device))
            self._rollout.add(x)
            self._returns.append(x[1])

    def observe_minibatch(
        self, advantages: torch.Tensor, *, level: TelemetryLevel = TelemetryLevel.NORMAL
    ) -> None:
        """The advantages of one minibatch exactly as fed to the policy loss (normalised or not)."""
        adv = check_float_tensor("advantages", advantages)
        if level < TelemetryLevel.NORMAL:
            return
        row = adv.unsqueeze(0) if adv.dim() == 1 else adv.reshape(1, -1)
        self._norm.add(row.clone())  # one kernel (adv is detached): the loop may reuse its buffer

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if level < TelemetryLevel.NORMAL:
            return out
        with torch.no_grad():
            rollout = self._rollout.pending()
            if rollout is not None:
                out["adv.raw"], out["adv.returns"] = rollout[0], rollout[1]
                allret = self._returns[0] if len(self._returns) == 1 else torch.cat(self._returns)
                out["adv.returns_q"], self._ret_used = quantiles(allret, self.RETURN_QS, self._sampler)
            norm = self._norm.pending()
            if norm is not None:
                out["adv.normalized"] = norm[0]
        return out

    def build(self, host: dict[str, list[float]], level: TelemetryLevel) -> AdvantageStats | None:
        """None below NORMAL (not measured); empty parts keep their NaN defaults."""
        if level < TelemetryLevel.NORMAL:
            return None
        stats = AdvantageStats()
        if "adv.raw" in host:
            stats.raw = moments_from_host(host["adv.raw"])
        if "adv.normalized" in host:
            stats.normalized = moments_from_host(host["adv.normalized"])
        if "adv.returns" in host:
            m = moments_from_host(host["adv.returns"])
            p10, p50, p90 = host["adv.returns_q"]
            stats.returns = ReturnStats(
                count=m.count,
                mean=m.mean,
                std=m.std,
                min=m.min,
                max=m.max,
                p10=p10,
                p50=p50,
                p90=p90,
                quantile_n=self._ret_used,
            )
        return stats
