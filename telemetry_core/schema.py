"""The wire schema: typed msgspec Structs, msgpack-encoded, shared by trainer and dashboard.

Torch-free. Evolution rules (msgspec): new fields get defaults and bump ``SCHEMA_MINOR``; unknown
fields are ignored by older readers; a field's type never changes (that is a ``SCHEMA_MAJOR`` bump).
Statistics that are undefined (explained variance of constant returns, say) are ``None``;
statistics that are genuinely non-finite (a NaN gradient norm) travel as NaN/inf and are shown so.
Nothing here is ever pickled.
"""

from __future__ import annotations

import math

import msgspec

from telemetry_core.config import Thresholds

__all__ = [
    "MAGIC",
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
SCHEMA_MINOR = 1  # 1: incidents, incident events, DEBUG cost share

NAN = math.nan


class _S(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Base: keyword-only construction, map encoding (so unknown fields are skipped on decode)."""


# --------------------------------------------------------------------------------------------
# Statistics of one PPO update
# --------------------------------------------------------------------------------------------


class GradientStats(_S):
    """Gradients after backward, before clipping, accumulated over every backward of the update."""

    calls: int = 0  # backward passes observed in this update
    max_grad_norm: float = NAN  # the loop's clipping cap
    total_norm: float = NAN  # pre-clip global L2 norm, mean over calls
    total_norm_max: float = NAN  # ... max over calls
    total_norm_last: float = NAN  # ... of the last call
    clip_rate: float = NAN  # share of calls whose pre-clip norm exceeded max_grad_norm
    max_abs: float = NAN  # max |g| over all elements and calls (NaN if any element is NaN)
    # NaN / +-inf gradient elements, summed over calls. Exactly 0 for a tensor without any (its norm
    # says so, from every element); otherwise counted on the examined elements and scaled to the
    # tensor, at least 1 per affected tensor, exact for tensors examined in full or entirely NaN.
    nan_count: int = 0
    inf_count: int = 0
    nan_params: int = 0  # parameter tensors holding a NaN gradient, summed over calls (exact)
    inf_params: int = 0  # ... holding +-inf (and no NaN), summed over calls (exact)
    skipped_params: int = 0  # parameters whose .grad was None in a call of this update (skipped)
    # The first (up to 16, model order) parameters holding a NaN/Inf gradient in some call of this
    # update, exact (from every element): where a numerical failure starts, at the update it starts.
    nonfinite_params: list[str] = []
    # NORMAL and above:
    zero_fraction: float | None = None  # share of exactly-zero (+-0) elements among the examined ones
    hist_counts: list[int] = []  # [zero, (0,e0), [e0,e1), ..., [e_last, inf)] of examined |g|, finite only
    examined_elements: int = 0  # gradient elements binned into hist_counts, summed over calls
    total_elements: int = 0  # gradient elements observed, summed over calls
    param_norms: list[float] = []  # per parameter, mean over calls that had its grad (NaN: none did)
    group_norms: dict[str, float] = {}  # per named group, L2 norm (mean over calls)
    group_norms_normalized: dict[str, float] = {}  # group norm / sqrt(numel of group)
    group_ratios: dict[str, float] = {}  # normalised group norm / normalised whole-model norm
    vanishing_count: int = 0  # parameters below grad_vanishing_rel x max_grad_norm (max over calls)
    exploding_count: int = 0  # parameters above grad_exploding_rel x max_grad_norm (max over calls)
    ema_total_norm: float | None = None  # EMA of the pre-clip total norm
    ema_drift: float | None = None  # |x - ema| / (ema + eps); None during warm-up
    group_ema_drift: dict[str, float] = {}  # per group, drift of its norm; groups in warm-up are absent


class PolicyStats(_S):
    """Ratios, KL, clipping, entropy: accumulated over every minibatch and epoch of the update."""

    minibatches: int = 0
    epochs: int = 0
    samples: int = 0  # log-ratio samples seen over every minibatch and epoch
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
    logratio_nan: int = 0  # samples whose joint log-ratio is NaN (clip fractions are then NaN)
    logratio_inf: int = 0  # samples whose joint log-ratio is +-inf (a probability of exactly 0)
    head_clip_fraction: dict[str, float] = {}
    head_clip_high: dict[str, float] = {}
    head_clip_low: dict[str, float] = {}
    head_ratio_max: dict[str, float] = {}
    head_ratio_min: dict[str, float] = {}
    head_kl_k3: dict[str, float] = {}
    entropy: dict[str, float] = {}  # per head, nats, mean over minibatches
    entropy_normalized: dict[str, float] = {}  # per head, / log(number of actions); 1-action heads absent
    early_stopped: bool = False  # the loop reported a target-KL early stop
    early_stop_epoch: int | None = None
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
    error_quantile_n: int = 0  # elements the percentiles used (< buffer size: a seeded sample)


class Moments(_S):
    count: int = 0
    mean: float = NAN
    std: float = NAN
    min: float = NAN
    max: float = NAN
    skew: float | None = None  # None when std is 0
    kurtosis: float | None = None  # excess kurtosis; None when std is 0
    frac_positive: float = NAN


class ReturnStats(_S):
    count: int = 0
    mean: float = NAN
    std: float = NAN
    min: float = NAN
    max: float = NAN
    p10: float = NAN
    p50: float = NAN
    p90: float = NAN
    quantile_n: int = 0  # elements the percentiles used (< count: a seeded sample)


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
    h_nan: int = 0
    h_inf: int = 0
    c_nan: int = 0
    c_inf: int = 0
    gate_saturation: dict[str, float] = {}  # "input" / "forget" / "output" -> share within eps of 0 or 1
    gate_saturation_low: dict[str, float] = {}  # share within eps of 0
    gate_saturation_high: dict[str, float] = {}  # share within eps of 1
    gate_rows: int = 0  # batch rows the saturation was computed on
    gate_steps: int = 0  # time steps replayed per row
    gate_total: int = 0  # gate activations judged per gate kind (steps x rows x hidden x layers x dirs)


class EpisodeStats(_S):
    count: int = 0  # episodes finished during this update's rollout
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

    name: str
    numel: int
    norm: float  # L2 norm, mean over the calls that had a gradient
    mean: float  # finite elements, pooled over calls
    std: float  # population std (correction=0) of the finite elements
    min: float
    max: float
    zero_frac: float  # exactly zero
    small_frac: float  # 0 < |g| < Thresholds.grad_small_rel x max_grad_norm
    large_frac: float  # finite |g| > Thresholds.grad_large_rel x max_grad_norm
    nan: int  # NaN elements, summed over calls
    inf: int  # +-inf elements, summed over calls
    calls: int = 0  # backward passes of the update in which this parameter had a gradient
    norm_max: float = NAN  # largest L2 norm over those calls


class NumericalReport(_S):
    """Where the numbers went bad, in one transfer (review M3)."""

    nonfinite_weights: list[str] = []  # parameter names with a NaN/inf weight (end of the update)
    nonfinite_grads: list[str] = []  # parameter names with a NaN/inf gradient in any backward
    max_abs_weight: float = NAN  # largest finite |w| at the end of the update
    max_abs_weight_param: str = ""
    max_abs_grad: float = NAN  # largest finite |g| over every backward of the update
    max_abs_grad_param: str = ""
    loss_finite: bool | None = None  # None: no loss handed over
    losses_seen: int = 0  # losses handed over to observe_gradients in this update
    nonfinite_losses: int = 0  # ... of which NaN/inf
    pre_clip_norms: list[float] = []  # total pre-clip norm of each backward of the update


class RatioOutliers(_S):
    """The worst samples of the whole update by |log ratio|, for the joint policy or one head (L2).

    All lists run worst first and have one entry per listed sample.
    """

    head: str  # "joint" or a head name
    index_kind: str = "minibatch"  # "rollout": indices are rollout-buffer positions the loop passed
    indices: list[int] = []  # rollout-buffer positions, else positions within the minibatch
    minibatches: list[int] = []  # ordinal of the minibatch (0-based, within the update)
    epochs: list[int] = []  # epoch the loop reported for that minibatch (-1: not reported)
    ratios: list[float] = []  # exp(new - old)
    actions: list[int] = []  # this head's action; joint with several heads: -1 (see head_actions)
    logp_diff: list[float] = []  # new - old log-prob
    head_actions: dict[str, list[int]] = {}  # joint only: every head's action of each listed sample
    head_logp_diff: dict[str, list[float]] = {}  # joint only: each head's share of the log ratio
    samples: int = 0  # samples seen in the update
    nonfinite: int = 0  # samples whose log-prob difference was NaN/inf (they rank worst)
    logp_diff_mean: float = NAN  # mean |new - old| over the whole update
    logp_diff_max: float = NAN  # max |new - old| over the whole update


class GradientConflict(_S):
    """Cosines between the gradients of separate loss terms on the parameters both reach.

    Computed once per update (first minibatch) from extra ``torch.autograd.grad`` calls; a cosine is
    None when either gradient is zero there or no parameter is shared.
    """

    policy_value_cosine: float | None = None  # cosine of d(policy loss) and d(value loss) on shared params
    shared_params: int = 0  # number of parameter tensors both losses reach
    shared_numel: int = 0  # ... and their elements
    policy_norm: float = NAN  # |d(policy loss)| on the shared parameters
    value_norm: float = NAN  # |d(value loss)| on the shared parameters
    head_cosines: dict[str, float | None] = {}  # "a|b" -> cosine of the two heads' loss gradients
    head_value_cosines: dict[str, float | None] = {}  # head -> cosine with the value-loss gradient
    extra_backward_passes: int = 0  # what computing it cost (one per loss term)
    skipped_calls: int = 0  # later observe_loss_terms calls of the update (not computed: cost bound)


class DebugReport(_S):
    layers: list[LayerRow] = []
    numerical: NumericalReport = msgspec.field(default_factory=NumericalReport)
    outliers: list[RatioOutliers] = []
    conflict: GradientConflict | None = None
    skipped: int = 0  # documented skips: parameters without (dense) gradients in a backward
    # The per-layer table's element statistics (all but norm, norm_max and calls) cover the backwards
    # it examined: every layer_every-th backward of the run, layer_backwards of them in this update
    # (0: none; those rows are NaN). Norms and non-finite gradients come from every backward.
    layer_every: int = 1
    layer_backwards: int = 0
    conflict_every: int = 1  # gradient conflict is computed on every conflict_every-th DEBUG update


# ---- multi-rank ---------------------------------------------------------------------------------


class RankStats(_S):
    """The update's key statistics of every torch.distributed rank (telemetry_core.distributed).

    Gathered by one collective per update; each rank's value is exactly what that rank's own
    snapshot says (NaN: not measured on that rank, or genuinely NaN). Summaries are over the ranks
    whose value is finite (NaN when none is).
    """

    world_size: int = 1
    keys: list[str] = []  # statistic names, in order (distributed.stat_keys)
    per_rank: dict[str, list[float]] = {}  # key -> value of each rank, rank order
    mean: dict[str, float] = {}
    min: dict[str, float] = {}
    max: dict[str, float] = {}
    median: dict[str, float] = {}
    divergent_ranks: list[int] = []  # non-finite where others are finite, or far from the rank median
    straggler_ranks: list[int] = []
    flags: dict[str, list[int]] = {}  # key -> ranks flagged on that statistic (cells to highlight)
    straggle_key: str = ""  # the time judged for stragglers: rollout_seconds or update_seconds
    enabled: bool = True
    disabled_reason: str = ""  # why aggregation is off (layout mismatch), shown by the dashboard


# ---- run context --------------------------------------------------------------------------------


class Anomaly(_S):
    kind: str  # one of telemetry_core.config.ANOMALY_KINDS
    severity: str  # "warning" | "critical"
    step: int
    message: str  # plain words: what happened
    action: str  # what to try
    value: float | None = None
    threshold: float | None = None
    head: str | None = None
    rank: int | None = None


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

    id: int  # unique within the trainer session, increasing
    kind: str  # one of telemetry_core.config.ANOMALY_KINDS
    scope: str = ""  # "" (the whole run), "head:NAME" or "rank:N"
    severity: str = "warning"  # current: "warning" | "critical"
    peak_severity: str = "warning"
    state: str = "active"  # "active" | "cleared"
    onset_step: int = 0
    last_step: int = 0  # last update with a judgement of this kind and scope
    peak_step: int = 0  # update of the worst judgement (the first at the peak severity)
    cleared_step: int | None = None
    updates_active: int = 0  # updates with a judgement (gaps inside the hysteresis not counted)
    value: float | None = None  # at the peak
    threshold: float | None = None  # at the peak
    last_value: float | None = None  # of the latest judgement
    last_threshold: float | None = None
    message: str = ""  # the latest judgement's message
    peak_message: str = ""  # the peak judgement's message
    action: str = ""  # what to try
    group: int = 0  # id of the incident heading this one's group (its own id when it heads it)


class IncidentEvent(_S):
    """What changed in this update: ``onset`` (a new incident), ``upgrade`` (warning -> critical)
    or ``clear``; ``incident`` is the incident as it stood right after the change."""

    event: str  # "onset" | "upgrade" | "clear"
    step: int
    incident: Incident


class LevelInfo(_S):
    level: str = "NORMAL"  # OFF | MINIMAL | NORMAL | DEBUG
    reason: str = "configured"
    lease_until: int | None = None  # step at which an operator DEBUG lease ends
    escalations: dict[str, int] = {}  # anomaly kind -> step its auto-escalation holds until
    debug_share: float = 0.0  # share of the recent budget window's updates that ran at DEBUG
    debug_window: int = 0  # updates in that window so far
    debug_seconds: float = 0.0  # wall time of updates that ran at DEBUG, summed over the run
    escalations_refused: int = 0  # auto-escalations refused by the DEBUG budget, summed over the run


class RunInfo(_S):
    name: str = ""
    heads: dict[str, int] = {}  # head -> number of actions
    param_names: list[str] = []
    param_numels: list[int] = []
    groups: dict[str, int] = {}  # group name -> number of parameter elements
    planned_updates: int | None = None
    world_size: int = 1
    rank: int = 0
    device: str = ""
    max_grad_norm: float = NAN


class Counters(_S):
    """Everything telemetry dropped or refused so far, so nothing is lost silently."""

    snapshots_published: int = 0
    snapshots_dropped: int = 0  # publish queue full, oldest dropped
    records_written: int = 0
    records_dropped: int = 0  # recorder queue full (slow disk)
    commands_accepted: int = 0
    commands_rejected: int = 0
    telemetry_errors: int = 0  # exceptions swallowed to protect training
    inputs_skipped: int = 0  # documented skips (e.g. parameters without gradients)


class Snapshot(_S):
    step: int
    wall_time: float
    phase: str = "mid"
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
    profile_trace: str | None = None  # path of a finished torch.profiler trace


# --------------------------------------------------------------------------------------------
# Control plane
# --------------------------------------------------------------------------------------------


class Heartbeat(_S):
    step: int = 0
    level: str = "NORMAL"
    uptime: float = 0.0
    counters: Counters = msgspec.field(default_factory=Counters)
    run_name: str = ""


COMMAND_ACTIONS = ("lease_debug", "renew", "release", "set_level", "history", "profile")


class Command(_S):
    id: str  # unique per command (duplicates are refused)
    session: str  # the trainer session it is meant for
    issued: float  # wall time at the dashboard
    expires: float  # wall time after which the trainer refuses it
    action: str  # one of COMMAND_ACTIONS
    client: str = ""  # dashboard identity, for logs and rate limits
    level: str | None = None  # set_level
    updates: int | None = None  # lease_debug / renew: lease length in updates
    lease_seconds: float | None = None  # lease ends if not renewed within this
    since_seq: int | None = None  # history: only frames after this sequence number
    profile_updates: int | None = None  # profile: updates to capture


class Ack(_S):
    command_id: str
    action: str
    message: str = ""
    effective_step: int | None = None  # first update the change applies to
    level: str | None = None
    lease_until: int | None = None


class Nack(_S):
    command_id: str
    reason: str  # plain words
    code: str = "rejected"  # stable reason code: bad_signature, stale, duplicate, ...


class History(_S):
    """Recent snapshot frames (each an encoded Envelope, exactly as published) for backfill.

    A large history is split into ``chunks`` replies (each under the frame cap) that all name the
    ``command_id`` they answer; ``chunk`` counts from 0, so the last one has ``chunk == chunks - 1``.
    """

    frames: list[bytes] = []
    oldest_seq: int | None = None  # of the frames in this chunk
    newest_seq: int | None = None
    command_id: str = ""  # the history command this answers
    chunk: int = 0
    chunks: int = 1
    latest_seq: int | None = None  # newest snapshot the trainer had published when it answered


class Envelope(_S):
    """Every message on every socket. ``body`` is decoded by ``kind`` only after the checks pass."""

    magic: str
    major: int
    minor: int
    session: str
    seq: int
    step: int
    wall_time: float
    kind: str  # "snapshot" | "heartbeat" | "command" | "ack" | "nack" | "history"
    body: msgspec.Raw = msgspec.Raw(b"\xc0")


BODY_TYPES: dict[str, type[_S]] = {
    "snapshot": Snapshot,
    "heartbeat": Heartbeat,
    "command": Command,
    "ack": Ack,
    "nack": Nack,
    "history": History,
}
