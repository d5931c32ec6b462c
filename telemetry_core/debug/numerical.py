"""The numerical-stability report: non-finite losses, gradients and weights, the largest magnitudes.

Per-parameter flags and maxima travel; names are resolved on the host. Non-finite gradients come
from the per-layer table (:mod:`.layers`); weights are checked once, in ``pending`` (after the
update's last optimizer step): a non-finite weight never heals by itself, so one check per update
names every one. The pre-clip total norm of every backward is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from telemetry_core.schema import LayerRow, NumericalReport

__all__ = ["NumericalChecks"]


class NumericalChecks:
    """Losses and pre-clip norms per backward, weights once per update, on the device."""

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        self.names = list(names)
        self.params = list(params)
        self.reset(torch.device("cpu"))

    def reset(self, device: torch.device) -> None:
        self.device = device
        self._pre_clip: list[torch.Tensor] = []
        self._loss_bad_dev: torch.Tensor | None = None
        self._losses_seen = 0
        self._loss_bad_host = 0

    def observe_norms(self, call_norms: torch.Tensor) -> None:
        """One backward's per-parameter L2 norms: its pre-clip total norm, as clipping computes it."""
        self._pre_clip.append(torch.linalg.vector_norm(call_norms))

    def observe_loss(self, loss: torch.Tensor | float | None) -> None:
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
        """(P, 2): [min, max] of every parameter's weights at the end of the update (NaN where a
        NaN is; +-inf where an infinity is; 0, 0 for an empty parameter). Once per update."""
        rows = []
        for p in self.params:
            w = p.detach()
            if w.numel() == 0:
                rows.append(torch.zeros(2, dtype=torch.float32, device=self.device))
                continue
            lo, hi = torch.aminmax(w.reshape(-1))
            rows.append(torch.stack([lo, hi]).to(self.device, torch.float32, non_blocking=True))
        return torch.stack(rows)

    def pending(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {prefix + "weights": self._weight_check()}
        if self._pre_clip:
            out[prefix + "pre_clip_norms"] = torch.stack(self._pre_clip)
        if self._loss_bad_dev is not None:
            out[prefix + "loss_nonfinite"] = self._loss_bad_dev
        return out

    def build(
        self,
        host: Mapping[str, Sequence[float]],
        prefix: str,
        layers: list[LayerRow],
        nonfinite_grads: list[bool],
    ) -> NumericalReport:
        w = host.get(prefix + "weights", [])
        nonfinite_weights: list[str] = []
        best_w, best_w_name = math.nan, ""
        for i, n in enumerate(self.names):
            if not w:
                break
            lo, hi = w[2 * i], w[2 * i + 1]
            if not (math.isfinite(lo) and math.isfinite(hi)):
                nonfinite_weights.append(n)
                continue  # its largest finite |w| is not known without a masked pass
            m = max(abs(lo), abs(hi))
            if self.params[i].numel() and (math.isnan(best_w) or m > best_w):
                best_w, best_w_name = m, n
        best_g, best_g_name = math.nan, ""
        for row in layers:
            if row.calls and not math.isnan(row.min):
                m = max(abs(row.min), abs(row.max))
                if math.isnan(best_g) or m > best_g:
                    best_g, best_g_name = m, row.name
        bad_loss = self._loss_bad_host + round(sum(host.get(prefix + "loss_nonfinite", [0.0])))
        return NumericalReport(
            nonfinite_weights=nonfinite_weights,
            nonfinite_grads=[row.name for row, bad in zip(layers, nonfinite_grads) if bad],
            max_abs_weight=best_w,
            max_abs_weight_param=best_w_name,
            max_abs_grad=best_g,
            max_abs_grad_param=best_g_name,
            loss_finite=None if self._losses_seen == 0 else bad_loss == 0,
            losses_seen=self._losses_seen,
            nonfinite_losses=bad_loss,
            pre_clip_norms=list(host.get(prefix + "pre_clip_norms", [])),
        )
