"""The DEBUG reducer: coordinates the per-layer table, the numerical report, ratio outliers and
gradient conflict, each in its own module, and hands everything over in the hub's single transfer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.debug._common import JOINT, named_parameters
from telemetry_core.debug.conflict import GradientConflictProbe
from telemetry_core.debug.layers import LayerTable
from telemetry_core.debug.numerical import NumericalChecks
from telemetry_core.debug.outliers import RatioOutlierTracker
from telemetry_core.schema import DebugReport

__all__ = ["PREFIX", "DebugDiagnostics"]

PREFIX = "debug."


class DebugDiagnostics:
    """The DEBUG-only reducer (see the package docstring for what it measures and costs).

    ``named_params``: the model (``nn.Module``), a mapping or (name, parameter) pairs; the per-layer
    table lists the parameters that require grad, the weight check covers all. ``heads``: head name
    -> number of actions (or a sequence of names), in the order of the columns of ``actions``.
    ``table_every``: the per-layer table examines every n-th backward of the run ("auto": by model
    size, :data:`telemetry_core.debug.layers.AUTO_ELEMENTS`). ``conflict_every``: gradient conflict
    runs on every n-th DEBUG update ("auto": by model size).
    """

    def __init__(
        self,
        named_params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        heads: Mapping[str, int] | Sequence[str] | None = None,
        thresholds: Thresholds | None = None,
        *,
        max_grad_norm: float = 0.5,
        table_every: int | str = "auto",
        conflict_every: int | str = "auto",
    ) -> None:
        items = named_parameters(named_params)
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
        if len(set(self.heads)) != len(self.heads) or JOINT in self.heads:
            raise ValueError(f"heads must be unique and must not be named {JOINT!r}: {self.heads}")
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
        self._table = LayerTable(self.train_names, self.train_params, self.small, self.large, table_every)
        self._numerical = NumericalChecks(self.names, self.params)
        self._outliers = RatioOutlierTracker(self.heads, self.k)
        self._conflict = GradientConflictProbe(self.heads, self.train_params, conflict_every)
        self.device = torch.device("meta")
        self.reset()
        self._conflict.restart_schedule()  # construction is not a DEBUG update

    @property
    def table_every(self) -> int:
        return self._table.every

    @property
    def conflict_every(self) -> int:
        return self._conflict.every

    # ------------------------------------------------------------------------------------------
    # protocol
    # ------------------------------------------------------------------------------------------
    def reset(self, level: TelemetryLevel | int | str | None = None) -> None:
        """Start an update. With a level below DEBUG, every ``observe_*`` of the update is a no-op."""
        self.active = level is None or TelemetryLevel.parse(level) >= TelemetryLevel.DEBUG
        # accumulate where the model lives (``model.to()`` keeps the Parameter objects)
        self.device = self.params[0].device
        self.skipped = 0
        self._calls = 0
        self._table.reset()
        self._numerical.reset(self.device)
        self._outliers.reset()
        self._conflict.reset(self.device, self.active)
        self._pending_done = False

    def pending(self, level: TelemetryLevel | int | str) -> dict[str, torch.Tensor]:
        """Device tensors for the hub's single transfer; empty below DEBUG."""
        if TelemetryLevel.parse(level) < TelemetryLevel.DEBUG:
            return {}
        out = {PREFIX + k: v for k, v in self._table.pending().items()}
        out.update(self._numerical.pending(PREFIX))
        out.update(self._outliers.pending(PREFIX))
        out.update(self._conflict.pending(PREFIX))
        self._pending_done = True
        return out

    def build(
        self, host: Mapping[str, Sequence[float]], level: TelemetryLevel | int | str
    ) -> DebugReport | None:
        """Turn the transferred values into a :class:`DebugReport` (None below DEBUG)."""
        if TelemetryLevel.parse(level) < TelemetryLevel.DEBUG:
            return None
        if not self._pending_done:
            raise RuntimeError("DebugDiagnostics.build called without pending() for this update")
        layers = self._table.build(host, PREFIX)
        numerical = self._numerical.build(host, PREFIX, layers, self._table.nonfinite(host, PREFIX))
        return DebugReport(
            layers=layers,
            numerical=numerical,
            outliers=self._outliers.build(host, PREFIX),
            conflict=self._conflict.build(host, PREFIX),
            skipped=self.skipped,
            layer_every=self._table.every,
            layer_backwards=self._table.backwards,
            conflict_every=self._conflict.every,
        )

    # ------------------------------------------------------------------------------------------
    # observations
    # ------------------------------------------------------------------------------------------
    def observe_gradients(self, loss: torch.Tensor | float | None = None) -> None:
        """After ``loss.backward()``, before clipping: this backward's norms, and the per-layer table
        when the schedule examines it."""
        if not self.active:
            return
        self._numerical.observe_loss(loss)
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
        norms = self._table.observe(present, grads)
        self._numerical.observe_norms(norms)
        self._calls += 1

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
        self._outliers.observe_minibatch(
            new_logprob, old_logprob, head_new_logprobs, head_old_logprobs, actions, indices, epoch
        )

    def observe_loss_terms(
        self,
        policy_loss: torch.Tensor | None = None,
        value_loss: torch.Tensor | None = None,
        head_losses: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Before the loop's backward: cosines between the loss terms' gradients, on the first call
        of an update the schedule examines (one extra backward pass per term given)."""
        if not self.active:
            return
        self._conflict.observe_loss_terms(policy_loss, value_loss, head_losses)
