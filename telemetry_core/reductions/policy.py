"""Policy statistics of one PPO update: ratios, KL, clipping, effective sample size, entropy.

Everything here is O(minibatch) and computed at MINIMAL and above, and almost all of it is deferred
to the end of the update. :meth:`PolicyReducer.observe` checks its arguments (host metadata only)
and makes one private copy of the minibatch: a single ``stack`` of the joint and per-head new and
old log-probs and the entropies into a ``(columns, n)`` block (one kernel; one more per loss
tensor, and per entropy shaped unlike the log-probs). A copy rather than a reference because a loop
may refill its minibatch buffers before the update ends, and copying a few thousand floats is one
cheap kernel. :meth:`PolicyReducer.pending` then folds every stored minibatch at once: per layout
(sample count, heads, clip range: a loop with equal minibatches has one) a ``stack`` into
``(M, columns, n)`` and ONE batched pass of ~35 kernels over the ``(M, 1 + heads, n)`` float64
log-ratios gives every minibatch's row of sums, which are merged as below; nothing syncs before the
hub's transfer. Memory: (2 + 2 x heads + entropies) floats per sample of the update (the demo's
update of 4 epochs x 1024 samples with 2 heads: 32 floats per sample, 128 KiB); past
``FOLD_ELEMENTS`` stored elements the blocks are folded early, so a huge update keeps at most that
many floats plus 17 per minibatch and head.

Numerical care:

* The log-ratio ``new - old`` is formed first, in float64 (bf16/fp16/fp32 log-probs are upcast
  before subtracting), and every statistic derives from it: ``r = exp(lr)``, ``r - 1 = expm1(lr)``
  (exact near r = 1), k3 ``= expm1(lr) - lr`` (float64 keeps its ~lr**2/2 value accurate where
  float32 loses it to cancellation), k1 ``= -lr``. The ratio is never exponentiated and logged back.
* Nothing is clamped. NaN inputs give NaN ratio/KL statistics and NaN clip fractions (a NaN sample
  can be neither inside nor outside the clip range), and are counted in ``logratio_nan``. A
  log-ratio of +inf gives ``ratio_max = inf`` and k3 = +inf (its limit), counted in ``logratio_inf``.
* The ratio's std: each minibatch's mean and centred sum of squares (two-pass, float64), merged
  across minibatches by Chan's exact formula, so many minibatches give what one big batch would.

Definitions (population statistics over every sample of every minibatch of the update unless said):

* ``ratio_mean/std/min/max``: of ``r`` over all samples (std with ddof=0).
* ``kl_k3_mean``/``kl_k1_mean``: sample-weighted mean over the update; ``kl_k3_max``/``kl_k1_max``:
  max over minibatches of the minibatch mean; ``kl_k3_per_epoch``/``kl_k1_per_epoch``:
  sample-weighted mean of each epoch, and ``kl_k3_max_per_epoch``/``kl_k1_max_per_epoch``: the max of
  that epoch's minibatch means, in epoch order (how far each epoch moved the policy, and where).
* ``clip_fraction``: share of samples with ``|r - 1| > clip_range`` (the SB3/CleanRL convention),
  split into ``clip_fraction_high`` (``r > 1 + eps``) and ``clip_fraction_low`` (``r < 1 - eps``).
* ``ess``: per minibatch ``ESS_b = (sum r)^2 / (n_b sum r^2)`` — the Kish effective sample size of
  the importance weights over ``n_b``, in (0, 1], 1 when all ratios are equal, ``1/n_b`` when one
  sample carries all the weight. It is computed from ``w = exp(lr - max lr)`` (same value, no
  overflow). ``ess`` is the sample-weighted mean of ``ESS_b``, ``ess_min`` the worst minibatch.
  Per minibatch, because the ratios of one minibatch share one policy snapshot; pooling ratios of
  different epochs would mix different policies.
* ``entropy[head]``: mean of the per-sample entropies handed over, pooled over all minibatches
  (a 0-d entropy counts as one value, i.e. the minibatch mean); ``entropy_normalized[head]`` divides
  it by ``log(number of actions)``. A 1-action head always has zero entropy and no normalised
  entropy: it is left out of ``entropy_normalized``. With action masks
  (:meth:`PolicyReducer.observe_action_masks`) each sample's entropy is divided by the log of ITS
  number of valid actions instead and those ratios are averaged (a uniform policy over 10 valid of
  20 actions reads 1.0, not log 10 / log 20); samples with one valid action have no normalised
  entropy and are left out of that mean (all of them: the head is left out).
* ``head_*``: the same ratio, KL and clip statistics from the per-head log-probs.
* Continuous heads' log-stds, differential entropy, log-std trend and action saturation:
  :mod:`telemetry_core.reductions.gaussian`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.advantage import (
    FOLD_ELEMENTS,
    ScalarSeries,
    acc_dtype,
    as_int,
    as_real,
    check_float_tensor,
    check_same_layout,
)
from telemetry_core.reductions.gaussian import GaussianReducer
from telemetry_core.reductions.transfer import to_device
from telemetry_core.schema import PolicyStats

__all__ = ["PolicyReducer"]

# Row of one log-ratio (the joint one or a head's) in one minibatch, float64 on the device. The
# first columns add across minibatches; the ratio's mean and central sum of squares are merged by
# Chan's formula; the last two are extremes.
# (_SUM_K3 and _SUM_K1 are adjacent: pending() slices them together.)
# _T_* count the ratio's tail beyond the anomaly limits (ratio_explosion, its critical limit,
# ratio_collapse, its critical limit): how many samples moved that far, not only the one extreme.
_N, _SUM_D, _SUM_K3, _SUM_K1, _N_HI, _N_LO, _N_NAN, _N_INF = range(8)
_T_ABOVE, _T_ABOVE_CRIT, _T_BELOW, _T_BELOW_CRIT, _SUM_NESS = range(8, 13)
_N_SUMS = 13
_MEAN_R, _M2_R, _R_MAX, _R_MIN = range(13, 17)
# Layout of the transferred joint summary: the sums above, then these.
_S_M2, _S_R_MAX, _S_R_MIN, _S_ESS_MIN, _S_K3_MAX, _S_K1_MAX = range(13, 19)
# Layout of a transferred head summary: the sums above, then its ratio max and min.
_H_R_MAX, _H_R_MIN = 13, 14


def _is_like(t: object, shape: torch.Size, device: torch.device) -> bool:
    """The fast path of the per-call checks: a float tensor shaped like the log-probs, on their device."""
    return isinstance(t, torch.Tensor) and t.shape == shape and t.device == device and t.is_floating_point()


def _checked(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """The slow path: the clear error naming ``name`` (or the detached tensor, if it passes)."""
    t = check_float_tensor(name, value)
    check_same_layout("new_logprob", like, name, t)
    return t


def _check_logprob_map(name: str, value: object, known: Mapping[str, int], like: torch.Tensor) -> None:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping head -> tensor, got {type(value).__name__}")
    unknown = [h for h in value if h not in known]
    if unknown:
        raise ValueError(f"{name} names unknown heads {unknown}; known heads: {list(known)}")
    shape, device = like.shape, like.device
    for head, tensor in value.items():
        if not _is_like(tensor, shape, device):
            _checked(f"{name}[{head!r}]", tensor, like)


def _ratio_terms(lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, r - 1, k3) of a float64 log-ratio; k3 takes its limit +inf where lr = +inf."""
    r = torch.exp(lr)
    d = torch.expm1(lr)
    k3 = torch.where(torch.isposinf(lr), lr, d - lr)
    return r, d, k3


def _ratio_rows(lr: torch.Tensor, eps: float, tail: tuple[float, float, float, float]) -> torch.Tensor:
    """Per-minibatch rows (layout ``_N`` .. ``_R_MIN``) of a float64 ``(M, R, n)`` block of log-ratios:
    M minibatches of n samples, R = the joint log-ratio and each head's. ``tail``: the ratio limits
    (above, above critical, below, below critical) whose exceedances are counted. ~40 kernels,
    however large M and R are."""
    m, rr, n = lr.shape
    r, d, k3 = _ratio_terms(lr)
    sums = torch.stack((d, k3, -lr), dim=2).sum(3)
    hi, hi_crit, lo, lo_crit = tail
    counts = (
        torch.stack(
            (d > eps, d < -eps, torch.isnan(lr), torch.isinf(lr), r > hi, r > hi_crit, r < lo, r < lo_crit),
            dim=2,
        )
        .sum(3)
        .to(lr.dtype)
    )
    lr_min, lr_max = torch.aminmax(lr, dim=2)  # exp is monotone: the ratio's extremes follow
    w = torch.exp(lr - lr_max.unsqueeze(2))  # ESS is scale-free: weights relative to the largest
    ws = torch.stack((w, w * w), dim=2).sum(3)
    n_ess = ws[..., 0] * ws[..., 0] / ws[..., 1]  # n_b * ESS_b
    mean_r = r.mean(2, keepdim=True)
    centred = r - mean_r
    return torch.cat(
        (
            torch.full((m, rr, 1), float(n), dtype=lr.dtype, device=lr.device),
            sums,
            counts,
            torch.stack((n_ess, mean_r[..., 0], (centred * centred).sum(2)), dim=2),
            torch.exp(torch.stack((lr_max, lr_min), dim=2)),
        ),
        dim=2,
    )


class PolicyReducer:
    """Accumulates policy statistics over every minibatch and epoch of one PPO update.

    ``heads`` maps each action head to its number of actions (for entropy normalisation). The
    protocol: :meth:`reset` at the start of an update, :meth:`observe` per minibatch (no host sync),
    :meth:`early_stop` when the loop's target-KL stop fires, :meth:`pending` once (device tensors
    named ``policy.*``), then :meth:`build` from the transferred values.
    """

    PREFIX = "policy."

    def __init__(self, heads: Mapping[str, int], thresholds: Thresholds | None = None) -> None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping head -> number of actions, got {type(heads).__name__}")
        for head in heads:
            if not isinstance(head, str) or not head:
                raise ValueError(f"heads: head names must be non-empty strings, got {head!r}")
        self.heads: dict[str, int] = {
            h: as_int(f"heads[{h!r}] (number of actions)", n, minimum=1) for h, n in heads.items()
        }
        self.thresholds = thresholds or Thresholds()
        t = self.thresholds
        # Python floats: comparing a tensor with them launches no transfer.
        self.tail_limits = (
            float(t.ratio_explosion),
            float(t.ratio_explosion_critical),
            float(t.ratio_collapse),
            float(t.ratio_collapse_critical),
        )
        self._gauss = GaussianReducer(tuple(self.heads))
        self.reset()

    # -- protocol ----------------------------------------------------------------------------------
    def reset(self) -> None:
        self._sizes: list[int] = []  # samples of every observed minibatch, in call order
        self._epochs: list[int] = []  # epoch of every observed minibatch, in call order
        # Minibatches not folded yet, by layout: (n, heads, inline entropy heads, clip range, device)
        # -> [(block, epoch)], a block being the call's (columns, n) copy.
        self._stored: dict[tuple[Any, ...], list[tuple[torch.Tensor, int]]] = {}
        self._stored_elements = 0
        self._blocks: list[tuple[tuple[str, ...], torch.Tensor]] = []  # folded (heads, (M, 1 + heads, 17))
        self._joint: list[torch.Tensor] = []  # the same blocks' (M, 17) rows of the joint log-ratio
        self._row_epochs: list[int] = []  # epoch of every folded joint row, in row order
        self._head_rows: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}
        self._head_sizes: dict[str, int] = dict.fromkeys(self.heads, 0)
        # per head: 1-D tensors of per-minibatch entropy sums, the epoch of each of their elements,
        # and the samples per epoch - summed per epoch in pending()
        self._entropy: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}
        self._entropy_epochs: dict[str, list[int]] = {h: [] for h in self.heads}
        self._entropy_counts: dict[str, dict[int, int]] = {h: {} for h in self.heads}
        # Masked heads: per call a (2 x heads, n) block of each head's entropies and valid-action
        # counts, by (heads, device, dtype), folded into float64 [sum of entropy / log(valid
        # actions), samples with > 1 valid] per head in pending() (or early, past FOLD_ELEMENTS).
        self._mask_blocks: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._mask_elements = 0
        self._masked: dict[str, list[torch.Tensor]] = {h: [] for h in self.heads}
        self._gauss.reset()  # continuous heads: log-std, differential entropy, saturation
        self._loss = ScalarSeries("policy_loss")
        self._clip_range = math.nan
        self._early: tuple[int, float | torch.Tensor | None] | None = None
        self._entropy_coef: float | None = None

    def observe(
        self,
        *,
        new_logprob: torch.Tensor,
        old_logprob: torch.Tensor,
        clip_range: float,
        epoch: int,
        head_new_logprobs: Mapping[str, torch.Tensor] | None = None,
        head_old_logprobs: Mapping[str, torch.Tensor] | None = None,
        head_entropies: Mapping[str, torch.Tensor] | None = None,
        policy_loss: torch.Tensor | float | None = None,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
        entropy_coef: float | None = None,
    ) -> None:
        """One minibatch. Joint log-probs are required; per-head ones are optional (both or neither,
        same heads, each shaped like ``new_logprob``). Inputs are checked even at OFF.

        Cost: the checks (host metadata only) and ONE kernel, a ``stack`` that copies the
        minibatch's log-probs and entropies into a private ``(columns, n)`` block (the loop may
        refill its buffers before the update ends); one more per entropy shaped unlike the
        log-probs and per loss tensor. Every statistic is computed in :meth:`pending`.
        """
        new = check_float_tensor("new_logprob", new_logprob)
        shape, device = new.shape, new.device
        old = (
            old_logprob if _is_like(old_logprob, shape, device) else _checked("old_logprob", old_logprob, new)
        )
        eps = as_real("clip_range", clip_range, minimum=0.0)
        epoch = as_int("epoch", epoch, minimum=0)
        if (head_new_logprobs is None) != (head_old_logprobs is None):
            raise ValueError("head_new_logprobs and head_old_logprobs must be given together")
        names: tuple[str, ...] = ()
        if head_new_logprobs is not None:
            _check_logprob_map("head_new_logprobs", head_new_logprobs, self.heads, new)
            _check_logprob_map("head_old_logprobs", head_old_logprobs, self.heads, new)
            assert head_old_logprobs is not None
            if head_new_logprobs.keys() != head_old_logprobs.keys():
                raise ValueError(
                    f"head_new_logprobs has heads {sorted(head_new_logprobs)} but head_old_logprobs has "
                    f"{sorted(head_old_logprobs)}; they must name the same heads"
                )
            names = tuple(h for h in self.heads if h in head_new_logprobs)
        inline: tuple[str, ...] = ()
        apart: dict[str, torch.Tensor] = {}  # entropies shaped unlike the log-probs (e.g. a mean)
        if head_entropies is not None:
            if type(head_entropies) is not dict and not isinstance(head_entropies, Mapping):
                raise TypeError("head_entropies must be a mapping head -> tensor")
            unknown = [h for h in head_entropies if h not in self.heads]
            if unknown:
                raise ValueError(
                    f"head_entropies names unknown heads {unknown}; known heads: {list(self.heads)}"
                )
            for h, t in head_entropies.items():
                if not _is_like(t, shape, device):
                    apart[h] = check_float_tensor(f"head_entropies[{h!r}]", t)
            inline = tuple(h for h in self.heads if h in head_entropies and h not in apart)
        loss = None if policy_loss is None else self._loss.check(policy_loss)
        coef = None if entropy_coef is None else as_real("entropy_coef", entropy_coef)
        if level <= TelemetryLevel.OFF:
            return
        if coef is not None:
            self._entropy_coef = coef  # a constant of the update: the last one reported stands
        if loss is not None:
            self._loss.add_checked(loss)
        n = new.numel()
        cols = [new]
        if names:
            assert head_new_logprobs is not None and head_old_logprobs is not None
            cols += [head_new_logprobs[h] for h in names]
            cols.append(old)
            cols += [head_old_logprobs[h] for h in names]
        else:
            cols.append(old)
        if inline:
            assert head_entropies is not None
            cols += [head_entropies[h] for h in inline]
        if any(t.requires_grad for t in cols):  # the copy must not join the loop's autograd graph
            with torch.no_grad():
                block = torch.stack(cols)
        else:
            block = torch.stack(cols)  # the one copy: promotes to the widest dtype, so it is exact
        if new.dim() != 1:
            block = block.reshape(len(cols), n)
        for head, ent in apart.items():
            self._entropy[head].append(ent.sum(dtype=acc_dtype(ent.device)).reshape(1))
            self._entropy_epochs[head].append(int(epoch))
            counts = self._entropy_counts[head]
            counts[int(epoch)] = counts.get(int(epoch), 0) + ent.numel()
        self._stored.setdefault((n, names, inline, eps, device), []).append((block, int(epoch)))
        self._stored_elements += block.numel()
        self._sizes.append(n)
        self._epochs.append(int(epoch))
        for head in names:
            self._head_sizes[head] += n
        for head in inline:
            counts = self._entropy_counts[head]
            counts[int(epoch)] = counts.get(int(epoch), 0) + n
        self._clip_range = eps
        if self._stored_elements > FOLD_ELEMENTS:
            self._fold()

    def observe_action_masks(
        self,
        head_entropies: Mapping[str, torch.Tensor],
        head_action_masks: Mapping[str, torch.Tensor],
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """One minibatch's action masks, for the mask-aware normalised entropy of those heads: each
        ``head_action_masks[head]`` is a bool ``(n, actions)`` tensor (True = valid) for the ``n``
        per-sample entropies ``head_entropies[head]`` (also handed to :meth:`observe`). Heads
        without a mask keep ``log(number of actions)``. No sync: one ``sum`` kernel per head and
        one ``stack`` (a private copy, like :meth:`observe`'s); the rest is batched in :meth:`pending`."""
        if type(head_action_masks) is not dict and not isinstance(head_action_masks, Mapping):
            raise TypeError("head_action_masks must be a mapping head -> bool tensor")
        checked: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for head, mask in head_action_masks.items():
            if head not in self.heads:
                raise ValueError(
                    f"head_action_masks names unknown head {head!r}; known heads: {list(self.heads)}"
                )
            ent = head_entropies.get(head) if isinstance(head_entropies, Mapping) else None
            if ent is None:
                raise ValueError(f"head_action_masks[{head!r}] needs head_entropies[{head!r}]")
            ent = check_float_tensor(f"head_entropies[{head!r}]", ent)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"head_action_masks[{head!r}] must be a bool tensor")
            if mask.shape != (ent.numel(), self.heads[head]) or mask.device != ent.device:
                raise ValueError(
                    f"head_action_masks[{head!r}] must have shape ({ent.numel()}, {self.heads[head]}) on "
                    f"{ent.device}, got {tuple(mask.shape)} on {mask.device}"
                )
            checked.append((head, ent, mask))
        if level <= TelemetryLevel.OFF:
            return
        if not checked:
            return
        # counts in float32 at least (exact to 2**24 actions), float64 if an entropy is
        dtype = torch.float64 if any(e.dtype == torch.float64 for _, e, _ in checked) else torch.float32
        with torch.no_grad():
            cols: list[torch.Tensor] = []
            for _, ent, mask in checked:
                cols.append(ent.reshape(-1).to(dtype))
                cols.append(mask.sum(1, dtype=dtype))
            block = torch.stack(cols)
        key = (tuple(h for h, _, _ in checked), block.device, dtype)
        self._mask_blocks.setdefault(key, []).append(block)
        self._mask_elements += block.numel()
        if self._mask_elements > FOLD_ELEMENTS:
            self._fold_masks()

    def _fold_masks(self) -> None:
        """Each masked head's [sum of entropy / log(valid actions), samples with > 1 valid] over the
        stored blocks: ~10 kernels per layout, however many minibatches."""
        blocks, self._mask_blocks = self._mask_blocks, {}
        self._mask_elements = 0
        with torch.no_grad():
            for (names, device, _), parts in blocks.items():
                x = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).to(acc_dtype(device))
                ent, valid = x[0::2], x[1::2]
                several = valid > 1
                per_sample = torch.where(several, ent / torch.log(valid.clamp(min=2)), 0.0)
                sums = torch.stack((per_sample.sum(1), several.sum(1).to(x.dtype)), dim=1)  # (heads, 2)
                for j, head in enumerate(names):
                    self._masked[head].append(sums[j])

    def observe_log_std(
        self, head: str, log_std: torch.Tensor, level: TelemetryLevel = TelemetryLevel.NORMAL
    ) -> None:
        """A continuous (diagonal Gaussian) head's log standard deviations, ``(dims,)`` or
        ``(..., dims)`` (:class:`GaussianReducer`). No sync."""
        self._gauss.check_head("observe_log_std", head)
        t = check_float_tensor("log_std", log_std)  # (refuses an empty tensor)
        if level <= TelemetryLevel.OFF:
            return
        self._gauss.observe_log_std(head, t)

    def observe_actions(
        self,
        head: str,
        actions: torch.Tensor,
        *,
        low: object = None,
        high: object = None,
        squashed: bool = False,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """A continuous head's actions before clipping (or pre-tanh values of a squashed head), for
        its saturation (:class:`GaussianReducer`). No sync."""
        if level <= TelemetryLevel.OFF:
            self._gauss.check_head("observe_actions", head)
            check_float_tensor("actions", actions)
            return
        self._gauss.observe_actions(head, actions, low=low, high=high, squashed=squashed)

    def early_stop(self, epoch: int, kl: torch.Tensor | float | None = None) -> None:
        """Record the loop's target-KL early stop (the first of the update counts). No sync: a
        tensor ``kl`` is transferred with everything else."""
        epoch = as_int("epoch", epoch, minimum=0)
        value: float | torch.Tensor | None
        if kl is None:
            value = None
        elif isinstance(kl, torch.Tensor):
            if kl.numel() != 1:
                raise ValueError(f"kl must hold one value, got shape {tuple(kl.shape)}")
            value = kl.detach().reshape(1).to(acc_dtype(kl.device))
        elif isinstance(kl, numbers.Real) and not isinstance(kl, bool):
            value = float(kl)
        else:
            raise TypeError(f"kl must be a tensor, a number or None, got {type(kl).__name__}")
        if self._early is None:
            self._early = (int(epoch), value)

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        """Device tensors named ``policy.*`` for the hub's single transfer."""
        out: dict[str, torch.Tensor] = {}
        if level <= TelemetryLevel.OFF:
            return out
        with torch.no_grad():
            self._fold()
            if self._joint:
                layouts = {names for names, _ in self._blocks}
                if len(layouts) == 1:  # the usual case: every minibatch had the same heads
                    block = (
                        self._blocks[0][1]
                        if len(self._blocks) == 1
                        else torch.cat([b for _, b in self._blocks])
                    )
                    rows = block[:, 0]
                    sums, extremes = self._merge_rows(block)  # every log-ratio (joint, heads) at once
                    for j, head in enumerate(next(iter(layouts)), start=1):
                        out[f"policy.head.{head}"] = torch.cat((sums[j], extremes[j]))
                    sums, extremes = sums[0], extremes[0]
                else:
                    rows = self._joint[0] if len(self._joint) == 1 else torch.cat(self._joint)
                    sums, extremes = self._merge_rows(rows)
                    for head, hrows in self._head_rows.items():
                        if hrows:
                            h_sums, h_extremes = self._merge_rows(
                                hrows[0] if len(hrows) == 1 else torch.cat(hrows)
                            )
                            out[f"policy.head.{head}"] = torch.cat((h_sums, h_extremes))
                n_b = rows[:, _N]
                mean_r = (n_b * rows[:, _MEAN_R]).sum() / sums[_N]
                dev = rows[:, _MEAN_R] - mean_r
                m2 = (rows[:, _M2_R] + n_b * dev * dev).sum()  # Chan: exact merge of central sums
                kl_mb = rows[:, _SUM_K3 : _SUM_K1 + 1] / n_b.unsqueeze(1)  # per-minibatch k3, k1 means
                out["policy.summary"] = torch.cat(
                    (
                        sums,
                        m2.reshape(1),
                        extremes,
                        (rows[:, _SUM_NESS] / n_b).amin().reshape(1),
                        kl_mb.amax(0),
                    )
                )
                # per epoch: (k3 sum, k1 sum, k3 max, k1 max over the epoch's minibatch means)
                k = rows[:, _SUM_K3 : _SUM_K1 + 1]
                epochs = sorted(set(self._row_epochs))
                if len(epochs) == 1:
                    out["policy.epoch_kl"] = torch.cat((k.sum(0), kl_mb.amax(0)))
                else:
                    slot = {e: i for i, e in enumerate(epochs)}
                    index = to_device(torch.tensor([slot[e] for e in self._row_epochs]), k.device)
                    sums = torch.zeros(len(epochs), 2, dtype=k.dtype, device=k.device).index_add_(0, index, k)
                    member = index.unsqueeze(0) == torch.arange(len(epochs), device=k.device).unsqueeze(1)
                    maxes = torch.where(member.unsqueeze(2), kl_mb.unsqueeze(0), -math.inf).amax(1)
                    out["policy.epoch_kl"] = torch.cat((sums, maxes), 1).reshape(-1)
            for head, sums_h in self._entropy.items():
                if sums_h:  # one sum per epoch, in epoch order
                    h_sums = sums_h[0] if len(sums_h) == 1 else torch.cat(sums_h)
                    h_epochs = sorted(self._entropy_counts[head])
                    if len(h_epochs) == 1:
                        out[f"policy.entropy.{head}"] = h_sums.sum().reshape(1)
                    else:
                        slot = {e: i for i, e in enumerate(h_epochs)}
                        index = to_device(
                            torch.tensor([slot[e] for e in self._entropy_epochs[head]]), h_sums.device
                        )
                        out[f"policy.entropy.{head}"] = torch.zeros(
                            len(h_epochs), dtype=h_sums.dtype, device=h_sums.device
                        ).index_add_(0, index, h_sums)
            out.update(self._gauss.pending())
            self._fold_masks()
            for head, parts in self._masked.items():
                if parts:
                    out[f"policy.masked_entropy.{head}"] = (
                        parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
                    )
            loss = self._loss.pending()
            if loss is not None:
                out["policy.loss"] = loss
            if self._early is not None and isinstance(self._early[1], torch.Tensor):
                out["policy.early_stop_kl"] = self._early[1]
        return out

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> PolicyStats | None:
        """The update's :class:`PolicyStats` from the transferred values; None at OFF."""
        if level <= TelemetryLevel.OFF:
            return None
        stats = PolicyStats(
            minibatches=len(self._sizes), epochs=len(set(self._epochs)), clip_range=self._clip_range
        )
        if self._sizes and "policy.summary" in host:
            s = host["policy.summary"]
            n = float(sum(self._sizes))
            stats.samples = int(n)
            stats.ratio_mean = 1.0 + s[_SUM_D] / n  # from r - 1: no rounding of 1 + tiny
            var = s[_S_M2] / n
            stats.ratio_std = math.sqrt(max(var, 0.0)) if var == var else math.nan
            stats.ratio_max, stats.ratio_min = s[_S_R_MAX], s[_S_R_MIN]
            stats.ess = s[_SUM_NESS] / n
            stats.ess_min = s[_S_ESS_MIN]
            stats.kl_k3_mean = s[_SUM_K3] / n
            stats.kl_k1_mean = s[_SUM_K1] / n
            stats.kl_k3_max, stats.kl_k1_max = s[_S_K3_MAX], s[_S_K1_MAX]
            stats.logratio_nan, stats.logratio_inf = int(s[_N_NAN]), int(s[_N_INF])
            stats.ratio_above, stats.ratio_above_critical = int(s[_T_ABOVE]), int(s[_T_ABOVE_CRIT])
            stats.ratio_below, stats.ratio_below_critical = int(s[_T_BELOW]), int(s[_T_BELOW_CRIT])
            stats.ratio_tail_limits = list(self.tail_limits)
            poisoned = s[_N_NAN] > 0
            stats.clip_fraction_high = math.nan if poisoned else s[_N_HI] / n
            stats.clip_fraction_low = math.nan if poisoned else s[_N_LO] / n
            stats.clip_fraction = math.nan if poisoned else (s[_N_HI] + s[_N_LO]) / n
            epoch_sizes: dict[int, int] = {}
            for e, size in zip(self._epochs, self._sizes):
                epoch_sizes[e] = epoch_sizes.get(e, 0) + size
            per_epoch = host["policy.epoch_kl"]
            for i, e in enumerate(sorted(epoch_sizes)):
                k3_sum, k1_sum, k3_max, k1_max = per_epoch[4 * i : 4 * i + 4]
                stats.kl_k3_per_epoch.append(k3_sum / epoch_sizes[e])
                stats.kl_k1_per_epoch.append(k1_sum / epoch_sizes[e])
                stats.kl_k3_max_per_epoch.append(k3_max)
                stats.kl_k1_max_per_epoch.append(k1_max)
        for head in self.heads:
            key = f"policy.head.{head}"
            if key in host:
                h = host[key]
                hn = float(self._head_sizes[head])
                poisoned = h[_N_NAN] > 0
                stats.head_kl_k3[head] = h[_SUM_K3] / hn
                stats.head_clip_high[head] = math.nan if poisoned else h[_N_HI] / hn
                stats.head_clip_low[head] = math.nan if poisoned else h[_N_LO] / hn
                stats.head_clip_fraction[head] = math.nan if poisoned else (h[_N_HI] + h[_N_LO]) / hn
                stats.head_ratio_max[head] = h[_H_R_MAX]
                stats.head_ratio_min[head] = h[_H_R_MIN]
                stats.head_ratio_above[head] = int(h[_T_ABOVE])
                stats.head_ratio_below[head] = int(h[_T_BELOW])
            key = f"policy.entropy.{head}"
            if key in host:
                counts = self._entropy_counts[head]
                per_epoch = host[key]
                ent = math.fsum(per_epoch) / sum(counts.values())
                stats.entropy[head] = ent
                scale: float | None = None  # raw entropy -> normalised
                masked = host.get(f"policy.masked_entropy.{head}")
                if masked is not None:  # per sample, by the log of its valid actions
                    if masked[1] > 0:
                        stats.entropy_normalized[head] = masked[0] / masked[1]
                        # per epoch: the update's own ratio of normalised to raw (an approximation:
                        # the epochs see the same samples, so the same valid-action counts)
                        scale = stats.entropy_normalized[head] / ent if ent > 0 else None
                elif self.heads[head] > 1:
                    scale = 1.0 / math.log(self.heads[head])
                    stats.entropy_normalized[head] = ent * scale
                if scale is not None and len(per_epoch) > 1:
                    stats.entropy_normalized_per_epoch[head] = [
                        s / c * scale for s, c in zip(per_epoch, (counts[e] for e in sorted(counts)))
                    ]
        self._gauss.fill(stats, host)
        stats.policy_loss = self._loss.result(host.get("policy.loss"))[0]
        stats.entropy_coef = self._entropy_coef
        if self._early is not None:
            epoch, kl = self._early
            stats.early_stopped = True
            stats.early_stop_epoch = epoch
            stats.early_stop_kl = host["policy.early_stop_kl"][0] if isinstance(kl, torch.Tensor) else kl
        return stats

    # -- the deferred work (device only) -----------------------------------------------------------
    @staticmethod
    def _merge_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums and [ratio max, ratio min] over the minibatches (dim 0) of (M, ..., 17) rows."""
        extremes = torch.stack((rows[..., _R_MAX].amax(0), rows[..., _R_MIN].amin(0)), dim=-1)
        return rows[..., :_N_SUMS].sum(0), extremes

    def _fold(self) -> None:
        """Reduce the stored minibatches to per-minibatch rows: one batched pass per layout.

        A layout is (samples, heads, inline entropies, clip range, device); a PPO loop with equal
        minibatches has one, so its whole update costs one ``stack`` and ~40 kernels here, however
        many minibatches and heads it has. Runs in :meth:`pending`, or earlier when the stored
        blocks exceed ``FOLD_ELEMENTS`` elements (which bounds the memory kept for huge updates to
        that many floats plus 17 floats per minibatch and head).
        """
        stored, self._stored = self._stored, {}
        self._stored_elements = 0
        for (_, names, inline, eps, device), items in stored.items():
            blocks = [block for block, _ in items]
            x = blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)  # (M, columns, n)
            x = x.to(acc_dtype(device))  # float64: the log-ratio is formed after the upcast
            r = 1 + len(names)
            rows = _ratio_rows(x[:, :r] - x[:, r : 2 * r], eps, self.tail_limits)  # (M, r, 17)
            self._blocks.append((names, rows))
            self._joint.append(rows[:, 0])
            self._row_epochs.extend(epoch for _, epoch in items)
            for j, head in enumerate(names, start=1):
                self._head_rows[head].append(rows[:, j])
            if inline:
                ent = x[:, 2 * r :].sum(2)  # (M, inline heads): per minibatch, summed per epoch later
                epochs = [epoch for _, epoch in items]
                for j, head in enumerate(inline):
                    self._entropy[head].append(ent[:, j])
                    self._entropy_epochs[head].extend(epochs)
