"""Gradient conflict: cosines between the gradients of the separate loss terms.

One ``torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)`` per loss term
handed over (policy, value, each head loss): **2 + number of head losses extra backward passes**,
on the first ``observe_loss_terms`` call of an examined update (later calls are counted and
skipped). It examines every ``every``-th DEBUG update (``DebugReport.conflict_every`` says which;
``every="auto"`` is 1 up to ``AUTO_ELEMENTS`` parameters, more above, since each extra pass costs
a whole backward). ``.grad`` is untouched (no accumulation), no ``create_graph``; the loop's own
backward then runs on the retained graph. Per pair of terms, the gradients on the parameters both
reach are concatenated once per term (one ``cat``, one conversion of the whole vector) and reduced
with three dot products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from telemetry_core.schema import GradientConflict

__all__ = ["AUTO_ELEMENTS", "GradientConflictProbe"]

AUTO_ELEMENTS = 1 << 22


class GradientConflictProbe:
    """Extra backward passes for the cosines, on every ``every``-th update."""

    def __init__(self, heads: list[str], params: list[torch.Tensor], every: int | str = "auto") -> None:
        self.heads = heads
        self.train_params = params
        if every == "auto":
            every = max(1, math.ceil(sum(p.numel() for p in params) / AUTO_ELEMENTS))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"conflict_every must be a positive int or 'auto', got {every!r}")
        self.every = every
        self._updates = 0  # DEBUG updates seen by the run, for the schedule
        self.device = params[0].device if params else torch.device("cpu")
        self._conflict: dict[str, Any] | None = None
        self._conflict_skipped = 0
        self.due = True

    def reset(self, device: torch.device, active: bool) -> None:
        """Start an update; at DEBUG it counts towards the schedule."""
        self.device = device
        self._conflict = None
        self._conflict_skipped = 0
        self.due = False
        if active:
            self.due = self._updates % self.every == 0
            self._updates += 1

    def restart_schedule(self) -> None:
        """The next DEBUG update is the first of the schedule (it computes the conflict)."""
        self._updates = 0

    def pending(self, prefix: str) -> dict[str, torch.Tensor]:
        return {} if self._conflict is None else {prefix + "conflict": self._conflict["values"]}

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
        if self._conflict is not None or not self.due:
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
            # one cat per term (it promotes mixed dtypes), one conversion of the whole vector if needed
            parts_a = [ga[j].reshape(-1) for j in both]  # type: ignore[union-attr]
            parts_b = [gb[j].reshape(-1) for j in both]  # type: ignore[union-attr]
            if len({t.device for t in parts_a + parts_b}) > 1:  # a model split over devices
                parts_a = [t.to(self.device) for t in parts_a]
                parts_b = [t.to(self.device) for t in parts_b]
            va, vb = torch.cat(parts_a), torch.cat(parts_b)
            va, vb = (v.to(self.device, torch.float32, non_blocking=True) for v in (va, vb))
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

    def build(self, host: Mapping[str, Sequence[float]], prefix: str) -> GradientConflict | None:
        state = self._conflict
        if state is None:
            return None
        v = host.get(prefix + "conflict", [])

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
