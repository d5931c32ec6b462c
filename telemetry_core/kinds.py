"""The registry of anomaly kinds: the one place a kind is defined.

Each :class:`KindSpec` says everything the product needs about one kind: the rule that judges it,
the dashboard panel it belongs to, the words a panel title and a log row use, what to try, how long
an automatic DEBUG capture lasts, what it is judged on (the whole run, one action head or one rank),
how far upstream it sits in a chain of consequences, and the ``Thresholds`` fields its rule reads.
Everything else derives from :data:`SPECS`: ``config.ANOMALY_KINDS`` and
``config.DEFAULT_ESCALATION_UPDATES``, the detector's action texts, the dashboard's panel table and
the detection matrix's kinds. Adding a kind means adding a spec here and its rule; a test checks
that every spec is complete (its rule exists and judges that kind, its thresholds exist).

Torch-free and dependency-free on purpose: the dashboard imports it, and ``config`` derives from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PANELS", "SCOPES", "SPECS", "WORSE", "KindSpec", "panel_kinds", "upstream_rank"]

# Dashboard panels that can carry an alarm, in screen order.
PANELS: tuple[str, ...] = ("policy", "value", "advantage", "gradients", "lstm")
# What one alarm of a kind is about: the whole run, one action head, or one rank.
SCOPES: tuple[str, ...] = ("run", "head", "rank")
# Which way an anomaly's value is worse (an incident's peak is its worst judgement).
WORSE: tuple[str, ...] = ("higher", "lower")


@dataclass(frozen=True)
class KindSpec:
    """One anomaly kind.

    ``rule`` is ``"module:Class"`` of the class that judges the kind (resolved by the completeness
    test, so this module imports nothing); the class's ``KIND`` names this spec. ``upstream``: lower
    runs earlier in a chain of consequences, so when several kinds open together the lowest heads
    the group (a NaN makes gradients explode, which spikes KL, which moves ratios, ...).
    """

    name: str
    rule: str
    panel: str
    title: str  # panel-title words while it fires, e.g. "KL SPIKE"
    label: str  # one line: what it means
    action: str  # what to try
    escalation_updates: int  # updates of automatic DEBUG after an onset
    scope: str
    upstream: int
    thresholds: tuple[str, ...]
    worse: str = "higher"  # which way the anomaly's ``value`` is worse: "higher" or "lower"


_D = "telemetry_core.detection"

_SPECS: tuple[KindSpec, ...] = (
    KindSpec(
        name="entropy_collapse",
        rule=f"{_D}.entropy:EntropyCollapseRule",
        panel="policy",
        title="ENTROPY COLLAPSE",
        label="an action head is becoming deterministic: exploration is running out",
        action=(
            "Raise ent_coef (e.g. x2), check the entropy term's sign (loss = pg - ent_coef * entropy), "
            "lower the learning rate; inspect this head's logits and clip fraction."
        ),
        escalation_updates=8,
        scope="head",
        upstream=5,
        thresholds=(
            "entropy_collapse",
            "entropy_collapse_per_head",
            "entropy_patience",
            "entropy_clear_factor",
            "entropy_critical_fraction",
            "entropy_drop_fraction",
            "entropy_fall_step",
            "entropy_fall_updates",
            "entropy_fall_fraction",
            "entropy_throttled_fall_step",
            "entropy_throttled_fall_fraction",
            "entropy_slide_critical_updates",
            "entropy_slide_critical_window",
            "entropy_slide_critical_fraction",
            "entropy_spread_k",
            "entropy_spread_updates",
            "entropy_spread_min_fraction",
            "entropy_sharpen_fraction",
            "entropy_sharpen_k",
            "entropy_sharpen_updates",
            "entropy_sharpen_window",
            "entropy_sharpen_critical_updates",
            "entropy_coef_min",
            "entropy_baseline_window",
            "baseline_min_updates",
        ),
        worse="lower",
    ),
    KindSpec(
        name="std_collapse",
        rule=f"{_D}.std:StdCollapseRule",
        panel="policy",
        title="STD COLLAPSE",
        label="a continuous head's standard deviation is shrinking towards zero: exploration is running out",
        action=(
            "Check the entropy term's sign and size (loss = pg - ent_coef * entropy), any clamp or reset "
            "of the log-std parameter (checkpoint loads, init), lower the learning rate; a state-dependent "
            "std head may need a floor on its log-std."
        ),
        escalation_updates=8,
        scope="head",
        upstream=2,  # a log-std that jumps moves every ratio: it heads the KL and ratio alarms it causes
        thresholds=(
            "std_collapse_log_std",
            "std_collapse_log_std_critical",
            "std_drop",
            "std_drop_critical",
            "std_fall_step",
            "std_fall_updates",
            "std_slide_drop",
            "std_baseline_window",
            "baseline_min_updates",
        ),
        worse="lower",
    ),
    KindSpec(
        name="std_explosion",
        rule=f"{_D}.std:StdExplosionRule",
        panel="policy",
        title="STD EXPLOSION",
        label="a continuous head's standard deviation grew far beyond its action range: actions are noise",
        action=(
            "Lower ent_coef (a positive entropy bonus has no ceiling for a Gaussian), check the log-std "
            "parameter for a bad load or init, bound a state-dependent log-std (e.g. clamp to [-5, 2])."
        ),
        escalation_updates=5,
        scope="head",
        upstream=2,
        thresholds=(
            "std_explosion_log_std",
            "std_explosion_log_std_critical",
            "std_rise",
            "std_rise_critical",
            "std_baseline_window",
            "baseline_min_updates",
        ),
    ),
    KindSpec(
        name="action_saturation",
        rule=f"{_D}.saturation:ActionSaturationRule",
        panel="policy",
        title="ACTION SATURATION",
        label="a continuous head's actions pile up beyond the action bounds, where clipping hides them",
        action=(
            "Check observation scaling and normalisation (a changed unit or a skipped normaliser pushes the "
            "mean out), the action scaling between policy and environment; consider a tanh-squashed head "
            "or a penalty on the mean beyond the bounds."
        ),
        escalation_updates=5,
        scope="head",
        upstream=3,  # a std that exploded spills samples past the bounds: the std alarm heads the group
        thresholds=(
            "action_saturation_warning",
            "action_saturation_critical",
            "action_saturation_jump",
            "action_saturation_baseline_window",
            "baseline_min_updates",
        ),
    ),
    KindSpec(
        name="kl_spike",
        rule=f"{_D}.policy:KLSpikeRule",
        panel="policy",
        title="KL SPIKE",
        label="the policy moved too far in one update",
        action=(
            "Lower the learning rate or the number of epochs, set or tighten target_kl early stopping, "
            "check for a learning-rate schedule jump or unnormalised advantages."
        ),
        escalation_updates=5,
        scope="run",
        upstream=2,
        thresholds=(
            "kl_spike_warning",
            "kl_spike_critical",
            "kl_relative_factor",
            "kl_relative_floor",
            "kl_baseline_window",
            "baseline_min_updates",
        ),
    ),
    KindSpec(
        name="ratio_explosion",
        rule=f"{_D}.policy:RatioExplosionRule",
        panel="policy",
        title="RATIO EXPLOSION",
        label="many sampled actions became far more likely than when they were collected",
        action=(
            "Lower the learning rate or epochs, use target_kl early stopping; check that old log-probs "
            "come from the policy that collected the rollout (stale weights, mismatched actions)."
        ),
        escalation_updates=10,
        scope="run",
        upstream=3,
        thresholds=(
            "ratio_explosion",
            "ratio_explosion_critical",
            "ratio_tail_share",
            "ratio_tail_share_critical",
            "ratio_tail_min_samples",
            "ratio_tail_critical_min_samples",
            "ratio_collapse",  # the trainer counts both tails in one pass: its counts match all four limits
            "ratio_collapse_critical",
        ),
    ),
    KindSpec(
        name="ratio_collapse",
        rule=f"{_D}.policy:RatioCollapseRule",
        panel="policy",
        title="RATIO COLLAPSE",
        label="many sampled actions lost most of their probability in one update",
        action=(
            "Lower the learning rate or epochs; check old log-probs and action indexing; the DEBUG "
            "ratio-outlier table lists the samples and heads involved."
        ),
        escalation_updates=5,
        scope="run",
        upstream=3,
        thresholds=(
            "ratio_collapse",
            "ratio_collapse_critical",
            "ratio_tail_share",
            "ratio_tail_share_critical",
            "ratio_tail_min_samples",
            "ratio_tail_critical_min_samples",
            "ratio_explosion",
            "ratio_explosion_critical",
        ),
    ),
    KindSpec(
        name="value_collapse",
        rule=f"{_D}.value:ValueCollapseRule",
        panel="value",
        title="VALUE COLLAPSE",
        label="the critic stopped tracking the returns",
        action=(
            "Check the critic (was it re-initialised, or its output layer zeroed by a checkpoint "
            "load?), lower vf_coef or the learning rate, normalise or scale returns, clip the value loss."
        ),
        escalation_updates=5,
        scope="run",
        upstream=4,
        thresholds=(
            "value_std_collapse_ratio",
            "value_returns_std_min",
            "value_std_drop_fraction",
            "value_std_tracking_min",
            "value_std_constant_fraction",
            "value_collapse_critical_updates",
            "value_loss_relative_factor",
            "value_baseline_window",
            "baseline_min_updates",
            "phase_warmup_end",
        ),
        worse="lower",
    ),
    KindSpec(
        name="ev_low",
        rule=f"{_D}.value:EVLowRule",
        panel="value",
        title="LOW EV",
        label="the critic explains too little of the returns",
        action=(
            "Check return computation (GAE gamma/lambda, done masks, bootstrapping at truncation), give "
            "the critic more capacity or learning rate, normalise returns."
        ),
        escalation_updates=3,
        scope="run",
        upstream=4,
        thresholds=(
            "ev_warmup",
            "ev_early",
            "ev_mid",
            "ev_late",
            "ev_patience",
            "ev_return_cv_min",
            "phase_warmup_end",
            "phase_early_end",
            "phase_mid_end",
        ),
        worse="lower",
    ),
    KindSpec(
        name="numerical_instability",
        rule=f"{_D}.numerical:NumericalRule",
        panel="gradients",
        title="NON-FINITE",
        label="non-finite numbers in this update",
        action=(
            "Stop and inspect: look for NaN/inf in observations and rewards, log(0) or division by zero "
            "in the loss, too high a learning rate; the DEBUG numerical report names the parameters."
        ),
        escalation_updates=20,
        scope="run",
        upstream=0,
        thresholds=(),
    ),
    KindSpec(
        name="gradient_exploding",
        rule=f"{_D}.gradients:GradientExplodingRule",
        panel="gradients",
        title="GRAD EXPLODING",
        label="the pre-clip gradient norm jumped far above the clipping cap and its own level",
        action=(
            "Lower the learning rate, check reward/return scale and the value-loss weight, check for "
            "exploded or mis-scaled weights; the per-group norms show which part of the network it is."
        ),
        escalation_updates=10,
        scope="run",
        upstream=1,
        thresholds=(
            "grad_total_exploding_rel",
            "grad_total_exploding_critical_rel",
            "grad_total_relative_factor",
            "grad_exploding_rel",
            "grad_baseline_window",
            "baseline_min_updates",
        ),
    ),
    KindSpec(
        name="gradient_vanishing",
        rule=f"{_D}.gradients:GradientVanishingRule",
        panel="gradients",
        title="GRAD VANISHING",
        label="the loss barely reaches the weights",
        action=(
            "Check that the loss reaches the parameters (detached tensors, frozen modules), saturated "
            "activations or dead units, and the advantage normalisation (std near zero)."
        ),
        escalation_updates=5,
        scope="run",
        upstream=7,
        thresholds=("grad_total_vanishing_rel", "grad_vanishing_rel", "grad_vanishing_param_fraction"),
        worse="lower",
    ),
    KindSpec(
        name="gradient_drift",
        rule=f"{_D}.gradients:GradientDriftRule",
        panel="gradients",
        title="GRAD DRIFT",
        label="the gradient norm stays far from its long-run average",
        action=(
            "Compare with the learning-rate schedule and reward scale; a sustained drift often precedes "
            "instability - watch KL and value loss, consider a lower learning rate."
        ),
        escalation_updates=3,
        scope="run",
        upstream=7,
        thresholds=("grad_drift", "grad_drift_patience", "grad_drift_warmup", "grad_ema_momentum"),
    ),
    KindSpec(
        name="lstm_unhealthy",
        rule=f"{_D}.lstm:LSTMRule",
        panel="lstm",
        title="LSTM",
        label="the recurrent state exploded or vanished, or its gates saturated",
        action=(
            "Check the LSTM weight scale and gate biases, normalise inputs, reset hidden state at episode "
            "boundaries, lower the learning rate or clip harder; consider a layer-norm LSTM."
        ),
        escalation_updates=5,
        scope="run",
        upstream=6,
        thresholds=(
            "lstm_norm_max",
            "lstm_norm_min",
            "lstm_c_max_abs",
            "lstm_relative_factor",
            "lstm_spread_k",
            "lstm_gate_saturation_warning",
            "lstm_gate_saturation_jump",
            "lstm_gate_saturation_critical",
            "lstm_baseline_window",
            "baseline_min_updates",
        ),
    ),
    KindSpec(
        name="performance_degradation",
        rule=f"{_D}.performance:PerformanceRule",
        panel="advantage",
        title="RETURN DROP",
        label="the mean episode return fell far below its best",
        action=(
            "Compare with the KL, entropy and value panels around the drop; reload the best checkpoint "
            "and lower or anneal the learning rate; check for a changed environment or reward."
        ),
        escalation_updates=5,
        scope="run",
        upstream=7,
        thresholds=("perf_drop", "perf_window", "perf_warmup_fraction"),
        worse="lower",
    ),
    KindSpec(
        name="rank_divergence",
        rule="telemetry_core.distributed:RankJudge",
        panel="gradients",  # the gradients panel shows the rank spread
        title="RANK DIVERGENCE",
        label="one rank's statistics differ from the others, or it straggles",
        action=(
            "Compare this rank with the others: its environment seeds and workers, its data, its device "
            "(memory errors, clocks, thermal throttling). A NaN on one rank poisons the averaged gradients of "
            "every rank: find its input. The DEBUG screen of rank 0 shows only rank 0's layers."
        ),
        escalation_updates=5,
        scope="rank",
        upstream=7,
        thresholds=(
            "rank_divergence",
            "rank_divergence_min_rel",
            "rank_divergence_patience",
            "rank_baseline_window",
            "rank_straggler",
            "rank_straggler_min_seconds",
            "rank_straggler_patience",
            "baseline_min_updates",
        ),
    ),
)

SPECS: dict[str, KindSpec] = {s.name: s for s in _SPECS}


def upstream_rank(kind: str) -> int:
    """How far upstream ``kind`` sits (lower = earlier in a chain of consequences); unknown kinds last."""
    spec = SPECS.get(kind)
    return spec.upstream if spec is not None else max(s.upstream for s in _SPECS) + 1


def panel_kinds() -> dict[str, tuple[str, ...]]:
    """Panel -> the kinds whose alarms it shows, in registry order (every panel of :data:`PANELS`)."""
    return {panel: tuple(k for k, s in SPECS.items() if s.panel == panel) for panel in PANELS}
