"""DEBUG-only diagnostics: per-layer gradient table, numerical stability, ratio outliers, conflict.

Everything here rides in the hub's single transfer per update (the reference system synced once per
metric). :class:`DebugDiagnostics` follows the reducer protocol: ``reset`` at the start of an update,
``observe_*`` accumulate on the device with no host sync, ``pending(level)`` hands over tensors under
``"debug."`` names, ``build(host, level)`` turns the transferred floats into a
:class:`~telemetry_core.schema.DebugReport`.

Decisions, and why:

* **Per-layer table, accumulated.** Every ``observe_gradients`` call (every backward of the update)
  contributes; a NaN in the third of 32 backward passes is not hidden by a clean last one. Counts
  (zero / small / large / NaN / inf) are summed over calls in int64 (exact), mean and std are pooled
  over the finite elements of every call with Chan's parallel update in float32 (gradients may be
  fp16/bf16: each is widened to a float32 working copy one parameter at a time, never to float64),
  ``norm`` is the mean over calls of the per-call L2 norm (as ``GradientStats.param_norms``).
  Cost per backward: one ``torch._foreach_norm`` for all norms plus about 20 elementwise/reduction
  kernels per parameter tensor; transient memory: a float32 working copy and its masks, one
  parameter at a time. Parameters without a (dense) gradient in a backward are a counted skip
  (``DebugReport.skipped``; their row's ``calls`` says how often they had one).
* **Numerical report.** Per-parameter flags and maxima travel, names are resolved on the host.
  Non-finite gradients come from the table's NaN/inf counts; weights are checked once, in
  ``pending`` (after the update's last optimizer step): a non-finite weight never heals by itself,
  so one check per update names every one. Pre-clip total norms of every backward are kept.
* **Ratio outliers.** A running top-k by |new - old| per row (joint and each head) kept on the device:
  each minibatch's own top-k is concatenated with the running one and top-k'd again, which equals the
  top-k over the concatenated update. NaN/inf differences rank worst. ``indices`` are the rollout
  positions the loop passes, else positions within the minibatch (with the minibatch ordinal).
  The joint row's ``actions`` is the action only when the policy has one head; with several heads it
  is -1 and ``head_actions`` / ``head_logp_diff`` give every head's action and share of the ratio.
* **Gradient conflict** (:meth:`DebugDiagnostics.observe_loss_terms`): one
  ``torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)`` per loss term handed
  over (policy, value, each head loss): **2 + number of head losses extra backward passes, once per
  update** (first minibatch only; later calls are counted and skipped). ``.grad`` is untouched (no
  accumulation), no ``create_graph``; the loop's own backward then runs on the retained graph.
  Measured on the 2-core CPU while other jobs loaded it (preliminary; medians of 30 interleaved
  repeats, three runs), LSTM actor-critic with 137k parameters (obs 32, hidden 128, heads of 4
  and 3 actions, critic), minibatch 32 steps x 16 envs, relative to the loop's one backward:
  conflict (4 extra passes) 3.6-4.4x, once per update; per-layer table 0.6-0.75x per backward;
  ``observe_minibatch`` <= 0.1x per minibatch; ``pending`` + transfer + ``build`` 0.2-0.45x, once.

The hub calls ``observe_*`` only at DEBUG; :meth:`reset` also accepts the update's level and turns
every ``observe_*`` into a no-op below DEBUG, so a hub that always forwards costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.schema import DebugReport, GradientConflict, LayerRow, NumericalReport, RatioOutliers

__all__ = ["PREFIX", "DebugDiagnostics"]

PREFIX = "debug."

_INF = math.inf
_JOINT = "joint"
# Float columns of the per-layer accumulator: pooled mean, pooled M2, finite min, finite max,
# sum of per-call norms, max of per-call norms.
_F_MEAN, _F_M2, _F_MIN, _F_MAX, _F_NORM_SUM, _F_NORM_MAX = range(6)
_NF = 6
# Integer columns: finite, zero, small, large, NaN, inf elements.
_C_FIN, _C_ZERO, _C_SMALL, _C_LARGE, _C_NAN, _C_INF = range(6)
_NC = 6
# Fixed outlier payload columns (then actions, then the joint row's per-head differences).
_P_SCORE, _P_INDEX, _P_MB, _P_EPOCH, _P_DIFF = range(5)
_P_FIXED = 5
# Gradients up to this many elements reduce their five count masks in one stacked kernel.
_STACK_MASKS_MAX = 1 << 20


def _named(named_params: Any) -> list[tuple[str, torch.Tensor]]:
    """Accept a module, a name -> tensor mapping or an iterable of (name, tensor) pairs."""
    if isinstance(named_params, nn.Module):
        items = list(named_params.named_parameters())
    elif isinstance(named_params, Mapping):
        items = list(named_params.items())
    else:
        try:
            items = [(n, p) for n, p in named_params]
        except (TypeError, ValueError):
            raise TypeError(
                "named_params must be an nn.Module, a mapping name -> parameter or an iterable of "
                f"(name, parameter) pairs, got {type(named_params).__name__}"
            ) from None
    if not items:
        raise ValueError("named_params is empty: there is nothing to diagnose")
    for name, p in items:
        if not isinstance(name, str):
            raise TypeError(f"named_params: parameter names must be str, got {name!r}")
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"named_params[{name!r}] is a {type(p).__name__}, not a tensor")
        if not (p.is_floating_point()):
            raise TypeError(
                f"named_params[{name!r}] has dtype {p.dtype}; parameters must be real floating point"
            )
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("named_params has duplicate names")
    return items


def _check_logprob(arg: str, t: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point tensor of log-probabilities, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{arg} is empty: an empty minibatch has no ratios")
    if like is not None:
        if t.numel() != like.numel():
            raise ValueError(
                f"{arg} has {t.numel()} elements (shape {tuple(t.shape)}) but new_logprob has "
                f"{like.numel()} (shape {tuple(like.shape)})"
            )
        if t.device != like.device:
            raise ValueError(f"{arg} is on {t.device} but new_logprob is on {like.device}")
    return t.detach().reshape(-1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are widened to float32 (no overflow, exact differences); others kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _float32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
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


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return _INF


class _OutlierRow:
    """Running top-k of one row (joint or a head) and its update-wide |diff| summary, on device."""

    __slots__ = ("payload", "samples", "summary")

    def __init__(self) -> None:
        self.payload: torch.Tensor | None = None  # [<=k, columns] float64, worst first
        self.summary: torch.Tensor | None = None  # [sum |d|, max |d|, nonfinite count] float64
        self.samples = 0


class DebugDiagnostics:
    """The DEBUG-only reducer. See the module docstring for what is measured and what it costs.

    ``named_params``: the model (``nn.Module``), a mapping or (name, parameter) pairs; the per-layer
    table lists the parameters that require grad, the weight check covers all. ``heads``: head name
    -> number of actions (or a sequence of names), in the order of the columns of ``actions``.
    """

    def __init__(
        self,
        named_params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        heads: Mapping[str, int] | Sequence[str] | None = None,
        thresholds: Thresholds | None = None,
        *,
        max_grad_norm: float = 0.5,
    ) -> None:
        items = _named(named_params)
        self.names = [n for n, _ in items]
        self.params = [p for _, p in items]
        self.train_idx = [i for i, p in enumerate(self.params) if p.requires_grad]
        self.train_names = [self.names[i] for i in self.train_idx]
        self.train_params = [self.params[i] for i in self.train_idx]
        if heads is None:
            heads = {}
        if isinstance(heads, str) or not isinstance(heads, (Mapping, Sequence)):
            raise TypeError(f"heads must be a mapping name -> actions or a sequence of names, got {heads!r}")
        self.heads = list(heads)
        if len(set(self.heads)) != len(self.heads) or _JOINT in self.heads:
            raise ValueError(f"heads must be unique and must not be named {_JOINT!r}: {self.heads}")
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"thresholds must be a Thresholds, got {type(self.thresholds).__name__}")
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
            raise TypeError(f"max_grad_norm must be a number, got {max_grad_norm!r}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
        th = self.thresholds
        if not th.outlier_top_k >= 1:
            raise ValueError(f"Thresholds.outlier_top_k must be >= 1, got {th.outlier_top_k}")
        if not 0 < th.grad_small_rel < th.grad_large_rel:
            raise ValueError("Thresholds.grad_small_rel must satisfy 0 < grad_small_rel < grad_large_rel")
        self.max_grad_norm = float(max_grad_norm)
        self.small = th.grad_small_rel * self.max_grad_norm
        self.large = th.grad_large_rel * self.max_grad_norm
        self.k = int(th.outlier_top_k)
        self.device = torch.device("meta")
        self.reset()

    def _follow_device(self) -> None:
        """Accumulate where the model lives; rebuild constants when it moved (``model.to()`` keeps
        the Parameter objects). Called by :meth:`reset`, so never inside an update."""
        dev = self.params[0].device
        if dev == self.device:
            return
        self.device = dev
        f32 = torch.float32
        self._neutral_f = torch.cat([torch.zeros(2, dtype=f32, device=dev), torch.full((1,), _INF, device=dev),
                                     torch.full((1,), -_INF, device=dev)])  # fmt: skip
        self._neutral_c = torch.zeros(5, dtype=torch.int64, device=dev)
        self._zero_f = torch.zeros((), dtype=f32, device=dev)
        self._zero_i = torch.zeros((), dtype=torch.int64, device=dev)
        numel = torch.tensor([p.numel() for p in self.train_params], dtype=torch.int64)
        self._numel = numel.to(dev, non_blocking=True)

    # ------------------------------------------------------------------------------------------
    # protocol
    # ------------------------------------------------------------------------------------------
    def reset(self, level: TelemetryLevel | int | str | None = None) -> None:
        """Start an update. With a level below DEBUG, every ``observe_*`` of the update is a no-op."""
        self.active = level is None or TelemetryLevel.parse(level) >= TelemetryLevel.DEBUG
        self._follow_device()
        p = len(self.train_params)
        self._calls = 0
        self._grad_calls = [0] * p  # per trainable parameter: calls that had a gradient (host)
        self._acc_f: torch.Tensor | None = None
        self._acc_c: torch.Tensor | None = None
        self._pre_clip: list[torch.Tensor] = []
        self._loss_bad_dev: torch.Tensor | None = None
        self._losses_seen = 0
        self._loss_bad_host = 0
        self.skipped = 0
        self._rows: dict[str, _OutlierRow] = {}
        self._minibatches = 0
        self._index_rollout = False
        self._actions_seen = False
        self._head_logp_seen = False
        self._conflict: dict[str, Any] | None = None
        self._conflict_skipped = 0
        self._layout: dict[str, Any] | None = None

    def pending(self, level: TelemetryLevel | int | str) -> dict[str, torch.Tensor]:
        """Device tensors for the hub's single transfer; empty below DEBUG."""
        if TelemetryLevel.parse(level) < TelemetryLevel.DEBUG:
            return {}
        out: dict[str, torch.Tensor] = {}
        layout: dict[str, Any] = {"calls": self._calls, "grad_calls": list(self._grad_calls)}
        if self._acc_f is not None and self._acc_c is not None:
            out[PREFIX + "layer.f"] = self._acc_f
            out[PREFIX + "layer.c"] = self._acc_c
        out[PREFIX + "weights"] = self._weight_check()
        if self._pre_clip:
            out[PREFIX + "pre_clip_norms"] = torch.stack(self._pre_clip)
        if self._loss_bad_dev is not None:
            out[PREFIX + "loss_nonfinite"] = self._loss_bad_dev
        rows = []
        for name, row in self._rows.items():
            if row.payload is None or row.summary is None:
                continue
            out[f"{PREFIX}outliers.{name}"] = row.payload
            out[f"{PREFIX}outliers.{name}.summary"] = row.summary
            rows.append((name, int(row.payload.shape[0]), int(row.payload.shape[1]), row.samples))
        layout["rows"] = rows
        if self._conflict is not None:
            out[PREFIX + "conflict"] = self._conflict["values"]
        self._layout = layout
        return out

    def build(
        self, host: Mapping[str, Sequence[float]], level: TelemetryLevel | int | str
    ) -> DebugReport | None:
        """Turn the transferred values into a :class:`DebugReport` (None below DEBUG)."""
        if TelemetryLevel.parse(level) < TelemetryLevel.DEBUG:
            return None
        layout = self._layout
        if layout is None:
            raise RuntimeError("DebugDiagnostics.build called without pending() for this update")
        layers = self._build_layers(host, layout)
        numerical = self._build_numerical(host, layout, layers)
        outliers = [self._build_outliers(host, name, n, c, s) for name, n, c, s in layout["rows"]]
        conflict = self._build_conflict(host) if self._conflict is not None else None
        return DebugReport(
            layers=layers, numerical=numerical, outliers=outliers, conflict=conflict, skipped=self.skipped
        )

    # ------------------------------------------------------------------------------------------
    # gradients: per-layer table and numerical report
    # ------------------------------------------------------------------------------------------
    def observe_gradients(self, loss: torch.Tensor | float | None = None) -> None:
        """After ``loss.backward()``, before clipping: fold this backward into the per-layer table."""
        if not self.active:
            return
        self._observe_loss(loss)
        present: list[int] = []
        grads: list[torch.Tensor] = []
        for j, p in enumerate(self.train_params):
            g = p.grad
            if g is None or g.is_sparse or g.numel() == 0:
                self.skipped += 1  # documented skip: no (dense) gradient in this backward
                continue
            present.append(j)
            grads.append(g.detach())
        if not present:
            raise ValueError(
                "observe_gradients: no parameter has a gradient; call it after loss.backward() and "
                "before optimizer.zero_grad()"
            )
        dev = self.device
        norms = [n.to(dev, non_blocking=True) for n in _float32_norms(grads)]
        rows_f: list[torch.Tensor] = []
        rows_c: list[torch.Tensor] = []
        for g in grads:
            f, c = self._param_stats(g)
            rows_f.append(f.to(dev, non_blocking=True))
            rows_c.append(c.to(dev, non_blocking=True))
        call_norm = torch.stack(norms)
        self._pre_clip.append(torch.linalg.vector_norm(call_norm))
        # Parameter order, with neutral rows (nothing seen) for parameters without a gradient.
        p = len(self.train_params)
        if len(present) == p:
            f_call, raw, n_call, numel = torch.stack(rows_f), torch.stack(rows_c), call_norm, self._numel
        else:
            pos = dict(zip(present, range(len(present))))
            f_call = torch.stack([rows_f[pos[j]] if j in pos else self._neutral_f for j in range(p)])
            raw = torch.stack([rows_c[pos[j]] if j in pos else self._neutral_c for j in range(p)])
            n_call = torch.stack([norms[pos[j]] if j in pos else self._zero_f for j in range(p)])
            numel = torch.stack([self._numel[j] if j in pos else self._zero_i for j in range(p)])
        fin, nan, zero_all, small_all, large = raw.unbind(1)
        nonfin = numel - fin
        c_call = torch.stack([fin, zero_all - nonfin, small_all - zero_all, large, nan, nonfin - nan], 1)
        for j in present:
            self._grad_calls[j] += 1
        self._calls += 1
        self._fold(f_call, c_call, n_call)

    def _param_stats(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One gradient: floats (mean, M2, min, max) over finite elements; raw int64 counts
        (finite, NaN, |g| == 0 or non-finite, |g| < small or non-finite, finite |g| > large).

        The non-finite slots are zeroed once (``xf``) so every mask below is over finite values
        plus a known number of zeros, which :meth:`observe_gradients` subtracts for all
        parameters at once. Small tensors stack their masks into one reduction (fewer kernels);
        large ones reduce each mask alone (no 5-byte-per-element stack).
        """
        x = _wide(g.reshape(-1))  # float32 working copy of half grads: no overflow, never float64
        fin = torch.isfinite(x)
        xf = torch.where(fin, x, 0.0)
        ab = xf.abs()
        masks = (fin, torch.isnan(x), ab == 0, ab < self.small, ab > self.large)
        if x.numel() <= _STACK_MASKS_MAX:
            counts = torch.stack(masks).sum(1)
        else:
            counts = torch.stack([m.sum() for m in masks])
        mean = xf.sum() / counts[0].clamp_min(1)
        m2 = torch.where(fin, x - mean, 0.0).square().sum()
        mn = torch.where(fin, x, _INF).amin()
        mx = torch.where(fin, x, -_INF).amax()
        return torch.stack([mean, m2, mn, mx]).to(torch.float32), counts

    def _fold(self, f: torch.Tensor, c: torch.Tensor, norms: torch.Tensor) -> None:
        """Merge one call's per-parameter rows into the update accumulators (Chan's parallel update)."""
        if self._acc_f is None or self._acc_c is None:
            self._acc_f = torch.cat([f, norms[:, None], norms[:, None]], dim=1)
            self._acc_c = c.clone()
            return
        acc_f, acc_c = self._acc_f, self._acc_c
        n_a = acc_c[:, _C_FIN].to(torch.float32)
        n_b = c[:, _C_FIN].to(torch.float32)
        n = (n_a + n_b).clamp_min(1.0)
        delta = f[:, 0] - acc_f[:, _F_MEAN]
        mean = acc_f[:, _F_MEAN] + delta * (n_b / n)
        m2 = acc_f[:, _F_M2] + f[:, 1] + delta.square() * (n_a * (n_b / n))
        self._acc_f = torch.stack(
            [
                mean,
                m2,
                torch.minimum(acc_f[:, _F_MIN], f[:, 2]),
                torch.maximum(acc_f[:, _F_MAX], f[:, 3]),
                acc_f[:, _F_NORM_SUM] + norms,
                torch.maximum(acc_f[:, _F_NORM_MAX], norms),
            ],
            dim=1,
        )
        self._acc_c = acc_c + c

    def _observe_loss(self, loss: torch.Tensor | float | None) -> None:
        if loss is None:
            return
        if isinstance(loss, torch.Tensor):
            if not (loss.is_floating_point()):
                raise TypeError(f"observe_gradients: loss must be a floating-point tensor, got {loss.dtype}")
            if loss.numel() == 0:
                raise ValueError("observe_gradients: loss is an empty tensor")
            bad = torch.isfinite(loss.detach()).logical_not().any().to(torch.int64).to(self.device)
            self._loss_bad_dev = bad if self._loss_bad_dev is None else self._loss_bad_dev + bad
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._loss_bad_host += 0 if math.isfinite(loss) else 1
        else:
            raise TypeError(
                f"observe_gradients: loss must be a tensor, a float or None, got {type(loss).__name__}"
            )
        self._losses_seen += 1

    def _weight_check(self) -> torch.Tensor:
        """[non-finite flag, largest finite |w|] of every parameter, at the end of the update."""
        rows = []
        for p in self.params:
            w = p.detach().reshape(-1)
            if w.numel() == 0:
                rows.append(torch.zeros(2, dtype=torch.float32, device=self.device))
                continue
            fin = torch.isfinite(w)
            bad = fin.logical_not().any().to(torch.float32)
            big = torch.where(fin, w.abs(), 0.0).amax().to(torch.float32)
            rows.append(torch.stack([bad, big]).to(self.device, non_blocking=True))
        return torch.stack(rows)

    def _build_layers(self, host: Mapping[str, Sequence[float]], layout: dict[str, Any]) -> list[LayerRow]:
        f = host.get(PREFIX + "layer.f")
        c = host.get(PREFIX + "layer.c")
        rows = []
        for j, name in enumerate(self.train_names):
            numel = self.train_params[j].numel()
            calls = layout["grad_calls"][j]
            if f is None or c is None or calls == 0:
                rows.append(
                    LayerRow(
                        name=name,
                        numel=numel,
                        norm=math.nan,
                        mean=math.nan,
                        std=math.nan,
                        min=math.nan,
                        max=math.nan,
                        zero_frac=math.nan,
                        small_frac=math.nan,
                        large_frac=math.nan,
                        nan=0,
                        inf=0,
                        calls=0,
                    )
                )
                continue
            fr = f[j * _NF : (j + 1) * _NF]
            cr = [round(v) for v in c[j * _NC : (j + 1) * _NC]]
            total = numel * calls
            fin = cr[_C_FIN]
            defined = fin > 0
            rows.append(
                LayerRow(
                    name=name,
                    numel=numel,
                    norm=fr[_F_NORM_SUM] / calls,
                    norm_max=fr[_F_NORM_MAX],
                    mean=fr[_F_MEAN] if defined else math.nan,
                    std=math.sqrt(max(fr[_F_M2], 0.0) / fin) if defined else math.nan,
                    min=fr[_F_MIN] if defined else math.nan,
                    max=fr[_F_MAX] if defined else math.nan,
                    zero_frac=cr[_C_ZERO] / total,
                    small_frac=cr[_C_SMALL] / total,
                    large_frac=cr[_C_LARGE] / total,
                    nan=cr[_C_NAN],
                    inf=cr[_C_INF],
                    calls=calls,
                )
            )
        return rows

    def _build_numerical(
        self, host: Mapping[str, Sequence[float]], layout: dict[str, Any], layers: list[LayerRow]
    ) -> NumericalReport:
        w = host.get(PREFIX + "weights", [])
        nonfinite_weights = [n for i, n in enumerate(self.names) if w and w[2 * i] != 0]
        best_w, best_w_name = math.nan, ""
        for i, n in enumerate(self.names):
            if w and self.params[i].numel() and (math.isnan(best_w) or w[2 * i + 1] > best_w):
                best_w, best_w_name = w[2 * i + 1], n
        best_g, best_g_name = math.nan, ""
        for row in layers:
            if row.calls and not math.isnan(row.min):
                m = max(abs(row.min), abs(row.max))
                if math.isnan(best_g) or m > best_g:
                    best_g, best_g_name = m, row.name
        bad_loss = self._loss_bad_host + round(sum(host.get(PREFIX + "loss_nonfinite", [0.0])))
        return NumericalReport(
            nonfinite_weights=nonfinite_weights,
            nonfinite_grads=[row.name for row in layers if row.nan or row.inf],
            max_abs_weight=best_w,
            max_abs_weight_param=best_w_name,
            max_abs_grad=best_g,
            max_abs_grad_param=best_g_name,
            loss_finite=None if self._losses_seen == 0 else bad_loss == 0,
            losses_seen=self._losses_seen,
            nonfinite_losses=bad_loss,
            pre_clip_norms=list(host.get(PREFIX + "pre_clip_norms", [])),
        )

    # ------------------------------------------------------------------------------------------
    # ratio outliers
    # ------------------------------------------------------------------------------------------
    def observe_minibatch(
        self,
        new_logprob: torch.Tensor,
        old_logprob: torch.Tensor,
        head_new_logprobs: Mapping[str, torch.Tensor] | None = None,
        head_old_logprobs: Mapping[str, torch.Tensor] | None = None,
        actions: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        indices: torch.Tensor | Sequence[int] | Any | None = None,
        epoch: int | None = None,
    ) -> None:
        """Fold one minibatch into the running top-k of the joint ratio and of each head.

        ``actions``: ``[B, H]`` (columns in ``heads`` order), ``[B]`` with a single head, or a
        mapping head -> ``[B]``. ``indices``: the minibatch's positions in the rollout buffer
        (tensor, numpy array or sequence of ints).
        """
        if not self.active:
            return
        new = _check_logprob("new_logprob", new_logprob)
        old = _check_logprob("old_logprob", old_logprob, new_logprob)
        b = new.numel()
        dev = new.device
        heads_new, heads_old = self._check_heads(head_new_logprobs, head_old_logprobs, new_logprob)
        acts = self._check_actions(actions, b, dev)
        idx = self._check_indices(indices, b, dev)
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"observe_minibatch: epoch must be an int or None, got {epoch!r}")
        mb = self._minibatches
        self._minibatches += 1
        if idx is not None:
            self._index_rollout = True
        if acts is not None:
            self._actions_seen = True
        h = len(self.heads)
        head_diffs = {name: _wide(heads_new[name]) - _wide(heads_old[name]) for name in heads_new}
        if head_diffs:
            self._head_logp_seen = True
        diff = _wide(new) - _wide(old)
        # joint row: actions of every head (or the single action), then each head's difference
        n_act = max(h, 1)
        extra: list[torch.Tensor] = []
        if acts is not None:
            extra.append(acts.to(torch.float64))
        else:
            extra.append(torch.full((b, n_act), -1.0, dtype=torch.float64, device=dev))
        if h:
            nan = torch.full((b,), math.nan, dtype=torch.float64, device=dev)
            extra.append(
                torch.stack(
                    [head_diffs[n].to(torch.float64) if n in head_diffs else nan for n in self.heads], 1
                )
            )
        self._fold_row(_JOINT, diff, idx, mb, epoch, extra)
        for col, name in enumerate(self.heads):
            if name not in head_diffs:
                continue
            a = acts[:, col : col + 1].to(torch.float64) if acts is not None else None
            if a is None:
                a = torch.full((b, 1), -1.0, dtype=torch.float64, device=dev)
            self._fold_row(name, head_diffs[name], idx, mb, epoch, [a])

    def _fold_row(
        self,
        name: str,
        diff: torch.Tensor,
        idx: torch.Tensor | None,
        mb: int,
        epoch: int | None,
        extra: list[torch.Tensor],
    ) -> None:
        row = self._rows.setdefault(name, _OutlierRow())
        b = diff.numel()
        ad = diff.abs()
        score = torch.where(torch.isnan(diff), _INF, ad)
        kk = min(self.k, b)
        top_s, top_i = torch.topk(score, kk)
        pos = idx.index_select(0, top_i) if idx is not None else top_i
        cols = [
            top_s.to(torch.float64)[:, None],
            pos.to(torch.float64)[:, None],
            torch.full((kk, 1), float(mb), dtype=torch.float64, device=diff.device),
            torch.full(
                (kk, 1), float(-1 if epoch is None else epoch), dtype=torch.float64, device=diff.device
            ),
            diff.index_select(0, top_i).to(torch.float64)[:, None],
            *[e.index_select(0, top_i) for e in extra],
        ]
        new_rows = torch.cat(cols, dim=1)
        merged = new_rows if row.payload is None else torch.cat([row.payload, new_rows])
        keep = min(self.k, merged.shape[0])
        _, sel = torch.topk(merged[:, _P_SCORE], keep)
        row.payload = merged.index_select(0, sel)
        summary = torch.stack(
            [
                ad.sum(dtype=torch.float64),
                ad.amax().to(torch.float64),
                torch.isfinite(diff).logical_not().sum().to(torch.float64),
            ]
        )
        if row.summary is None:
            row.summary = summary
        else:
            s = row.summary
            row.summary = torch.stack([s[0] + summary[0], torch.maximum(s[1], summary[1]), s[2] + summary[2]])
        row.samples += b

    def _check_heads(
        self,
        head_new: Mapping[str, torch.Tensor] | None,
        head_old: Mapping[str, torch.Tensor] | None,
        like: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if head_new is None and head_old is None:
            return {}, {}
        if head_new is None or head_old is None:
            missing = "head_old_logprobs" if head_old is None else "head_new_logprobs"
            raise ValueError(
                f"observe_minibatch: {missing} is None but the other per-head log-probs were given"
            )
        for arg, d in (("head_new_logprobs", head_new), ("head_old_logprobs", head_old)):
            if not isinstance(d, Mapping):
                raise TypeError(
                    f"observe_minibatch: {arg} must be a mapping head -> tensor, got {type(d).__name__}"
                )
            unknown = [k for k in d if k not in self.heads]
            if unknown:
                raise ValueError(
                    f"observe_minibatch: {arg} names unknown heads {unknown}; known heads: {self.heads}"
                )
        if set(head_new) != set(head_old):
            raise ValueError(
                f"observe_minibatch: head_new_logprobs has heads {sorted(head_new)} but head_old_logprobs "
                f"has {sorted(head_old)}"
            )
        hn = {k: _check_logprob(f"head_new_logprobs[{k!r}]", v, like) for k, v in head_new.items()}
        ho = {k: _check_logprob(f"head_old_logprobs[{k!r}]", v, like) for k, v in head_old.items()}
        return hn, ho

    def _check_actions(self, actions: Any, b: int, dev: torch.device) -> torch.Tensor | None:
        """Actions as an int64 ``[B, max(H, 1)]`` tensor on ``dev`` (or None).

        Accepted: a mapping head -> tensor of B elements (any shape, e.g. ``[T, N]``), or one tensor
        whose last dimension holds the heads in ``heads`` order (``[..., H]``, B x H elements), or
        B elements when there is a single head (or none declared).
        """
        if actions is None:
            return None
        h = len(self.heads)
        if isinstance(actions, Mapping):
            unknown = [k for k in actions if k not in self.heads]
            if unknown:
                raise ValueError(
                    f"observe_minibatch: actions names unknown heads {unknown}; known heads: {self.heads}"
                )
            if not actions:
                raise ValueError("observe_minibatch: actions is an empty mapping")
            cols = []
            for name in self.heads:
                if name in actions:
                    a = self._check_action_tensor(f"actions[{name!r}]", actions[name])
                    if a.numel() != b:
                        raise ValueError(
                            f"observe_minibatch: actions[{name!r}] has {a.numel()} elements (shape "
                            f"{tuple(a.shape)}) but the minibatch has {b}"
                        )
                    cols.append(a.reshape(-1).to(dev, non_blocking=True))
                else:
                    cols.append(torch.full((b,), -1, dtype=torch.int64, device=dev))
            return torch.stack(cols, 1)
        a = self._check_action_tensor("actions", actions)
        width = max(h, 1)
        if width == 1 and a.numel() == b:
            return a.reshape(b, 1).to(dev, non_blocking=True)
        if a.dim() >= 1 and a.shape[-1] == width and a.numel() == b * width:
            return a.reshape(b, width).to(dev, non_blocking=True)
        raise ValueError(
            f"observe_minibatch: actions has shape {tuple(a.shape)}; expected {b} x {width} elements with "
            f"the heads {self.heads} in the last dimension (or a mapping head -> tensor)"
        )

    @staticmethod
    def _check_action_tensor(arg: str, a: Any) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"observe_minibatch: {arg} must be a torch.Tensor, got {type(a).__name__}")
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"observe_minibatch: {arg} must hold action indices, got dtype {a.dtype}")
        # Buffers often store discrete actions as floats (CleanRL): truncation to int64 is exact.
        return a.detach().to(torch.int64)

    @staticmethod
    def _check_indices(indices: Any, b: int, dev: torch.device) -> torch.Tensor | None:
        if indices is None:
            return None
        if not isinstance(indices, torch.Tensor):
            try:
                indices = torch.as_tensor(indices)  # host data (numpy array, list, range): no device sync
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"observe_minibatch: indices must be integer positions: {e}") from None
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"observe_minibatch: indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() != b:
            raise ValueError(
                f"observe_minibatch: indices has {indices.numel()} elements but the minibatch has {b}"
            )
        return indices.detach().reshape(-1).to(device=dev, dtype=torch.int64, non_blocking=True)

    def _build_outliers(
        self, host: Mapping[str, Sequence[float]], name: str, n: int, c: int, samples: int
    ) -> RatioOutliers:
        flat = host[f"{PREFIX}outliers.{name}"]
        s = host[f"{PREFIX}outliers.{name}.summary"]
        rows = [flat[i * c : (i + 1) * c] for i in range(n)]
        diffs = [r[_P_DIFF] for r in rows]
        act_w = (max(len(self.heads), 1)) if name == _JOINT else 1
        actions: list[int] = []
        head_actions: dict[str, list[int]] = {}
        head_logp: dict[str, list[float]] = {}
        if self._actions_seen:
            if name != _JOINT or len(self.heads) <= 1:
                actions = [round(r[_P_FIXED]) for r in rows]
            else:
                actions = [-1] * n
                head_actions = {h: [round(r[_P_FIXED + j]) for r in rows] for j, h in enumerate(self.heads)}
        if name == _JOINT and self.heads and self._head_logp_seen:
            base = _P_FIXED + act_w
            head_logp = {h: [r[base + j] for r in rows] for j, h in enumerate(self.heads)}
        return RatioOutliers(
            head=name,
            index_kind="rollout" if self._index_rollout else "minibatch",
            indices=[round(r[_P_INDEX]) for r in rows],
            minibatches=[round(r[_P_MB]) for r in rows],
            epochs=[round(r[_P_EPOCH]) for r in rows],
            ratios=[_safe_exp(d) if not math.isnan(d) else math.nan for d in diffs],
            actions=actions,
            logp_diff=diffs,
            head_actions=head_actions,
            head_logp_diff=head_logp,
            samples=samples,
            nonfinite=round(s[2]),
            logp_diff_mean=s[0] / samples if samples else math.nan,
            logp_diff_max=s[1],
        )

    # ------------------------------------------------------------------------------------------
    # gradient conflict
    # ------------------------------------------------------------------------------------------
    def observe_loss_terms(
        self,
        policy_loss: torch.Tensor | None = None,
        value_loss: torch.Tensor | None = None,
        head_losses: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Before the loop's backward: cosines between the loss terms' gradients (once per update).

        Costs one extra backward pass per term given (``2 + len(head_losses)``), on the first call of
        the update only; ``.grad`` is not touched and the graph is retained for the loop's backward.
        """
        if not self.active:
            return
        if self._conflict is not None:
            self._conflict_skipped += 1
            return
        terms: dict[str, torch.Tensor] = {}
        for arg, t in (("policy_loss", policy_loss), ("value_loss", value_loss)):
            if t is not None:
                terms[arg] = self._check_loss_term(arg, t)
        if head_losses is not None:
            if not isinstance(head_losses, Mapping):
                raise TypeError(
                    f"observe_loss_terms: head_losses must be a mapping, got {type(head_losses).__name__}"
                )
            unknown = [k for k in head_losses if k not in self.heads]
            if unknown:
                raise ValueError(
                    f"observe_loss_terms: head_losses names unknown heads {unknown}; known: {self.heads}"
                )
            for name in self.heads:
                if name in head_losses:
                    terms["head:" + name] = self._check_loss_term(f"head_losses[{name!r}]", head_losses[name])
        if len(terms) < 2:
            raise ValueError(
                "observe_loss_terms: give at least two loss terms (policy_loss and value_loss, or two "
                "head_losses): a conflict needs two gradients"
            )
        params = self.train_params
        grads: dict[str, tuple[torch.Tensor | None, ...]] = {}
        for key, t in terms.items():
            try:
                grads[key] = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise ValueError(
                    f"observe_loss_terms: cannot differentiate {key.removeprefix('head:')} ({e}); call it "
                    "before the loop's backward(), on loss terms that share its graph"
                ) from None
        pairs: list[tuple[str, str]] = []
        if "policy_loss" in terms and "value_loss" in terms:
            pairs.append(("policy_loss", "value_loss"))
        head_keys = [k for k in terms if k.startswith("head:")]
        pairs += [(a, b) for i, a in enumerate(head_keys) for b in head_keys[i + 1 :]]
        if "value_loss" in terms:
            pairs += [(a, "value_loss") for a in head_keys]
        values: list[torch.Tensor] = []
        shared: dict[tuple[str, str], tuple[int, int]] = {}
        for a, b in pairs:
            ga, gb = grads[a], grads[b]
            both = [j for j in range(len(params)) if ga[j] is not None and gb[j] is not None]
            shared[(a, b)] = (len(both), sum(params[j].numel() for j in both))
            if not both:
                values.append(torch.zeros(3, dtype=torch.float32, device=self.device))
                continue
            va = torch.cat([ga[j].reshape(-1).to(self.device, torch.float32) for j in both])  # type: ignore[union-attr]
            vb = torch.cat([gb[j].reshape(-1).to(self.device, torch.float32) for j in both])  # type: ignore[union-attr]
            values.append(torch.stack([torch.dot(va, vb), torch.dot(va, va), torch.dot(vb, vb)]))
        self._conflict = {
            "values": torch.cat(values),
            "pairs": pairs,
            "shared": shared,
            "passes": len(terms),
        }

    @staticmethod
    def _check_loss_term(arg: str, t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"observe_loss_terms: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"observe_loss_terms: {arg} must be a floating-point tensor, got {t.dtype}")
        if t.numel() != 1:
            raise ValueError(f"observe_loss_terms: {arg} must be a scalar loss, got shape {tuple(t.shape)}")
        if not t.requires_grad:
            raise ValueError(
                f"observe_loss_terms: {arg} does not require grad (detached or computed under no_grad)"
            )
        return t.reshape(())

    def _build_conflict(self, host: Mapping[str, Sequence[float]]) -> GradientConflict:
        state = self._conflict
        assert state is not None
        v = host.get(PREFIX + "conflict", [])

        def cos(i: int) -> float | None:
            dot, aa, bb = v[3 * i : 3 * i + 3]
            if not (aa > 0 and bb > 0):
                return None  # a zero gradient on the shared parameters has no direction
            return max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))

        out = GradientConflict(extra_backward_passes=state["passes"], skipped_calls=self._conflict_skipped)
        for i, (a, b) in enumerate(state["pairs"]):
            params, numel = state["shared"][(a, b)]
            c = cos(i) if params else None
            if (a, b) == ("policy_loss", "value_loss"):
                out.policy_value_cosine = c
                out.shared_params, out.shared_numel = params, numel
                out.policy_norm = math.sqrt(v[3 * i + 1]) if params else math.nan
                out.value_norm = math.sqrt(v[3 * i + 2]) if params else math.nan
            elif b == "value_loss":
                out.head_value_cosines[a.removeprefix("head:")] = c
            else:
                out.head_cosines[f"{a.removeprefix('head:')}|{b.removeprefix('head:')}"] = c
        return out
