"""Per-head ratio outliers: the worst samples of the whole update by |new - old| log-probability.

A running top-k by |new - old| per row (joint and each head) kept on the device: each minibatch's
own top-k is concatenated with the running one and top-k'd again, which equals the top-k over the
concatenated update. NaN/inf differences rank worst. ``indices`` are the rollout positions the loop
passes, else positions within the minibatch (with the minibatch ordinal). The joint row's
``actions`` is the action only when the policy has one head; with several heads it is -1 and
``head_actions`` / ``head_logp_diff`` give every head's action and share of the ratio. A few
kernels per minibatch, whatever the batch size (``topk`` of k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from telemetry_core.debug._common import JOINT, check_logprob, safe_exp, wide
from telemetry_core.schema import RatioOutliers

__all__ = ["RatioOutlierTracker"]

_INF = math.inf
# Fixed outlier payload columns (then actions, then the joint row's per-head differences).
_P_SCORE, _P_INDEX, _P_MB, _P_EPOCH, _P_DIFF = range(5)
_P_FIXED = 5


class _OutlierRow:
    """Running top-k of one row (joint or a head) and its update-wide |diff| summary, on device."""

    __slots__ = ("payload", "samples", "summary")

    def __init__(self) -> None:
        self.payload: torch.Tensor | None = None  # [<=k, columns] float64, worst first
        self.summary: torch.Tensor | None = None  # [sum |d|, max |d|, nonfinite count] float64
        self.samples = 0


class RatioOutlierTracker:
    """The running top-k rows of one update. ``heads``: head names in the order of action columns."""

    def __init__(self, heads: list[str], k: int) -> None:
        self.heads = heads
        self.k = k
        self.reset()

    def reset(self) -> None:
        self._rows: dict[str, _OutlierRow] = {}
        self._minibatches = 0
        self._index_rollout = False
        self._actions_seen = False
        self._head_logp_seen = False
        self._layout: list[tuple[str, int, int, int]] = []

    def pending(self, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        rows = []
        for name, row in self._rows.items():
            if row.payload is None or row.summary is None:
                continue
            out[f"{prefix}outliers.{name}"] = row.payload
            out[f"{prefix}outliers.{name}.summary"] = row.summary
            rows.append((name, int(row.payload.shape[0]), int(row.payload.shape[1]), row.samples))
        self._layout = rows
        return out

    def build(self, host: Mapping[str, Sequence[float]], prefix: str) -> list[RatioOutliers]:
        return [self._build_outliers(host, prefix, name, n, c, s) for name, n, c, s in self._layout]

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
        new = check_logprob("new_logprob", new_logprob)
        old = check_logprob("old_logprob", old_logprob, new_logprob)
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
        head_diffs = {name: wide(heads_new[name]) - wide(heads_old[name]) for name in heads_new}
        if head_diffs:
            self._head_logp_seen = True
        diff = wide(new) - wide(old)
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
        self._fold_row(JOINT, diff, idx, mb, epoch, extra)
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
        hn = {k: check_logprob(f"head_new_logprobs[{k!r}]", v, like) for k, v in head_new.items()}
        ho = {k: check_logprob(f"head_old_logprobs[{k!r}]", v, like) for k, v in head_old.items()}
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
        self, host: Mapping[str, Sequence[float]], prefix: str, name: str, n: int, c: int, samples: int
    ) -> RatioOutliers:
        flat = host[f"{prefix}outliers.{name}"]
        s = host[f"{prefix}outliers.{name}.summary"]
        rows = [flat[i * c : (i + 1) * c] for i in range(n)]
        diffs = [r[_P_DIFF] for r in rows]
        act_w = (max(len(self.heads), 1)) if name == JOINT else 1
        actions: list[int] = []
        head_actions: dict[str, list[int]] = {}
        head_logp: dict[str, list[float]] = {}
        if self._actions_seen:
            if name != JOINT or len(self.heads) <= 1:
                actions = [round(r[_P_FIXED]) for r in rows]
            else:
                actions = [-1] * n
                head_actions = {h: [round(r[_P_FIXED + j]) for r in rows] for j, h in enumerate(self.heads)}
        if name == JOINT and self.heads and self._head_logp_seen:
            base = _P_FIXED + act_w
            head_logp = {h: [r[base + j] for r in rows] for j, h in enumerate(self.heads)}
        return RatioOutliers(
            head=name,
            index_kind="rollout" if self._index_rollout else "minibatch",
            indices=[round(r[_P_INDEX]) for r in rows],
            minibatches=[round(r[_P_MB]) for r in rows],
            epochs=[round(r[_P_EPOCH]) for r in rows],
            ratios=[safe_exp(d) if not math.isnan(d) else math.nan for d in diffs],
            actions=actions,
            logp_diff=diffs,
            head_actions=head_actions,
            head_logp_diff=head_logp,
            samples=samples,
            nonfinite=round(s[2]),
            logp_diff_mean=s[0] / samples if samples else math.nan,
            logp_diff_max=s[1],
        )
