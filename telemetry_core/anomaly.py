"""AnomalyDetector: judges one PPO update's statistics against one ``Thresholds`` set.

Every kind of ``config.ANOMALY_KINDS`` except ``rank_divergence`` (the multi-rank aggregator judges
that one) is checked here, from the update's own statistics as they appear in the Snapshot, so no
check is dead code (review C1, C2, H2: the reference system had entropy and KL checks that were never
fed). The trainer computes; the detector judges. Its only arithmetic of its own is a few rolling
baselines of values it is given (medians of KL, value loss, value std, gradient norm and per-head
entropy; the largest recent LSTM state norm; the mean episode return), kept on the host with
``state_dict``/``load_state_dict`` so a resumed run keeps them. A value judged anomalous against a
known baseline does not enter it, so a sustained pathology stays flagged instead of becoming the
new normal. It is torch-free (it reads Structs), so a replayed recording can be re-judged too.

Reporting: ``check`` returns every anomaly *active* in this update, at most one per kind (per head for
entropy), so the dashboard can show what is wrong now; ``onsets`` holds the subset that was not active
in the previous update (what a one-shot alert should trigger on).

Severity is chosen so that a healthy PPO run raises no critical anomaly while each real pathology is
flagged as its own kind within a few updates of onset (calibrated on the recurrent demo trainer,
``telemetry_core.demo``, healthy and with each injected pathology):

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

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from telemetry_core.config import ANOMALY_KINDS, Phase, Thresholds, phase_of
from telemetry_core.schema import (
    Anomaly,
    GradientStats,
    LSTMStats,
    PolicyStats,
    Snapshot,
)

__all__ = ["CRITICAL", "DETECTED_KINDS", "WARNING", "AnomalyDetector"]

WARNING = "warning"
CRITICAL = "critical"

# The kinds this detector judges (rank_divergence belongs to the multi-rank aggregator).
DETECTED_KINDS: tuple[str, ...] = tuple(k for k in ANOMALY_KINDS if k != "rank_divergence")

_STATE_VERSION = 2
# Rolling baselines by name; the window of each is a Thresholds field.
_BASELINES: dict[str, str] = {
    "kl": "kl_baseline_window",
    "value_loss": "value_baseline_window",
    "value_std": "value_baseline_window",
    "grad_norm": "grad_baseline_window",
    "lstm_h_norm": "lstm_baseline_window",
    "lstm_c_norm": "lstm_baseline_window",
}

_ACTIONS: dict[str, str] = {
    "entropy_collapse": (
        "Raise ent_coef (e.g. x2), check the entropy term's sign (loss = pg - ent_coef * entropy), "
        "lower the learning rate; inspect this head's logits and clip fraction."
    ),
    "kl_spike": (
        "Lower the learning rate or the number of epochs, set or tighten target_kl early stopping, "
        "check for a learning-rate schedule jump or unnormalised advantages."
    ),
    "ratio_explosion": (
        "Lower the learning rate or epochs, use target_kl early stopping; check that old log-probs "
        "come from the policy that collected the rollout (stale weights, mismatched actions)."
    ),
    "ratio_collapse": (
        "Lower the learning rate or epochs; check old log-probs and action indexing; the DEBUG "
        "ratio-outlier table lists the samples and heads involved."
    ),
    "value_collapse": (
        "Check the critic (was it re-initialised, or its output layer zeroed by a checkpoint "
        "load?), lower vf_coef or the learning rate, normalise or scale returns, clip the value loss."
    ),
    "ev_low": (
        "Check return computation (GAE gamma/lambda, done masks, bootstrapping at truncation), give "
        "the critic more capacity or learning rate, normalise returns."
    ),
    "numerical_instability": (
        "Stop and inspect: look for NaN/inf in observations and rewards, log(0) or division by zero "
        "in the loss, too high a learning rate; the DEBUG numerical report names the parameters."
    ),
    "gradient_exploding": (
        "Lower the learning rate, check reward/return scale and the value-loss weight, check for "
        "exploded or mis-scaled weights; the per-group norms show which part of the network it is."
    ),
    "gradient_vanishing": (
        "Check that the loss reaches the parameters (detached tensors, frozen modules), saturated "
        "activations or dead units, and the advantage normalisation (std near zero)."
    ),
    "gradient_drift": (
        "Compare with the learning-rate schedule and reward scale; a sustained drift often precedes "
        "instability - watch KL and value loss, consider a lower learning rate."
    ),
    "lstm_unhealthy": (
        "Check the LSTM weight scale and gate biases, normalise inputs, reset hidden state at episode "
        "boundaries, lower the learning rate or clip harder; consider a layer-norm LSTM."
    ),
    "performance_degradation": (
        "Compare with the KL, entropy and value panels around the drop; reload the best checkpoint "
        "and lower or anneal the learning rate; check for a changed environment or reward."
    ),
}


def _num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not a number (bools are not numbers)."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _finite(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, NaN and inf all mean "no verdict")."""
    v = _num(x)
    return v if v is not None and math.isfinite(v) else None


def _nonfinite(x: Any) -> bool:
    v = _num(x)
    return v is not None and not math.isfinite(v)


def _isinf(x: Any) -> bool:
    v = _num(x)
    return v is not None and math.isinf(v)


def _count(x: Any) -> int:
    """A non-negative count, tolerating floats and garbage (garbage counts as 0)."""
    v = _finite(x)
    return int(v) if v is not None and v > 0 else 0


def _fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class AnomalyDetector:
    """Judges each update; keeps only small host-side state across updates.

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
        self.reset()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything learned from earlier updates (baselines, counters, active anomalies)."""
        self._updates = 0
        self._entropy_below: dict[str, int] = {}
        self._entropy_collapsed: dict[str, bool] = {}
        self._entropy_hist: dict[str, deque[float]] = {}
        self._entropy_last: dict[str, float] = {}
        self._entropy_falls: dict[str, int] = {}
        self._entropy_throttled: dict[str, int] = {}
        self._ev_below = 0
        self._drift_above = 0
        self._base: dict[str, deque[float]] = {
            name: deque(maxlen=max(1, int(getattr(self.thresholds, window))))
            for name, window in _BASELINES.items()
        }
        self._ret_hist: deque[float] = deque(maxlen=max(1, self.thresholds.perf_window))
        self._ret_best: float | None = None
        self._ret_first: float | None = None
        self._active: set[tuple[str, str | None]] = set()
        self.onsets: list[Anomaly] = []
        self.last: list[Anomaly] = []

    def state_dict(self) -> dict[str, Any]:
        """Everything ``check`` carries between updates, as plain Python types (JSON-safe)."""
        return {
            "version": _STATE_VERSION,
            "updates": self._updates,
            "entropy_below": dict(self._entropy_below),
            "entropy_collapsed": dict(self._entropy_collapsed),
            "entropy_hist": {h: list(d) for h, d in self._entropy_hist.items()},
            "entropy_last": dict(self._entropy_last),
            "entropy_falls": dict(self._entropy_falls),
            "entropy_throttled": dict(self._entropy_throttled),
            "ev_below": self._ev_below,
            "drift_above": self._drift_above,
            "baselines": {name: list(d) for name, d in self._base.items()},
            "ret_hist": list(self._ret_hist),
            "ret_best": self._ret_best,
            "ret_first": self._ret_first,
            "active": sorted([kind, head] for kind, head in self._active),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raise ValueError naming a malformed entry."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state['version'] must be {_STATE_VERSION}, got {state.get('version')!r}")
        self.reset()
        try:
            self._updates = int(state["updates"])
            self._entropy_below = {str(k): int(v) for k, v in state["entropy_below"].items()}
            self._entropy_collapsed = {str(k): bool(v) for k, v in state["entropy_collapsed"].items()}
            for head, values in state["entropy_hist"].items():
                self._head_hist(str(head)).extend(float(v) for v in values)
            self._entropy_last = {str(k): float(v) for k, v in state["entropy_last"].items()}
            self._entropy_falls = {str(k): int(v) for k, v in state["entropy_falls"].items()}
            self._entropy_throttled = {str(k): int(v) for k, v in state["entropy_throttled"].items()}
            self._ev_below = int(state["ev_below"])
            self._drift_above = int(state["drift_above"])
            for name, values in state["baselines"].items():
                if name not in self._base:
                    raise ValueError(f"unknown baseline {name!r}")
                self._base[name].extend(float(v) for v in values)
            self._ret_hist.extend(float(v) for v in state["ret_hist"])
            self._ret_best = None if state["ret_best"] is None else float(state["ret_best"])
            self._ret_first = None if state["ret_first"] is None else float(state["ret_first"])
            self._active = {(str(k), None if h is None else str(h)) for k, h in state["active"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.reset()
            raise ValueError(f"malformed AnomalyDetector state: {exc!r}") from exc

    # ------------------------------------------------------------------------------------------
    # the one entry point
    # ------------------------------------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> list[Anomaly]:
        """Judge one update; return its active anomalies (one per kind, per head for entropy).

        Also sets ``self.onsets`` (the returned anomalies that were not active in the previous
        update) and ``self.last`` (the returned list).
        """
        step = int(snapshot.step)
        total = self.total_updates if self.total_updates is not None else snapshot.run.planned_updates
        phase = phase_of(step, total, self.thresholds)
        found: dict[tuple[str, str | None], Anomaly] = {}

        def add(a: Anomaly | None) -> None:
            if a is None:
                return
            key = (a.kind, a.head)
            old = found.get(key)
            if old is None or (old.severity == WARNING and a.severity == CRITICAL):
                found[key] = a

        add(self._numerical(snapshot, step))
        if snapshot.policy is not None:
            for a in self._entropy(snapshot.policy, snapshot, step):
                add(a)
            add(self._kl(snapshot.policy, step))
            add(self._ratio_explosion(snapshot.policy, step))
            add(self._ratio_collapse(snapshot.policy, step))
        add(self._value_collapse(snapshot, step, phase))
        add(self._ev_low(snapshot, step, phase))
        if snapshot.gradients is not None:
            cap = self._cap(snapshot)
            add(self._grad_exploding(snapshot.gradients, cap, step))
            add(self._grad_vanishing(snapshot.gradients, cap, snapshot, step))
            add(self._grad_drift(snapshot.gradients, step))
        if snapshot.lstm is not None:
            add(self._lstm(snapshot.lstm, step))
        add(self._performance(snapshot, step, total))

        self._updates += 1
        order = {k: i for i, k in enumerate(DETECTED_KINDS)}
        result = [found[k] for k in sorted(found, key=lambda k: (order[k[0]], k[1] or ""))]
        self.onsets = [a for a in result if (a.kind, a.head) not in self._active]
        self._active = set(found)
        self.last = result
        return result

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _anomaly(
        kind: str,
        severity: str,
        step: int,
        message: str,
        *,
        value: float | None,
        threshold: float | None,
        head: str | None = None,
    ) -> Anomaly:
        return Anomaly(
            kind=kind,
            severity=severity,
            step=step,
            message=message,
            action=_ACTIONS[kind],
            value=value,
            threshold=threshold,
            head=head,
        )

    @staticmethod
    def _cap(snapshot: Snapshot) -> float | None:
        """The loop's clipping cap: from the gradient stats, else from the run info."""
        for candidate in (
            snapshot.gradients.max_grad_norm if snapshot.gradients else None,
            snapshot.run.max_grad_norm,
        ):
            cap = _finite(candidate)
            if cap is not None and cap > 0:
                return cap
        return None

    def _baseline(self, name: str, *, largest: bool = False) -> float | None:
        """Median (or the largest value) of the named rolling baseline, once
        ``baseline_min_updates`` values are known; None before."""
        values = self._base[name]
        if len(values) < max(1, self.thresholds.baseline_min_updates):
            return None
        return max(values) if largest else statistics.median(values)

    def _head_hist(self, head: str) -> deque[float]:
        hist = self._entropy_hist.get(head)
        if hist is None:
            hist = self._entropy_hist[head] = deque(maxlen=max(1, self.thresholds.entropy_baseline_window))
        return hist

    def _jumped(
        self, value: float, name: str, factor: float, *, largest: bool = False
    ) -> tuple[bool, float | None]:
        """Whether ``value`` exceeds ``factor`` x the named baseline (True when none is known yet)."""
        base = self._baseline(name, largest=largest)
        return (base is None or value > factor * base), base

    # ------------------------------------------------------------------------------------------
    # checks: one method per kind, each documents its rule
    # ------------------------------------------------------------------------------------------
    def _numerical(self, snap: Snapshot, step: int) -> Anomaly | None:
        """``numerical_instability`` (always critical): any measured value is NaN or inf.

        Counted: NaN/inf gradient elements; a NaN/inf pre-clip norm or max |g| when gradients were
        observed (``calls > 0``); NaN/inf log-ratios, or NaN/inf ratio/KL when minibatches were
        observed; a NaN/inf entropy; a NaN/inf explained variance; inf anywhere in the value
        statistics (their NaN defaults mean "not measured", so only inf is unambiguous); NaN/inf
        advantage or return moments when samples were counted; NaN/inf in the LSTM state;
        non-finite weights, gradients or losses named by the DEBUG numerical report; non-finite
        episode returns. Nothing else fires on such an update: the other checks treat non-finite
        values as "no verdict" (and keep them out of their baselines).
        """
        reasons: list[str] = []
        bad = 0
        g = snap.gradients
        if g is not None:
            nan, inf = _count(g.nan_count), _count(g.inf_count)
            if nan or inf:
                bad += nan + inf
                reasons.append(f"{nan} NaN and {inf} inf gradient elements")
            elif _count(g.calls) and any(_nonfinite(x) for x in (g.total_norm, g.total_norm_max, g.max_abs)):
                reasons.append("the pre-clip gradient norm is not finite")
        p = snap.policy
        if p is not None:
            n_lr = _count(p.logratio_nan) + _count(p.logratio_inf)
            names = ("ratio_mean", "ratio_max", "ratio_min", "kl_k3_mean", "kl_k1_mean")
            if n_lr:
                reasons.append(f"{n_lr} samples have a NaN/inf log-probability ratio")
            elif _count(p.minibatches) and any(_nonfinite(getattr(p, n)) for n in names):
                reasons.append("probability ratios or KL are not finite")
            if _isinf(p.policy_loss):
                reasons.append("the policy loss is infinite")
            heads = sorted(h for h, e in {**p.entropy, **p.entropy_normalized}.items() if _nonfinite(e))
            if heads:
                reasons.append(f"entropy of {_names(heads)} is not finite")
        v = snap.value
        if v is not None:
            if _nonfinite(v.explained_variance):
                reasons.append("explained variance is not finite (NaN values or returns)")
            fields = ("value_loss", "value_loss_max", "value_mean", "value_std", "value_min", "value_max")
            if any(_isinf(getattr(v, n)) for n in fields):
                reasons.append("value predictions or the value loss are infinite")
        a = snap.advantage
        if a is not None:
            if _count(a.raw.count) and any(_nonfinite(x) for x in (a.raw.mean, a.raw.std)):
                reasons.append("advantages are not finite")
            if _count(a.returns.count) and any(_nonfinite(x) for x in (a.returns.mean, a.returns.std)):
                reasons.append("returns are not finite")
        lstm = snap.lstm
        if lstm is not None:
            n = sum(_count(x) for x in (lstm.h_nan, lstm.h_inf, lstm.c_nan, lstm.c_inf))
            if n:
                reasons.append(f"the LSTM state holds {n} NaN/inf values")
            elif _isinf(lstm.h_norm) or _isinf(lstm.c_norm):
                reasons.append("the LSTM state norm is infinite")
        d = snap.debug
        if d is not None:
            num = d.numerical
            if num.nonfinite_weights:
                reasons.append(f"non-finite weights in {_names(num.nonfinite_weights)}")
            if num.nonfinite_grads:
                reasons.append(f"non-finite gradients in {_names(num.nonfinite_grads)}")
            if num.loss_finite is False or _count(num.nonfinite_losses):
                reasons.append("the loss is not finite")
        e = snap.episodes
        if e is not None and _count(e.count) and _nonfinite(e.return_mean):
            reasons.append("episode returns are not finite (NaN/inf rewards)")
        if not reasons:
            return None
        return self._anomaly(
            "numerical_instability",
            CRITICAL,
            step,
            "Non-finite numbers in this update: " + "; ".join(reasons) + ".",
            value=float(bad) if bad else None,
            threshold=0.0,
        )

    def _head_entropies(self, p: PolicyStats, snap: Snapshot) -> dict[str, float | None]:
        """Normalised entropy per head: the reported one, else raw / log(actions) when known."""
        n_actions = {**snap.run.heads, **self.heads}
        out: dict[str, float | None] = {}
        for head in sorted(set(p.entropy_normalized) | set(p.entropy)):
            value = _finite(p.entropy_normalized.get(head))
            if value is None and head not in p.entropy_normalized:
                n = n_actions.get(head)
                raw = _finite(p.entropy.get(head))
                if raw is not None and isinstance(n, int) and n > 1:
                    value = raw / math.log(n)
            out[head] = value
        return out

    def _entropy(self, p: PolicyStats, snap: Snapshot, step: int) -> list[Anomaly]:
        """``entropy_collapse`` per head, on entropy normalised by log(number of actions).

        Collapsed (latched, with hysteresis): a head whose normalised entropy stays below its limit
        (``entropy_limit(head)``) for ``entropy_patience`` consecutive updates collapses, and stays
        collapsed - reported every update, so the dashboard shows it as active - until its entropy
        rises above ``entropy_clear_factor`` x limit. Critical while below
        ``entropy_critical_fraction`` x limit (deterministic: an entropy bonus of the right sign
        does not allow that), warning otherwise (a healthy run may end with a nearly decided head).

        Collapsing (warning, not latched), for a head not yet collapsed, against the median of its
        last ``entropy_baseline_window`` unflagged updates (once ``baseline_min_updates`` are known):

        * falling fast: its entropy fell by more than ``entropy_fall_step`` (a fraction of the previous
          update's value) in each of the last ``entropy_fall_updates`` updates and is now below
          ``entropy_fall_fraction`` x that median - a sustained slide, not one or two noisy dips;
        * pushed down: it fell by more than ``entropy_throttled_fall_step`` in each of the last
          ``entropy_fall_updates`` updates, the loop's target-KL early stop cut every one of them
          short, and it is below ``entropy_throttled_fall_fraction`` x that median - the optimiser
          spends the whole trust region on sharpening the policy, update after update;
        * dropped: it is below ``entropy_drop_fraction`` x that median, however it got there.

        Healthy PPO lowers entropy slowly and noisily: a head can lose a third of its entropy in
        two or three updates while it learns, then it rises again, and the target-KL stop fires in
        about one update in eight, in short bursts. A wrong-sign entropy coefficient makes every
        update sharpen the policy as far as the trust region allows: the stop fires every update
        (the trust region is what slows the collapse, to 5-40% per update) and the entropy keeps
        falling, so one of the slide rules fires two to three updates after onset, long before the
        absolute limit (calibration: ``benchmarks/detection_matrix.py``).

        A missing or NaN entropy holds the head's state (no verdict; NaN is numerical_instability).
        """
        t = self.thresholds
        out: list[Anomaly] = []
        for head, e in self._head_entropies(p, snap).items():
            if e is None:
                continue
            limit = t.entropy_limit(head)
            below = self._entropy_below.get(head, 0) + 1 if e < limit else 0
            collapsed = self._entropy_collapsed.get(head, False)
            if not collapsed and below >= t.entropy_patience:
                collapsed = True
            elif collapsed and e > t.entropy_clear_factor * limit:
                collapsed = False
            self._entropy_below[head] = below
            self._entropy_collapsed[head] = collapsed
            last = self._entropy_last.get(head)
            fell = last is not None and e < (1.0 - t.entropy_fall_step) * last
            pushed = p.early_stopped and last is not None and e < (1.0 - t.entropy_throttled_fall_step) * last
            falls = self._entropy_falls.get(head, 0) + 1 if fell else 0
            throttled = self._entropy_throttled.get(head, 0) + 1 if pushed else 0
            self._entropy_last[head] = e
            self._entropy_falls[head] = falls
            self._entropy_throttled[head] = throttled
            hist = self._head_hist(head)
            base = statistics.median(hist) if len(hist) >= max(1, t.baseline_min_updates) else None
            slide: tuple[float, str] | None = None  # (limit as a fraction of the median, words)
            if base is not None and base > 0:
                if falls >= t.entropy_fall_updates and e < t.entropy_fall_fraction * base:
                    slide = (t.entropy_fall_fraction, f" after falling for {falls} updates in a row")
                elif throttled >= t.entropy_fall_updates and e < t.entropy_throttled_fall_fraction * base:
                    slide = (
                        t.entropy_throttled_fall_fraction,
                        f" after falling for {throttled} updates in a row, each cut short by the "
                        f"target-KL early stop",
                    )
                elif e < t.entropy_drop_fraction * base:
                    slide = (t.entropy_drop_fraction, "")
            if collapsed:
                critical = e < t.entropy_critical_fraction * limit
                since = (
                    f"has been below {_fmt(limit)} for {below} updates"
                    if below
                    else f"has not yet risen above {_fmt(t.entropy_clear_factor * limit)}"
                )
                out.append(
                    self._anomaly(
                        "entropy_collapse",
                        CRITICAL if critical else WARNING,
                        step,
                        f"Head '{head}' is nearly deterministic: normalised entropy {_fmt(e)} {since}; "
                        f"it has stopped exploring.",
                        value=e,
                        threshold=t.entropy_critical_fraction * limit if critical else limit,
                        head=head,
                    )
                )
            elif slide is not None and base is not None:
                fraction, how = slide
                out.append(
                    self._anomaly(
                        "entropy_collapse",
                        WARNING,
                        step,
                        f"Head '{head}' is collapsing: normalised entropy fell to {_fmt(e)}, "
                        f"{e / base:.0%} of its recent median {_fmt(base)}{how}.",
                        value=e,
                        threshold=fraction * base,
                        head=head,
                    )
                )
            else:
                hist.append(e)
        return out

    def _kl(self, p: PolicyStats, step: int) -> Anomaly | None:
        """``kl_spike`` on the update's mean k3 KL (unbiased, never negative).

        Critical above ``kl_spike_critical``; warning above ``kl_spike_warning``; also a warning above
        ``kl_relative_factor`` x the median of the last ``kl_baseline_window`` updates when that is
        above ``kl_relative_floor`` too - a jump relative to how far this run usually moves, even
        below the absolute limits. Updates judged a spike stay out of the baseline.
        """
        t = self.thresholds
        kl = _finite(p.kl_k3_mean)
        if kl is None:
            return None
        base = self._baseline("kl")
        relative = max(t.kl_relative_floor, t.kl_relative_factor * base) if base is not None else None
        early = " (the loop's target-KL early stop fired)" if p.early_stopped else ""
        if kl > t.kl_spike_critical:
            sev, limit, why = CRITICAL, t.kl_spike_critical, "far outside the trust region"
        elif kl > t.kl_spike_warning:
            sev, limit, why = WARNING, t.kl_spike_warning, "past the usual target-KL range"
        elif relative is not None and base is not None and kl > relative:
            sev, limit = WARNING, relative
            why = (
                f"{kl / base:.1f}x its recent median {_fmt(base)}"
                if base > 0
                else "far above its recent median"
            )
        else:
            self._base["kl"].append(kl)
            return None
        return self._anomaly(
            "kl_spike",
            sev,
            step,
            f"The policy moved too far in one update: mean k3 KL {_fmt(kl)} is {why}{early}.",
            value=kl,
            threshold=limit,
        )

    @staticmethod
    def _worst_head(per_head: Mapping[str, float], *, high: bool) -> str | None:
        vals = {h: v for h, x in per_head.items() if (v := _finite(x)) is not None}
        if not vals:
            return None
        return max(vals, key=vals.__getitem__) if high else min(vals, key=vals.__getitem__)

    def _ratio_explosion(self, p: PolicyStats, step: int) -> Anomaly | None:
        """``ratio_explosion``: the largest joint probability ratio exceeds ``ratio_explosion``.

        Warning above the limit; critical above ``ratio_explosion_critical``. The head with the
        largest per-head ratio is named when per-head ratios are known.
        """
        t = self.thresholds
        r = _finite(p.ratio_max)
        if r is None or r <= t.ratio_explosion:
            return None
        critical = r > t.ratio_explosion_critical
        head = self._worst_head(p.head_ratio_max, high=True)
        where = f", mostly from head '{head}'" if head else ""
        return self._anomaly(
            "ratio_explosion",
            CRITICAL if critical else WARNING,
            step,
            f"Some action became {_fmt(r)}x more likely than when it was sampled{where}: the policy "
            f"being optimised is far from the one that collected the rollout.",
            value=r,
            threshold=t.ratio_explosion_critical if critical else t.ratio_explosion,
            head=head,
        )

    def _ratio_collapse(self, p: PolicyStats, step: int) -> Anomaly | None:
        """``ratio_collapse``: the smallest joint probability ratio falls below ``ratio_collapse``.

        Warning below the limit; critical below ``ratio_collapse_critical``. The head with the
        smallest per-head ratio is named when known.
        """
        t = self.thresholds
        r = _finite(p.ratio_min)
        if r is None or r >= t.ratio_collapse:
            return None
        critical = r < t.ratio_collapse_critical
        head = self._worst_head(p.head_ratio_min, high=False)
        where = f", mostly in head '{head}'" if head else ""
        return self._anomaly(
            "ratio_collapse",
            CRITICAL if critical else WARNING,
            step,
            f"A sampled action lost most of its probability within one update (ratio {_fmt(r)}){where}.",
            value=r,
            threshold=t.ratio_collapse_critical if critical else t.ratio_collapse,
            head=head,
        )

    def _value_collapse(self, snap: Snapshot, step: int, phase: Phase) -> Anomaly | None:
        """``value_collapse``: the critic stopped tracking returns.

        Constant critic: after warm-up, std(values) / std(returns) below
        ``value_std_collapse_ratio`` while the returns vary (std above ``value_returns_std_min``),
        *and* std(values) below ``value_std_drop_fraction`` x its median over the last
        ``value_baseline_window`` updates - the critic's spread collapsed (a reset or zeroed output
        layer, dead units). Critical against a known baseline; a warning before one exists. The
        drop condition matters: once a task is solved nearly every return is the same, rare
        failures inflate std(returns), and a critic that rightly predicts one value would
        otherwise look collapsed. Not judged in warm-up, where a fresh critic may be flat. Return
        std comes from ``ValueStats.return_std``, else from the advantage section's returns.

        Blown critic (warning): the value loss exceeds ``value_loss_relative_factor`` x its median
        over the last ``value_baseline_window`` updates and, when the return std is known, the
        returns' variance (worse than predicting their mean under either loss convention).

        Values flagged against a known baseline stay out of it.
        """
        t = self.thresholds
        v = snap.value
        if v is None:
            return None
        vstd = _finite(v.value_std)
        rstd = _finite(v.return_std)
        if rstd is None and snap.advantage is not None and _count(snap.advantage.returns.count):
            rstd = _finite(snap.advantage.returns.std)
        found: Anomaly | None = None
        if vstd is not None:
            base = self._baseline("value_std")
            flat = (
                phase is not Phase.WARMUP
                and rstd is not None
                and rstd > t.value_returns_std_min
                and vstd / rstd < t.value_std_collapse_ratio
                and (base is None or vstd < t.value_std_drop_fraction * base)
            )
            if flat and rstd is not None:
                ratio = vstd / rstd
                was = f" (recent median {_fmt(base)})" if base is not None else ""
                found = self._anomaly(
                    "value_collapse",
                    CRITICAL if base is not None else WARNING,
                    step,
                    f"The critic predicts almost a constant: value std {_fmt(vstd)}{was} is "
                    f"{_fmt(ratio)}x the return std {_fmt(rstd)}, so advantages are raw returns.",
                    value=ratio,
                    threshold=t.value_std_collapse_ratio,
                )
            if not flat or base is None:
                self._base["value_std"].append(vstd)
        loss = _finite(v.value_loss)
        if loss is None:
            return found
        base = self._baseline("value_loss")
        if (
            base is not None
            and base > 0
            and loss > t.value_loss_relative_factor * base
            and (rstd is None or loss > rstd * rstd)
        ):
            return found or self._anomaly(
                "value_collapse",
                WARNING,
                step,
                f"Value loss jumped to {_fmt(loss)}, {loss / base:.0f}x its recent median "
                f"{_fmt(base)}: the critic no longer fits the returns.",
                value=loss,
                threshold=t.value_loss_relative_factor * base,
            )
        self._base["value_loss"].append(loss)
        return found

    def _ev_low(self, snap: Snapshot, step: int, phase: Phase) -> Anomaly | None:
        """``ev_low`` (warning): explained variance below the phase's limit for ``ev_patience`` updates.

        Limits by phase (warm-up / early / mid / late, ``config.phase_of``): a young critic may be
        worse than a constant, a late one must be useful. An undefined EV (None: the returns have
        zero variance) is not low and resets the count, and so does EV of nearly constant returns
        (std below ``ev_return_cv_min`` x |mean|, from the advantage section's returns: a solved
        task's critic is accurate to a few hundredths and still scores EV -3); NaN holds it.
        """
        t = self.thresholds
        v = snap.value
        if v is None:
            return None
        if v.explained_variance is None:
            self._ev_below = 0
            return None
        ev = _finite(v.explained_variance)
        if ev is None:
            return None
        r = snap.advantage.returns if snap.advantage is not None else None
        if r is not None and _count(r.count):
            rmean, rstd = _finite(r.mean), _finite(r.std)
            if rmean is not None and rstd is not None and rstd < t.ev_return_cv_min * abs(rmean):
                self._ev_below = 0  # nearly constant returns: EV is noise, like the undefined case
                return None
        limit = t.ev_limit(phase)
        self._ev_below = self._ev_below + 1 if ev < limit else 0
        if self._ev_below < t.ev_patience:
            return None
        return self._anomaly(
            "ev_low",
            WARNING,
            step,
            f"The critic explains too little of the returns: explained variance {_fmt(ev)} has been "
            f"below {_fmt(limit)} (the {phase.value} limit) for {self._ev_below} updates.",
            value=ev,
            threshold=limit,
        )

    def _grad_exploding(self, g: GradientStats, cap: float | None, step: int) -> Anomaly | None:
        """``gradient_exploding``: the pre-clip total norm (mean over the update's backward passes).

        Critical above ``grad_total_exploding_critical_rel`` x max_grad_norm, warning above
        ``grad_total_exploding_rel`` x max_grad_norm - in both cases only when the norm is also
        ``grad_total_relative_factor`` x the median of the last ``grad_baseline_window`` updates:
        a run whose gradients always sit far above the cap (unnormalised returns) is clipped, not
        exploding; a sudden jump past the limits is. Before the baseline is known (a fresh or
        un-restored detector) the absolute limits alone give at most a warning. Parameters individually above
        ``grad_exploding_rel`` x max_grad_norm (``exploding_count``) are named in the message.
        Norms flagged against a known baseline stay out of it. No cap known: no verdict.
        """
        t = self.thresholds
        tn = _finite(g.total_norm)
        if cap is None or tn is None:
            return None
        jumped, base = self._jumped(tn, "grad_norm", t.grad_total_relative_factor)
        if jumped and base is not None and tn > t.grad_total_exploding_critical_rel * cap:
            sev, limit = CRITICAL, t.grad_total_exploding_critical_rel * cap
        elif jumped and tn > t.grad_total_exploding_rel * cap:
            sev, limit = WARNING, t.grad_total_exploding_rel * cap
        else:
            self._base["grad_norm"].append(tn)
            return None
        if base is None:  # no baseline yet: a warning that cannot tell a level from a jump
            self._base["grad_norm"].append(tn)
        n_exp = _count(g.exploding_count)
        parts = [f"Pre-clip gradient norm {_fmt(tn)} is {tn / cap:.0f}x max_grad_norm {_fmt(cap)}"]
        if base is not None and base > 0:
            parts.append(f"{tn / base:.0f}x its recent median {_fmt(base)}")
        if n_exp:
            parts.append(f"{n_exp} parameter tensor(s) individually above {_fmt(t.grad_exploding_rel * cap)}")
        return self._anomaly(
            "gradient_exploding",
            sev,
            step,
            "; ".join(parts) + ".",
            value=tn,
            threshold=limit,
        )

    def _grad_vanishing(
        self, g: GradientStats, cap: float | None, snap: Snapshot, step: int
    ) -> Anomaly | None:
        """``gradient_vanishing``: nothing (or little) is learning.

        Critical when the pre-clip total norm is below ``grad_total_vanishing_rel`` x max_grad_norm
        (the loss no longer reaches the weights). Warning when more than
        ``grad_vanishing_param_fraction`` of the parameter tensors are individually below
        ``grad_vanishing_rel`` x max_grad_norm (NORMAL: needs ``vanishing_count`` and the parameter
        list of ``run.param_names`` or ``param_norms``).
        """
        t = self.thresholds
        if cap is None:
            return None
        tn = _finite(g.total_norm)
        if tn is not None and _count(g.calls) and tn < t.grad_total_vanishing_rel * cap:
            return self._anomaly(
                "gradient_vanishing",
                CRITICAL,
                step,
                f"Pre-clip gradient norm {_fmt(tn)} is below {_fmt(t.grad_total_vanishing_rel)}x "
                f"max_grad_norm: the loss barely reaches the weights.",
                value=tn,
                threshold=t.grad_total_vanishing_rel * cap,
            )
        n_params = len(snap.run.param_names) or len(g.param_norms)
        n_van = _count(g.vanishing_count)
        if n_params and n_van / n_params > t.grad_vanishing_param_fraction:
            frac = n_van / n_params
            return self._anomaly(
                "gradient_vanishing",
                WARNING,
                step,
                f"{n_van} of {n_params} parameter tensors ({frac:.0%}) have gradient norms below "
                f"{_fmt(t.grad_vanishing_rel * cap)}: most of the network is not learning.",
                value=frac,
                threshold=t.grad_vanishing_param_fraction,
            )
        return None

    def _grad_drift(self, g: GradientStats, step: int) -> Anomaly | None:
        """``gradient_drift`` (warning): the pre-clip norm's relative distance from its EMA,
        ``|x - ema| / ema``, above ``grad_drift`` for ``grad_drift_patience`` consecutive updates.
        ``ema_drift`` is None during the tracker's warm-up (review L4): no verdict, count reset.
        """
        t = self.thresholds
        drift = _finite(g.ema_drift)
        if drift is None:
            if g.ema_drift is None:
                self._drift_above = 0
            return None
        self._drift_above = self._drift_above + 1 if drift > t.grad_drift else 0
        if self._drift_above < t.grad_drift_patience:
            return None
        ema = _finite(g.ema_total_norm)
        ref = f" (EMA {_fmt(ema)})" if ema is not None else ""
        return self._anomaly(
            "gradient_drift",
            WARNING,
            step,
            f"Gradient norm has stayed {drift:.0%} away from its long-run average{ref} for "
            f"{self._drift_above} updates.",
            value=drift,
            threshold=t.grad_drift,
        )

    def _lstm(self, s: LSTMStats, step: int) -> Anomaly | None:
        """``lstm_unhealthy``: the recurrent state exploded or vanished, or its gates saturated.

        Critical: the state exploded - h or c beyond its absolute limit (L2 norm above
        ``lstm_norm_max``, or for c the largest |c| above ``lstm_c_max_abs``) *and* that state's L2
        norm above ``lstm_relative_factor`` x its largest value over the last
        ``lstm_baseline_window`` updates (once known): an LSTM that learned to count can hold |c| in
        the hundreds for its whole life, and its state grows steadily while it learns; the largest
        recent value (not the median) tracks that growth, so only a sudden jump counts. Before
        that baseline is known the absolute limits alone give a warning. Critical too when the share of all input/forget/output gates within
        ``lstm_gate_eps`` of 0 or 1 exceeds ``lstm_gate_saturation_critical``; warning when it
        exceeds ``lstm_gate_saturation_warning`` (a saturated gate passes no gradient). Warning when
        h's norm falls below ``lstm_norm_min`` (the state carries nothing). NaN/inf states are
        numerical_instability. Norms flagged against a known baseline stay out of it.
        """
        t = self.thresholds
        found: list[tuple[str, str, float, float]] = []  # severity, words, value, threshold
        cmax = _finite(s.c_max_abs)
        for name, norm_raw in (("h", s.h_norm), ("c", s.c_norm)):
            norm = _finite(norm_raw)
            if norm is None:
                continue
            over: list[str] = []
            if norm > t.lstm_norm_max:
                over.append(f"{name} norm {_fmt(norm)} > {_fmt(t.lstm_norm_max)}")
            if name == "c" and cmax is not None and cmax > t.lstm_c_max_abs:
                over.append(f"|c| max {_fmt(cmax)} > {_fmt(t.lstm_c_max_abs)}")
            jumped, base = self._jumped(norm, f"lstm_{name}_norm", t.lstm_relative_factor, largest=True)
            if over and jumped:
                rel = f", {norm / base:.0f}x its largest recent norm" if base else ""
                big_c = name == "c" and cmax is not None and cmax > t.lstm_c_max_abs
                value, limit = (cmax, t.lstm_c_max_abs) if big_c else (norm, t.lstm_norm_max)
                sev = CRITICAL if base is not None else WARNING
                found.append((sev, f"{name} state exploded ({'; '.join(over)}{rel})", value, limit))
            if not (over and jumped) or base is None:
                self._base[f"lstm_{name}_norm"].append(norm)
        hn = _finite(s.h_norm)
        if hn is not None and hn < t.lstm_norm_min:
            found.append((WARNING, f"h norm {_fmt(hn)} has vanished", hn, t.lstm_norm_min))
        sat = [v for x in s.gate_saturation.values() if (v := _finite(x)) is not None]
        if sat:
            share = sum(sat) / len(sat)
            worst = max(s.gate_saturation, key=lambda k: _finite(s.gate_saturation[k]) or -1.0)
            words = f"{share:.0%} of gates saturated (worst: {worst} {_finite(s.gate_saturation[worst]):.0%})"
            if share > t.lstm_gate_saturation_critical:
                found.append((CRITICAL, words, share, t.lstm_gate_saturation_critical))
            elif share > t.lstm_gate_saturation_warning:
                found.append((WARNING, words, share, t.lstm_gate_saturation_warning))
        if not found:
            return None
        found.sort(key=lambda f: f[0] != CRITICAL)
        sev, _, value, limit = found[0]
        return self._anomaly(
            "lstm_unhealthy",
            sev,
            step,
            "LSTM unhealthy: " + "; ".join(f[1] for f in found) + ".",
            value=value,
            threshold=limit,
        )

    def _performance(self, snap: Snapshot, step: int, total: int | None) -> Anomaly | None:
        """``performance_degradation`` (warning): the rolling mean episode return fell far below its best.

        The rolling mean covers the last ``perf_window`` updates that finished episodes; its best
        value so far is the reference. Degraded when ``best - current`` exceeds ``perf_drop`` x
        ``max(|best|, best - first)`` - a share of the return's magnitude, or of the gain since
        the first full window for returns near or below zero. Not judged before the window is full
        nor during the first ``perf_warmup_fraction`` of the planned updates (early returns are
        noise around exploration).
        """
        t = self.thresholds
        e = snap.episodes
        ret = _finite(e.return_mean) if e is not None and _count(e.count) else None
        if ret is None:
            return None
        self._ret_hist.append(ret)
        if len(self._ret_hist) < max(1, t.perf_window):
            return None
        current = sum(self._ret_hist) / len(self._ret_hist)
        if self._ret_first is None:
            self._ret_first = current
        if self._ret_best is None or current > self._ret_best:
            self._ret_best = current
        if total and step < t.perf_warmup_fraction * total:
            return None
        best = self._ret_best
        scale = max(abs(best), best - self._ret_first)
        drop = best - current
        if scale <= 0 or drop <= t.perf_drop * scale:
            return None
        return self._anomaly(
            "performance_degradation",
            WARNING,
            step,
            f"Mean episode return over the last {len(self._ret_hist)} updates is {_fmt(current)}, "
            f"down {drop / scale:.0%} from its best {_fmt(best)}.",
            value=current,
            threshold=best - t.perf_drop * scale,
        )
