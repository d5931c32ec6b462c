"""AnomalyDetector: judges one PPO update's statistics against one ``Thresholds`` set.

Every kind of ``telemetry_core.kinds.SPECS`` whose rule lives in this package (all but
``rank_divergence``, which the multi-rank aggregator judges) is checked here by its own rule class,
from the update's own statistics as they appear in the Snapshot, so no check is dead code (a
system whose entropy and KL checks are never fed has no such alarms at all). The trainer
computes; the detector judges. Its only arithmetic of its own is a few rolling baselines of values
it is given (medians of KL, value loss, value std, gradient norm and per-head entropy; the recent
LSTM state norms; the mean episode return), each owned by the rule that uses it and kept on the host
with ``state_dict``/``load_state_dict`` so a resumed run keeps them. A value judged anomalous
against a known baseline does not enter it, so a sustained pathology stays flagged instead of
becoming the new normal. It is torch-free (it reads Structs), so a replayed recording can be
re-judged too.

Reporting: ``check`` returns every anomaly *active* in this update, at most one per kind and scope
(per head for entropy), so the dashboard can show what is wrong now; ``onsets`` holds the subset
that was not active in the previous update (what a one-shot alert should trigger on).

Severity is chosen so that a healthy PPO run raises no critical anomaly while each real pathology is
flagged as its own kind within a few updates of onset (``benchmarks/detection_matrix.py``):

* ``critical``: the run is broken: non-finite numbers; a gradient norm far above the clipping cap
  *and* an order of magnitude above its own recent level; a policy step far outside any trust
  region; a critic whose spread collapsed to a constant; a head with essentially zero entropy; an
  LSTM state that jumped far above its limits and its recent level, or gates saturated almost
  everywhere. Where a rule needs a baseline, it is only critical once the baseline is known.
* ``warning``: worth a look, and the only severity of signals that healthy runs also produce now
  and then (EMA drift, explained variance, return dips, moderate KL, ratio or gradient excursions).

Absolute limits alone do not work for gradients and LSTM state: a healthy run's pre-clip norm can sit
at 60x ``max_grad_norm`` for its whole life when returns are unnormalised, and an LSTM that learned to
count can hold |c| in the hundreds. There the absolute limit is a floor and the verdict needs a jump
relative to the run's own recent level too (until ``baseline_min_updates`` are known, the absolute
limit alone gives a warning).

Missing statistics (``None``, sections absent at MINIMAL, NaN defaults of unmeasured fields) skip
their checks; genuinely non-finite measured values are ``numerical_instability`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry_core.config import ANOMALY_KINDS, Thresholds, phase_of
from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule
from telemetry_core.detection.entropy import EntropyCollapseRule
from telemetry_core.detection.gradients import GradientDriftRule, GradientExplodingRule, GradientVanishingRule
from telemetry_core.detection.lstm import LSTMRule
from telemetry_core.detection.numerical import NumericalRule
from telemetry_core.detection.performance import PerformanceRule
from telemetry_core.detection.policy import KLSpikeRule, RatioCollapseRule, RatioExplosionRule
from telemetry_core.detection.saturation import ActionSaturationRule
from telemetry_core.detection.std import StdCollapseRule, StdExplosionRule
from telemetry_core.detection.value import EVLowRule, ValueCollapseRule
from telemetry_core.schema import Anomaly, Snapshot

__all__ = ["DETECTED_KINDS", "RULES", "STATE_VERSION", "AnomalyDetector"]

# Every rule of this package, in registry order (the order anomalies are reported in).
RULES: tuple[type[Rule], ...] = tuple(
    sorted(
        (
            NumericalRule,
            EntropyCollapseRule,
            StdCollapseRule,
            StdExplosionRule,
            ActionSaturationRule,
            KLSpikeRule,
            RatioExplosionRule,
            RatioCollapseRule,
            ValueCollapseRule,
            EVLowRule,
            GradientExplodingRule,
            GradientVanishingRule,
            GradientDriftRule,
            LSTMRule,
            PerformanceRule,
        ),
        key=lambda r: ANOMALY_KINDS.index(r.KIND),
    )
)
# The kinds this detector judges (rank_divergence belongs to the multi-rank aggregator).
DETECTED_KINDS: tuple[str, ...] = tuple(r.KIND for r in RULES)

# 3: one state per rule (version 2 kept one flat dict of every rule's counters and baselines).
STATE_VERSION = 3


class AnomalyDetector:
    """Judges each update with one rule per kind; keeps only small host-side state across updates.

    ``total_updates`` (the planned number of updates) sets the training phase of each step; when it
    is None the snapshot's ``run.planned_updates`` is used, and with neither the run is treated as
    mid-training (``config.phase_of``). ``heads`` maps head name -> number of actions; it lets the
    detector normalise a head's raw entropy when only the raw value is present (otherwise the
    snapshot's ``run.heads`` is used).
    """

    def __init__(
        self,
        thresholds: Thresholds,
        *,
        total_updates: int | None,
        heads: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
        if total_updates is not None and (
            isinstance(total_updates, bool) or not isinstance(total_updates, int)
        ):
            raise TypeError(f"total_updates must be an int or None, got {total_updates!r}")
        if heads is not None:
            for name, n in heads.items():
                if not isinstance(name, str) or isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ValueError(
                        f"heads must map head name -> number of actions >= 1, got {name!r}: {n!r}"
                    )
        self.thresholds = thresholds.validate()
        self.total_updates = total_updates
        self.heads: dict[str, int] = dict(heads) if heads else {}
        self.rules: dict[str, Rule] = {r.KIND: r(self.thresholds) for r in RULES}
        self.reset()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything learned from earlier updates (baselines, counters, active anomalies)."""
        self._updates = 0
        for rule in self.rules.values():
            rule.reset()
        self._active: set[tuple[str, str | None]] = set()
        self.onsets: list[Anomaly] = []
        self.last: list[Anomaly] = []

    def state_dict(self) -> dict[str, Any]:
        """Everything ``check`` carries between updates, as plain Python types (JSON-safe)."""
        return {
            "version": STATE_VERSION,
            "updates": self._updates,
            "rules": {kind: rule.state_dict() for kind, rule in self.rules.items()},
            "active": sorted([kind, head or ""] for kind, head in self._active),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raise ValueError naming a malformed entry.

        A state of an older version (another layout of the rules' baselines) is refused with a
        ValueError that says so: start without it, the baselines are re-learnt within
        ``baseline_min_updates`` updates.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            older = isinstance(version, int) and not isinstance(version, bool) and version < STATE_VERSION
            hint = (
                " (saved by an older release: load the checkpoint without the detector's state; its "
                "baselines are re-learnt within a few updates)"
                if older
                else ""
            )
            raise ValueError(f"state['version'] must be {STATE_VERSION}, got {version!r}{hint}")
        self.reset()
        try:
            self._updates = int(state["updates"])
            rules = state["rules"]
            unknown = set(rules) - set(self.rules)
            if unknown:
                raise ValueError(f"unknown rules {sorted(unknown)}")
            for kind, rule in self.rules.items():
                rule.load_state_dict(rules[kind])
            self._active = {(str(k), str(h) or None) for k, h in state["active"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.reset()
            raise ValueError(f"malformed AnomalyDetector state: {exc!r}") from exc

    # ------------------------------------------------------------------------------------------
    # the one entry point
    # ------------------------------------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> list[Anomaly]:
        """Judge one update; return its active anomalies (one per kind and head).

        Also sets ``self.onsets`` (the returned anomalies that were not active in the previous
        update) and ``self.last`` (the returned list).
        """
        step = int(snapshot.step)
        total = self.total_updates if self.total_updates is not None else snapshot.run.planned_updates
        ctx = Context(
            snapshot=snapshot,
            step=step,
            phase=phase_of(step, total, self.thresholds),
            total=total,
            heads={**snapshot.run.heads, **self.heads},
        )
        found: dict[tuple[str, str | None], Anomaly] = {}
        for rule in self.rules.values():
            for a in rule.check(ctx):
                key = (a.kind, a.head)
                old = found.get(key)
                if old is None or (old.severity == WARNING and a.severity == CRITICAL):
                    found[key] = a
        self._updates += 1
        order = {k: i for i, k in enumerate(DETECTED_KINDS)}
        result = [found[k] for k in sorted(found, key=lambda k: (order[k[0]], k[1] or ""))]
        self.onsets = [a for a in result if (a.kind, a.head) not in self._active]
        self._active = set(found)
        self.last = result
        return result
