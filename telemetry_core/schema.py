"""The wire schema: typed msgspec Structs, msgpack-encoded, shared by trainer and dashboard.

Torch-free. Evolution rules (msgspec): new fields get defaults and bump ``SCHEMA_MINOR``; unknown
fields are ignored by older readers; a field's type never changes (that is a ``SCHEMA_MAJOR`` bump).
Statistics that are undefined (explained variance of constant returns, say) are ``None``;
statistics that are genuinely non-finite (a NaN gradient norm) travel as NaN/inf and are shown so.
Nothing here is ever pickled.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from telemetry_core.config import Thresholds

__all__ = [
    "MAGIC",
    "RUN_FINISHED",
    "SCHEMA_MAJOR",
    "SCHEMA_MINOR",
    "Ack",
    "AdvantageStats",
    "Anomaly",
    "Command",
    "Counters",
    "DebugReport",
    "Envelope",
    "EpisodeStats",
    "GradientConflict",
    "GradientStats",
    "Heartbeat",
    "History",
    "Incident",
    "IncidentEvent",
    "LSTMStats",
    "LayerRow",
    "LevelInfo",
    "Moments",
    "Nack",
    "NumericalReport",
    "PolicyStats",
    "RankStats",
    "RatioOutliers",
    "ReturnStats",
    "RunInfo",
    "Snapshot",
    "ValueStats",
]

MAGIC = "SIMIC"
SCHEMA_MAJOR = 1
# 1: incidents, incident events, DEBUG cost share; 2: environment timesteps;
# 3: continuous-head statistics, run_state, last telemetry error
SCHEMA_MINOR = 4

NAN = math.nan

# Every integer and string on the wire is bounded at decode: a frame outside these is refused
# as a bad frame. Integers stay exact in float64 and inside int64 (the dashboard's columns);
# strings are capped well above anything a trainer writes (the dashboard shows at most 512).
MAX_INT = 2**53
MAX_STR = 65536
Int = Annotated[int, msgspec.Meta(ge=-MAX_INT, le=MAX_INT)]
Str = Annotated[str, msgspec.Meta(max_length=MAX_STR)]
RunState = Annotated[str, msgspec.Meta(max_length=32)]
RUN_FINISHED = "finished"


class _S(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Base: keyword-only construction, map encoding (so unknown fields are skipped on decode)."""


# --------------------------------------------------------------------------------------------
# Statistics of one PPO update
# --------------------------------------------------------------------------------------------


class GradientStats(_S):
    """Gradients after backward, before clipping, accumulated over every backward of the update."""

    calls: Int = 0  # backward passes observed in this update
    max_grad_norm: float = NAN  # the loop's clipping cap
    total_norm: float = NAN  # pre-clip global L2 norm, mean over calls
    total_norm_max: float = NAN  # ... max over calls
    total_norm_last: float = NAN  # ... of the last call
    clip_rate: float = NAN  # share of calls whose pre-clip norm exceeded max_grad_norm
    max_abs: float = NAN  # max |g| over all elements and calls (NaN if any element is NaN)
    # NaN / +-inf gradient elements, summed over calls. Exactly 0 for a tensor without any (its norm
    # says so, from every element); otherwise counted on the examined elements and scaled to the
    # tensor, at least 1 per affected tensor, exact for tensors examined in full or entirely NaN.
    nan_count: Int = 0
    inf_count: Int = 0
    nan_params: Int = 0  # parameter tensors holding a NaN gradient, summed over calls (exact)
    inf_params: Int = 0  # ... holding +-inf (and no NaN), summed over calls (exact)
    skipped_params: Int = 0  # parameters whose .grad was None in a call of this update (skipped)
    # The first (up to 16, model order) parameters holding a NaN/Inf gradient in some call of this
    # update, exact (from every element): where a numerical failure starts, at the update it starts.
    nonfinite_params: list[Str] = []
    # NORMAL and above:
    zero_fraction: float | None = None  # share of exactly-zero (+-0) elements among the examined ones
    hist_counts: list[Int] = []  # [zero, (0,e0), [e0,e1), ..., [e_last, inf)] of examined |g|, finite only
    examined_elements: Int = 0  # gradient elements binned into hist_counts, summed over calls
    total_elements: Int = 0  # gradient elements observed, summed over calls
    param_norms: list[float] = []  # per parameter, mean over calls that had its grad (NaN: none did)
    group_norms: dict[Str, float] = {}  # per named group, L2 norm (mean over calls)
    group_norms_normalized: dict[Str, float] = {}  # group norm / sqrt(numel of group)
    group_ratios: dict[Str, float] = {}  # normalised group norm / normalised whole-model norm
    vanishing_count: Int = 0  # parameters below grad_vanishing_rel x max_grad_norm (max over calls)
    exploding_count: Int = 0  # parameters above grad_exploding_rel x max_grad_norm (max over calls)
    ema_total_norm: float | None = None  # EMA of the pre-clip total norm
    ema_drift: float | None = None  # |x - ema| / (ema + eps); None during warm-up
    group_ema_drift: dict[Str, float] = {}  # per group, drift of its norm; groups in warm-up are absent


class PolicyStats(_S):
    """Ratios, KL, clipping, entropy: accumulated over every minibatch and epoch of the update."""

    minibatches: Int = 0
    epochs: Int = 0
    samples: Int = 0  # log-ratio samples seen over every minibatch and epoch
    clip_range: float = NAN  # of the last minibatch
    policy_loss: float = NAN  # mean over minibatches
    ratio_mean: float = NAN
    ratio_std: float = NAN
    ratio_max: float = NAN
    ratio_min: float = NAN
    kl_k3_mean: float = NAN  # (r - 1) - log r: unbiased, never negative
    kl_k3_max: float = NAN  # max over minibatches of the minibatch mean
    kl_k1_mean: float = NAN  # -log r: can be negative
    kl_k1_max: float = NAN
    kl_k3_per_epoch: list[float] = []  # mean k3 KL of each epoch, in order
    kl_k1_per_epoch: list[float] = []  # mean k1 KL of each epoch, in order
    kl_k3_max_per_epoch: list[float] = []  # max over each epoch's minibatch means
    kl_k1_max_per_epoch: list[float] = []
    clip_fraction: float = NAN  # share of samples whose joint ratio left [1-eps, 1+eps]
    clip_fraction_high: float = NAN  # ... above 1+eps
    clip_fraction_low: float = NAN  # ... below 1-eps
    ess: float = NAN  # normalised effective sample size (sum r)^2 / (n sum r^2), in (0, 1]
    ess_min: float = NAN  # ... of the worst minibatch (ess is their sample-weighted mean)
    logratio_nan: Int = 0  # samples whose joint log-ratio is NaN (clip fractions are then NaN)
    logratio_inf: Int = 0  # samples whose joint log-ratio is +-inf (a probability of exactly 0)
    # The ratio's tail: samples whose joint ratio lies beyond the limits in ``ratio_tail_limits``
    # (the trainer's ratio_explosion, ratio_explosion_critical, ratio_collapse,
    # ratio_collapse_critical), over every minibatch and epoch. None: not counted (older trainers).
    ratio_above: Int | None = None
    ratio_above_critical: Int | None = None
    ratio_below: Int | None = None
    ratio_below_critical: Int | None = None
    ratio_tail_limits: list[float] = []
    head_clip_fraction: dict[Str, float] = {}
    head_clip_high: dict[Str, float] = {}
    head_clip_low: dict[Str, float] = {}
    head_ratio_max: dict[Str, float] = {}
    head_ratio_min: dict[Str, float] = {}
    head_ratio_above: dict[Str, Int] = {}  # per head: samples whose head ratio > ratio_tail_limits[0]
    head_ratio_below: dict[Str, Int] = {}  # ... < ratio_tail_limits[2]
    head_kl_k3: dict[Str, float] = {}
    entropy: dict[Str, float] = {}  # per head, nats, mean over minibatches
    entropy_normalized: dict[Str, float] = {}  # per head, / log(number of actions); 1-action heads absent
    # per head, the normalised entropy of each epoch, in order (two or more epochs): every epoch sees
    # the same rollout, so the change from the first to the last is what the update did to the head
    entropy_normalized_per_epoch: dict[Str, list[float]] = {}
    # continuous (diagonal Gaussian) heads: their log standard deviations over dimensions (and samples)
    log_std_mean: dict[Str, float] = {}
    log_std_min: dict[Str, float] = {}
    log_std_max: dict[Str, float] = {}
    log_std_dims: dict[Str, list[float]] = {}  # per head, each dimension's mean log-std (at most 256)
    log_std_trend: dict[Str, float] = {}  # per head, slope of log_std_mean over recent updates, nats/update
    entropy_differential: dict[Str, float] = {}  # per head, of the (pre-squash) Gaussian from its log-stds
    # per head, share of action elements beyond the bounds before clipping (|tanh| > 0.99 when squashed)
    action_saturation: dict[Str, float] = {}
    action_saturation_max: dict[Str, float] = {}  # ... of its worst dimension
    entropy_coef: float | None = None  # the entropy coefficient the loop reported for this update
    early_stopped: bool = False  # the loop reported a target-KL early stop
    early_stop_epoch: Int | None = None
    early_stop_kl: float | None = None


class ValueStats(_S):
    value_loss: float = NAN  # mean over minibatches
    value_loss_max: float = NAN  # max over minibatches
    explained_variance: float | None = None  # None: returns have zero variance (undefined)
    value_mean: float = NAN
    value_std: float = NAN
    value_min: float = NAN
    value_max: float = NAN
    return_std: float = NAN  # std of the returns the values are judged against (value_collapse)
    error_mean: float = NAN  # value - return
    error_std: float = NAN
    error_p5: float = NAN  # NORMAL and above
    error_p50: float = NAN
    error_p95: float = NAN
    error_quantile_n: Int = 0  # elements the percentiles used (< buffer size: a seeded sample)


class Moments(_S):
    count: Int = 0
    mean: float = NAN
    std: float = NAN
    min: float = NAN
    max: float = NAN
    skew: float | None = None  # None when std is 0
    kurtosis: float | None = None  # excess kurtosis; None when std is 0
    frac_positive: float = NAN


class ReturnStats(_S):
    count: Int = 0
    mean: float = NAN
    std: float = NAN
    min: float = NAN
    max: float = NAN
    p10: float = NAN
    p50: float = NAN
    p90: float = NAN
    quantile_n: Int = 0  # elements the percentiles used (< count: a seeded sample)


class AdvantageStats(_S):
    raw: Moments = msgspec.field(default_factory=Moments)  # as computed by GAE
    normalized: Moments = msgspec.field(default_factory=Moments)  # as fed to the loss
    returns: ReturnStats = msgspec.field(default_factory=ReturnStats)


class LSTMStats(_S):
    h_norm: float = NAN
    c_norm: float = NAN
    h_rms: float = NAN
    c_rms: float = NAN
    h_max_abs: float = NAN
    c_max_abs: float = NAN
    h_env_rms_max: float = NAN  # largest per-environment RMS of h
    c_env_rms_max: float = NAN
    c_mean: float = NAN
    h_nan: Int = 0
    h_inf: Int = 0
    c_nan: Int = 0
    c_inf: Int = 0
    gate_saturation: dict[Str, float] = {}  # "input" / "forget" / "output" -> share within eps of 0 or 1
    gate_saturation_low: dict[Str, float] = {}  # share within eps of 0
    gate_saturation_high: dict[Str, float] = {}  # share within eps of 1
    gate_rows: Int = 0  # batch rows the saturation was computed on
    gate_steps: Int = 0  # time steps replayed per row
    gate_total: Int = 0  # gate activations judged per gate kind (steps x rows x hidden x layers x dirs)
    gate_resets: Int = 0  # state resets replayed inside the judged rows (row-steps whose state was zeroed)
    gates_fed: bool = False  # gate inputs came with this update's state (False: "gates: not fed")
    gates_not_fed: Int = 0  # updates of the run so far whose LSTM state came without gate inputs


class EpisodeStats(_S):
    count: Int = 0  # episodes finished during this update's rollout
    return_mean: float = NAN
    return_min: float = NAN
    return_max: float = NAN
    length_mean: float = NAN


# ---- DEBUG-only diagnostics ------------------------------------------------------------------


class LayerRow(_S):
    """One parameter's gradient over every backward of the update (telemetry_core.debug).

    Distribution statistics (mean, std, min, max) are over the *finite* elements only, so one NaN
    does not hide the rest of the layer; ``nan``/``inf`` count what was left out. ``norm`` is the
    plain L2 norm (NaN/inf when an element is), the number clipping sees. Fractions are shares of
    all elements seen (numel x calls). A row with ``calls == 0`` never had a gradient (frozen or
    unused parameter): its statistics are NaN.
    """

    name: Str
    numel: Int
    norm: float  # L2 norm, mean over the calls that had a gradient
    mean: float  # finite elements, pooled over calls
    std: float  # population std (correction=0) of the finite elements
    min: float
    max: float
    zero_frac: float  # exactly zero
    small_frac: float  # 0 < |g| < Thresholds.grad_small_rel x max_grad_norm
    large_frac: float  # finite |g| > Thresholds.grad_large_rel x max_grad_norm
    nan: Int  # NaN elements, summed over calls
    inf: Int  # +-inf elements, summed over calls
    calls: Int = 0  # backward passes of the update in which this parameter had a gradient
    norm_max: float = NAN  # largest L2 norm over those calls


class NumericalReport(_S):
    """Where the numbers went bad, in one transfer."""

    nonfinite_weights: list[Str] = []  # parameter names with a NaN/inf weight (end of the update)
    nonfinite_grads: list[Str] = []  # parameter names with a NaN/inf gradient in any backward
    max_abs_weight: float = NAN  # largest finite |w| at the end of the update
    max_abs_weight_param: Str = ""
    max_abs_grad: float = NAN  # largest finite |g| over every backward of the update
    max_abs_grad_param: Str = ""
    loss_finite: bool | None = None  # None: no loss handed over
    losses_seen: Int = 0  # losses handed over to observe_gradients in this update
    nonfinite_losses: Int = 0  # ... of which NaN/inf
    pre_clip_norms: list[float] = []  # total pre-clip norm of each backward of the update


class RatioOutliers(_S):
    """The worst samples of the whole update by |log ratio|, for the joint policy or one head (L2).

    All lists run worst first and have one entry per listed sample.
    """

    head: Str  # "joint" or a head name
    index_kind: Str = "minibatch"  # "rollout": indices are rollout-buffer positions the loop passed
    indices: list[Int] = []  # rollout-buffer positions, else positions within the minibatch
    minibatches: list[Int] = []  # ordinal of the minibatch (0-based, within the update)
    epochs: list[Int] = []  # epoch the loop reported for that minibatch (-1: not reported)
    ratios: list[float] = []  # exp(new - old)
    actions: list[Int] = []  # this head's action; joint with several heads: -1 (see head_actions)
    logp_diff: list[float] = []  # new - old log-prob
    head_actions: dict[Str, list[Int]] = {}  # joint only: every head's action of each listed sample
    head_logp_diff: dict[Str, list[float]] = {}  # joint only: each head's share of the log ratio
    samples: Int = 0  # samples seen in the update
    nonfinite: Int = 0  # samples whose log-prob difference was NaN/inf (they rank worst)
    logp_diff_mean: float = NAN  # mean |new - old| over the whole update
    logp_diff_max: float = NAN  # max |new - old| over the whole update


class GradientConflict(_S):
    """Cosines between the gradients of separate loss terms on the parameters both reach.

    Computed once per update (first minibatch) from extra ``torch.autograd.grad`` calls; a cosine is
    None when either gradient is zero there or no parameter is shared.
    """

    policy_value_cosine: float | None = None  # cosine of d(policy loss) and d(value loss) on shared params
    shared_params: Int = 0  # number of parameter tensors both losses reach
    shared_numel: Int = 0  # ... and their elements
    policy_norm: float = NAN  # |d(policy loss)| on the shared parameters
    value_norm: float = NAN  # |d(value loss)| on the shared parameters
    head_cosines: dict[Str, float | None] = {}  # "a|b" -> cosine of the two heads' loss gradients
    head_value_cosines: dict[Str, float | None] = {}  # head -> cosine with the value-loss gradient
    extra_backward_passes: Int = 0  # what computing it cost (one per loss term)
    skipped_calls: Int = 0  # later observe_loss_terms calls of the update (not computed: cost bound)


class DebugReport(_S):
    layers: list[LayerRow] = []
    numerical: NumericalReport = msgspec.field(default_factory=NumericalReport)
    outliers: list[RatioOutliers] = []
    conflict: GradientConflict | None = None
    skipped: Int = 0  # documented skips: parameters without (dense) gradients in a backward
    # The per-layer table's element statistics (all but norm, norm_max and calls) cover the backwards
    # it examined: every layer_every-th backward of the run, layer_backwards of them in this update
    # (0: none; those rows are NaN). Norms and non-finite gradients come from every backward.
    layer_every: Int = 1
    layer_backwards: Int = 0
    conflict_every: Int = 1  # gradient conflict is computed on every conflict_every-th DEBUG update


# ---- multi-rank ---------------------------------------------------------------------------------


class RankStats(_S):
    """The update's key statistics of every torch.distributed rank (telemetry_core.distributed).

    Gathered by one collective per update; each rank's value is exactly what that rank's own
    snapshot says (NaN: not measured on that rank, or genuinely NaN). Summaries are over the ranks
    whose value is finite (NaN when none is).
    """

    world_size: Int = 1
    keys: list[Str] = []  # statistic names, in order (distributed.stat_keys)
    per_rank: dict[Str, list[float]] = {}  # key -> value of each rank, rank order
    mean: dict[Str, float] = {}
    min: dict[Str, float] = {}
    max: dict[Str, float] = {}
    median: dict[Str, float] = {}
    divergent_ranks: list[Int] = []  # non-finite where others are finite, or far from the rank median
    straggler_ranks: list[Int] = []
    flags: dict[Str, list[Int]] = {}  # key -> ranks flagged on that statistic (cells to highlight)
    straggle_key: Str = ""  # the time judged for stragglers: rollout_seconds or update_seconds
    enabled: bool = True
    disabled_reason: Str = ""  # why aggregation is off (layout mismatch), shown by the dashboard


# ---- run context --------------------------------------------------------------------------------


class Anomaly(_S):
    kind: Str  # one of telemetry_core.config.ANOMALY_KINDS
    severity: Str  # "warning" | "critical"
    step: Int
    message: Str  # plain words: what happened
    action: Str  # what to try
    value: float | None = None
    threshold: float | None = None
    head: Str | None = None
    rank: Int | None = None


class Incident(_S):
    """One alarm as the operator sees it: one anomaly kind on one scope, across updates.

    The detector judges each update (``Anomaly``); the trainer's incident layer
    (``telemetry_core.incidents``) turns those judgements into incidents so that every dashboard and
    every recording agrees on what was an alarm, when it started, how bad it got and when it ended.
    An incident opens on the first judgement of its (kind, scope), can be upgraded (warning ->
    critical), clears after ``Thresholds.incident_clear_updates`` updates without a judgement
    (hysteresis, so it does not flap), and a later judgement opens a new incident with a new id.
    Incidents opened in the same update (or the next) share a ``group``: the id of the most upstream
    one (non-finite values > gradients > KL > ratios > value/EV > entropy > LSTM > ...), so one cause
    reads as one alarm with its consequences listed under it.
    """

    id: Int  # unique within the trainer session, increasing
    kind: Str  # one of telemetry_core.config.ANOMALY_KINDS
    scope: Str = ""  # "" (the whole run), "head:NAME" or "rank:N"
    severity: Str = "warning"  # current: "warning" | "critical"
    peak_severity: Str = "warning"
    state: Str = "active"  # "active" | "cleared"
    onset_step: Int = 0
    last_step: Int = 0  # last update with a judgement of this kind and scope
    peak_step: Int = 0  # update of the worst judgement (the first at the peak severity)
    cleared_step: Int | None = None
    updates_active: Int = 0  # updates with a judgement (gaps inside the hysteresis not counted)
    value: float | None = None  # at the peak
    threshold: float | None = None  # at the peak
    last_value: float | None = None  # of the latest judgement
    last_threshold: float | None = None
    message: Str = ""  # the latest judgement's message
    peak_message: Str = ""  # the peak judgement's message
    action: Str = ""  # what to try
    group: Int = 0  # id of the incident heading this one's group (its own id when it heads it)


class IncidentEvent(_S):
    """What changed in this update: ``onset`` (a new incident), ``upgrade`` (warning -> critical)
    or ``clear``; ``incident`` is the incident as it stood right after the change."""

    event: Str  # "onset" | "upgrade" | "clear"
    step: Int
    incident: Incident


class LevelInfo(_S):
    level: Str = "NORMAL"  # OFF | MINIMAL | NORMAL | DEBUG
    reason: Str = "configured"
    lease_until: Int | None = None  # step at which an operator DEBUG lease ends
    escalations: dict[Str, Int] = {}  # anomaly kind -> step its auto-escalation holds until
    debug_share: float = 0.0  # share of the recent budget window's updates that ran at DEBUG
    debug_window: Int = 0  # updates in that window so far
    debug_seconds: float = 0.0  # wall time of updates that ran at DEBUG, summed over the run
    escalations_refused: Int = 0  # auto-escalations refused by the DEBUG budget, summed over the run


class RunInfo(_S):
    name: Str = ""
    heads: dict[Str, Int] = {}  # head -> number of actions
    param_names: list[Str] = []
    param_numels: list[Int] = []
    groups: dict[Str, Int] = {}  # group name -> number of parameter elements
    planned_updates: Int | None = None
    world_size: Int = 1
    rank: Int = 0
    device: Str = ""
    max_grad_norm: float = NAN


class Counters(_S):
    """Everything telemetry dropped or refused so far, so nothing is lost silently."""

    snapshots_published: Int = 0
    snapshots_dropped: Int = 0  # publish queue full, oldest dropped
    records_written: Int = 0
    records_dropped: Int = 0  # recorder queue full (slow disk)
    commands_accepted: Int = 0
    commands_rejected: Int = 0
    telemetry_errors: Int = 0  # exceptions swallowed to protect training
    last_telemetry_error: Str = ""  # where and what the latest of them was (one line)
    inputs_skipped: Int = 0  # documented skips (e.g. parameters without gradients)


class Snapshot(_S):
    step: Int
    wall_time: float
    phase: Str = "mid"
    # Environment steps at which the training loop's own logger shows this update (CleanRL: its
    # global_step after the update's rollout; SB3: its num_timesteps at the dump that writes the
    # update's train/* values, one rollout later); None when the loop did not say. An x-axis that
    # lines a recording up with the loop's own TensorBoard curves.
    timesteps: Int | None = None
    update_seconds: float = NAN  # wall time of this update, as the hub saw it
    level: LevelInfo = msgspec.field(default_factory=LevelInfo)
    gradients: GradientStats | None = None
    policy: PolicyStats | None = None
    value: ValueStats | None = None
    advantage: AdvantageStats | None = None
    lstm: LSTMStats | None = None
    episodes: EpisodeStats | None = None
    debug: DebugReport | None = None
    ranks: RankStats | None = None
    anomalies: list[Anomaly] = []  # the detector's judgements of this update
    incidents: list[Incident] = []  # active incidents after this update
    incident_events: list[IncidentEvent] = []  # onsets, upgrades and clears of this update
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    run: RunInfo = msgspec.field(default_factory=RunInfo)
    counters: Counters = msgspec.field(default_factory=Counters)
    profile_trace: Str | None = None  # path of a finished torch.profiler trace
    # "running", or "finished" on the one frame TelemetryHub.close() publishes last (a repeat of the
    # last update's statistics): the run ended, it did not vanish. A reader treats any other word as
    # "running", so a later minor version may add states.
    run_state: RunState = "running"


# --------------------------------------------------------------------------------------------
# Control plane
# --------------------------------------------------------------------------------------------


class Heartbeat(_S):
    step: Int = 0
    level: Str = "NORMAL"
    uptime: float = 0.0
    counters: Counters = msgspec.field(default_factory=Counters)
    run_name: Str = ""


COMMAND_ACTIONS = ("lease_debug", "renew", "release", "set_level", "history", "profile")


class Command(_S):
    id: Str  # unique per command (duplicates are refused)
    session: Str  # the trainer session it is meant for
    issued: float  # wall time at the dashboard
    expires: float  # wall time after which the trainer refuses it
    action: Str  # one of COMMAND_ACTIONS
    client: Str = ""  # dashboard identity, for logs and rate limits
    level: Str | None = None  # set_level
    updates: Int | None = None  # lease_debug / renew: lease length in updates
    lease_seconds: float | None = None  # lease ends if not renewed within this
    since_seq: Int | None = None  # history: only frames after this sequence number
    profile_updates: Int | None = None  # profile: updates to capture


class Ack(_S):
    command_id: Str
    action: Str
    message: Str = ""
    effective_step: Int | None = None  # first update the change applies to
    level: Str | None = None
    lease_until: Int | None = None


class Nack(_S):
    command_id: Str
    reason: Str  # plain words
    code: Str = "rejected"  # stable reason code: bad_signature, stale, duplicate, ...


class History(_S):
    """Recent snapshot frames (each an encoded Envelope, exactly as published) for backfill.

    A large history is split into ``chunks`` replies (each under the frame cap) that all name the
    ``command_id`` they answer; ``chunk`` counts from 0, so the last one has ``chunk == chunks - 1``.
    """

    frames: list[bytes] = []
    oldest_seq: Int | None = None  # of the frames in this chunk
    newest_seq: Int | None = None
    command_id: Str = ""  # the history command this answers
    chunk: Int = 0
    chunks: Int = 1
    latest_seq: Int | None = None  # newest snapshot the trainer had published when it answered


class Envelope(_S):
    """Every message on every socket. ``body`` is decoded by ``kind`` only after the checks pass."""

    magic: Str
    major: Int
    minor: Int
    session: Str
    seq: Int
    step: Int
    wall_time: float
    kind: Str  # "snapshot" | "heartbeat" | "command" | "ack" | "nack" | "history"
    body: msgspec.Raw = msgspec.Raw(b"\xc0")


BODY_TYPES: dict[str, type[_S]] = {
    "snapshot": Snapshot,
    "heartbeat": Heartbeat,
    "command": Command,
    "ack": Ack,
    "nack": Nack,
    "history": History,
}
