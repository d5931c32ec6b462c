"""Levels, thresholds and escalation: the one place where every limit of the product lives.

Torch-free on purpose: the dashboard imports this module to colour metrics by the *trainer's*
thresholds (they travel inside every snapshot), so the two sides can never disagree.

Every field of :class:`Thresholds` carries a one-line reason (``metadata["why"]``), which the
dashboard's thresholds screen prints next to the value.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from telemetry_core.kinds import SPECS

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_ESCALATION_UPDATES",
    "Phase",
    "TelemetryConfig",
    "TelemetryLevel",
    "Thresholds",
    "phase_of",
    "threshold_reasons",
]


class TelemetryLevel(enum.IntEnum):
    """How much the trainer measures. Each level includes everything below it.

    OFF:     nothing is computed or published; the hub still serves commands and heartbeats so an
             operator can raise the level.
    MINIMAL: scalars that cost O(batch) or one fused pass over the gradients: losses, KL (k1/k3,
             mean/max), ratio mean/max/min/std, clip fractions, ESS, per-head entropy, explained
             variance, pre-clip total gradient norm, clip rate, non-finite gradient counts,
             episode returns. Enough for every anomaly check except the LSTM and drift ones.
    NORMAL:  MINIMAL plus per-parameter and per-group gradient norms, the magnitude histogram,
             zero fraction, vanishing/exploding counts, EMA drift, advantage and return
             distributions (moments, percentiles), value error quantiles, LSTM state statistics and
             gate saturation on a sample of the batch. Still exactly one host transfer per update.
    DEBUG:   NORMAL plus the per-layer gradient table, the numerical-stability report, per-head
             ratio outliers, gate saturation on the whole batch and (when the loop hands over the
             separate loss terms) policy/value and head-to-head gradient conflict. The diagnostics
             ride in the same single transfer; gradient conflict costs extra backward passes
             (see telemetry_core.debug).
    """

    OFF = 0
    MINIMAL = 1
    NORMAL = 2
    DEBUG = 3

    @classmethod
    def parse(cls, value: str | int | TelemetryLevel) -> TelemetryLevel:
        """Accept ``"debug"``, ``"DEBUG"``, ``3`` or a level; raise ValueError naming the choices."""
        if isinstance(value, TelemetryLevel):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            choices = ", ".join(level.name.lower() for level in cls)
            raise ValueError(f"unknown telemetry level {value!r}; choose one of {choices}") from None


class Phase(str, enum.Enum):
    """Training phase by fraction of planned updates; explained-variance limits depend on it."""

    WARMUP = "warmup"
    EARLY = "early"
    MID = "mid"
    LATE = "late"


# Stable anomaly identifiers, in registry order (``telemetry_core.kinds`` defines each kind). The
# dashboard, the recordings and the tests refer to these strings.
ANOMALY_KINDS: tuple[str, ...] = tuple(SPECS)


def _t(default: Any, why: str) -> Any:
    """A threshold field with its one-line reason."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"why": why})
    return field(default=default, metadata={"why": why})


@dataclass(frozen=True)
class Thresholds:
    """Every threshold used anywhere in the product, with PPO-tuned defaults.

    Gradient limits are *relative to* ``max_grad_norm`` (the clipping cap of the loop), because the
    cap sets the scale of healthy gradients. Entropy limits apply to entropy normalised
    by log(number of actions) of each head, so one number fits every head size.
    Serialisable with msgspec (it is a plain dataclass of floats, ints, tuples and dicts).
    """

    # ---- policy: entropy ---------------------------------------------------------------------
    entropy_collapse: float = _t(
        0.1, "normalised entropy below this is a near-deterministic head (reference system, Karn)"
    )
    entropy_warning: float = _t(
        0.2, "normalised entropy below this is shown yellow: exploration is running out"
    )
    entropy_collapse_per_head: dict[str, float] = _t(
        {}, "per-head overrides of entropy_collapse (small heads tolerate lower entropy)"
    )
    entropy_patience: int = _t(
        3, "consecutive updates below the limit before entropy_collapse fires (reference: 3)"
    )
    entropy_clear_factor: float = _t(
        1.5, "hysteresis: a collapsed head clears only above this multiple of its limit"
    )
    entropy_critical_fraction: float = _t(
        0.2,
        "a collapsed head below this fraction of its limit is critical: deterministic, which an "
        "entropy bonus of the right sign does not allow (anomaly detector)",
    )
    entropy_drop_fraction: float = _t(
        0.5,
        "a head whose entropy falls below this fraction of its recent median is collapsing "
        "(warning): healthy demo runs (8 seeds) never fell below 0.62; the demo's wrong-sign "
        "ent_coef is below it 3 updates after onset in 6 of 8 seeds, 4 in all (the slide rules "
        "below see it sooner), long before the absolute limit",
    )
    entropy_fall_step: float = _t(
        0.1,
        "an update whose head entropy is more than this fraction below the previous update's counts "
        "as a fall for the fast-fall rule (demo wrong-sign ent_coef: 10-50% per update)",
    )
    entropy_fall_updates: int = _t(
        3,
        "consecutive falls the fast-fall rule needs: healthy demo heads lose up to 38% in two "
        "updates while learning, then recover; a wrong-sign ent_coef keeps falling",
    )
    entropy_fall_fraction: float = _t(
        0.65,
        "a head after entropy_fall_updates falls and below this fraction of its recent median is "
        "collapsing (warning): the demo's wrong-sign ent_coef is at 0.19-0.47 three updates after "
        "onset in 6 of 8 seeds; the one healthy 3-fall slide in 8 seeds x 300 updates stopped at 0.78",
    )
    entropy_throttled_fall_step: float = _t(
        0.05,
        "a fall of more than this fraction in an update the target-KL early stop cut short counts "
        "for the pushed-down rule: in 2 of 8 demo seeds the trust region slows a wrong-sign "
        "ent_coef to 8-15% per update (0.60-0.70 of the median 3 updates after onset)",
    )
    entropy_throttled_fall_fraction: float = _t(
        0.8,
        "a head after entropy_fall_updates such throttled falls and below this fraction of its "
        "recent median is collapsing (warning): healthy demo runs stop early in ~1 update of 8, in "
        "bursts while they learn fast; in 8 seeds x 300 updates this fired once (seed 8, update 43, "
        "at 0.67: a head sharpening fast) - a warning, the price of flagging the slow seeds in time",
    )
    entropy_slide_critical_updates: int = _t(
        3,
        "a head flagged (collapsing or collapsed) at least this many updates in a row ... (a healthy "
        "demo head's dip is flagged for 1-2 updates at most)",
    )
    entropy_slide_critical_window: int = _t(
        10,
        "... and at most this many ... (a converged feed-forward Acrobot agent's head sat below the "
        "limit for 600+ updates, drifting from 0.1 to 0.06: slow, healthy, never critical) ...",
    )
    entropy_slide_critical_fraction: float = _t(
        0.3,
        "... that fell below this fraction of its median before the slide is critical, and stays so "
        "while flagged: a wrong-sign ent_coef stayed a warning for 9+ updates at normalised entropy "
        "0.035; the demo's (seed 1) is at 0.15 of its median 4 updates after onset",
    )
    entropy_spread_k: float = _t(
        6.0,
        "a head that fell in each of the last entropy_spread_updates updates is collapsing (warning) when "
        "the fall, less its recent trend, exceeds this many robust sigmas (1.4826 x MAD) of its own "
        "update-to-update changes (over its rolling baseline) x sqrt(updates): a feed-forward Acrobot "
        "head's wrong-sign ent_coef fell 9-11 sigmas in two updates, the same head learning fast fell 1.2",
    )
    entropy_spread_updates: int = _t(
        2,
        "... consecutive falls the spread rule needs; a slide that keeps beating the spread for "
        "entropy_slide_critical_updates falls is critical (a wrong-sign ent_coef, before it bottoms out)",
    )
    entropy_spread_min_fraction: float = _t(
        0.2,
        "... and the fall must also exceed this fraction of the head's recent median (a head whose "
        "entropy hardly moved for ten updates has a spread near 0: feed-forward Acrobot heads' first "
        "learning slides from the near-uniform start lost 13-18% of it in two to five updates)",
    )
    entropy_sharpen_fraction: float = _t(
        0.05,
        "a head whose normalised entropy fell by more than this fraction from the update's first epoch "
        "to its last (the same rollout, so what the update itself did) is sharpening (warning) when it "
        "is also beyond its own usual change (entropy_sharpen_k): healthy heads of four agents changed "
        "by -4.3% to +3% within an update, a wrong-sign ent_coef took -7% to -10% every update",
    )
    entropy_sharpen_k: float = _t(
        4.0,
        "... and that change lies more than this many robust sigmas (1.4826 x MAD) below the median of "
        "its changes over the rolling baseline",
    )
    entropy_sharpen_updates: int = _t(
        2,
        "... for this many updates in a row before it is flagged: a healthy head that starts to learn "
        "sharpens once or twice beyond its quiet history, a wrong-sign ent_coef every update",
    )
    entropy_sharpen_window: int = _t(
        20, "updates of within-update changes (unflagged) whose median and spread the rule judges against"
    )
    entropy_sharpen_critical_updates: int = _t(
        5,
        "a head sharpening this many updates in a row is critical: the update keeps trading its "
        "exploration for nothing the returns show (a wrong-sign ent_coef), before it bottoms out; a "
        "healthy recurrent Acrobot head that had not learnt yet sharpened 4 updates in a row once",
    )
    entropy_baseline_window: int = _t(10, "updates in each head's rolling entropy baseline (median)")
    entropy_coef_min: float = _t(
        0.0,
        "an entropy coefficient the loop reports below this is entropy_collapse (critical) at once: the "
        "loss rewards determinism (loss = pg - ent_coef x entropy)",
    )
    # ---- policy: KL, ratios, clipping ----------------------------------------------------------
    kl_target: float = _t(0.01, "typical PPO KL target per update (Schulman; SB3 and Spinning Up defaults)")
    kl_spike_warning: float = _t(
        0.05, "k3 KL (update mean) above this is a spike: 5x a typical target, past any early stop"
    )
    kl_spike_critical: float = _t(
        0.5,
        "k3 KL above this: the policy moved far outside the trust region in one update. A healthy "
        "demo run that has converged (return 500, nearly deterministic heads) reaches 0.19-0.37 in "
        "the one minibatch before its target-KL stop, 3 times in 1,900 updates; a learning rate x40 "
        "or an actor/learner mismatch reaches 0.70-1.77 (0.15, the first limit, was critical on those "
        "healthy updates too)",
    )
    kl_relative_factor: float = _t(
        5.0, "k3 KL above this multiple of its rolling median is a spike even below the absolute limit"
    )
    kl_relative_floor: float = _t(
        0.01,
        "relative KL spikes are ignored below this absolute KL, the usual PPO target (noise around tiny "
        "baselines). A learning rate x40 on feed-forward Acrobot agents reached KL 0.0195 (100x its "
        "median) on one seed and 0.0142 (70x) on another; 0.01 warns on one healthy update in ~8,600 "
        "of the calibration set and the demo (0.0113, 6x its median)",
    )
    kl_baseline_window: int = _t(20, "updates in the rolling KL baseline (median)")
    ratio_explosion: float = _t(
        10.0,
        "max ratio above this warns: a log-prob rose 2.3 nats on some sample. The reference's 5 fired "
        "on 12 of 900 healthy demo updates (3 seeds x 300; the largest of ~16k samples: p99 5.4, max "
        "9.4); the demo's injected explosion and KL spike reach 23-53",
    )
    ratio_collapse: float = _t(
        0.02,
        "min ratio below this warns: a sampled action's probability fell 50x in one update. The "
        "reference's 0.1 fired on 12 of 900 healthy demo updates (p1 0.08-0.14, min 0.0073); the "
        "injected explosion and KL spike reach 0.001-0.003",
    )
    ratio_explosion_critical: float = _t(
        20.0, "max ratio above this is critical: a log-prob rose 3 nats (healthy demo runs peak at 10)"
    )
    ratio_collapse_critical: float = _t(
        0.001,
        "min ratio below this is critical: a probability fell 1000x in one update (one sample of "
        "16k in a healthy demo run reached 0.0073: probabilities can shrink without bound)",
    )
    ratio_tail_share: float = _t(
        0.01,
        "ratio_explosion / ratio_collapse fire when more than this share of the update's samples lies "
        "beyond the limit (critical: beyond the critical limit): the single extreme of ~16k samples is "
        "noise (a healthy recurrent agent's min ratio reached 2.1e-4), and a converged policy's rare "
        "actions lose probability in bursts (the healthy demo after convergence: 0.2-0.9 % of an "
        "early-stopped update's samples below 0.02, eleven times in 1,900 updates, once 2.7 %); "
        "the injected failures put 9-100 % there",
    )
    ratio_tail_share_critical: float = _t(
        0.05,
        "ratio_explosion / ratio_collapse are also critical when more than this share of the samples "
        "lies beyond the warning limit: a converged healthy demo run had 2.7 % of one update's "
        "samples below 0.02 (14 of 512, once in 1,900 updates), a learning rate x40 or an actor/learner "
        "mismatch put 9-12 % there",
    )
    ratio_tail_critical_min_samples: int = _t(
        8,
        "beyond the critical limits (ratio_explosion_critical / ratio_collapse_critical) more than "
        "this many samples are needed, however small the update: a converged healthy demo run had 5 "
        "of 512 samples below 0.001 in one early-stopped update (1,900 updates); the injected "
        "failures move the bulk past the warning limits instead (0-1 samples beyond the critical ones)",
    )
    ratio_tail_min_samples: int = _t(
        3,
        "the ratio tail rules need more than this many samples beyond the limit, however small the "
        "update: healthy demo updates (3 seeds x 300) never had more than 2 samples beyond any ratio "
        "limit; the demo's actor/learner mismatch, cut to 256 samples by the target-KL stop, had 5 "
        "above 10x and 31 below 0.02",
    )
    clip_fraction_warning: float = _t(
        0.3, "clip fraction above this is shown yellow (folklore 0.1-0.3 band; not a KL proxy)"
    )
    ess_warning: float = _t(0.7, "normalised effective sample size of the ratios below this is shown yellow")
    # ---- value --------------------------------------------------------------------------------
    ev_warmup: float = _t(-0.5, "explained variance limit in warm-up: anti-correlated is fine at init")
    ev_early: float = _t(-0.2, "explained variance limit early: some learning expected")
    ev_mid: float = _t(0.0, "explained variance limit mid-training: better than a constant")
    ev_late: float = _t(0.1, "explained variance limit late: the critic must be useful")
    phase_warmup_end: float = _t(0.10, "fraction of planned updates that ends warm-up")
    phase_early_end: float = _t(0.25, "fraction of planned updates that ends the early phase")
    phase_mid_end: float = _t(0.75, "fraction of planned updates that ends the mid phase")
    ev_patience: int = _t(2, "consecutive updates below the phase limit before ev_low fires")
    value_std_collapse_ratio: float = _t(
        0.05, "std(values)/std(returns) below this: the critic predicts a constant (value_collapse)"
    )
    value_loss_relative_factor: float = _t(
        20.0, "value loss above this multiple of its rolling median is value_collapse (critic blown)"
    )
    value_baseline_window: int = _t(20, "updates in the rolling value-loss baseline (median)")
    value_returns_std_min: float = _t(
        1e-6, "value_collapse's std rule needs returns that vary: return std above this"
    )
    value_std_drop_fraction: float = _t(
        0.2,
        "value_collapse's std rule also needs std(values) below this fraction of its recent median: "
        "a solved task's critic rightly predicts ~one value while rare failures inflate std(returns)",
    )
    value_std_tracking_min: float = _t(
        0.25,
        "value_collapse's std rule also needs that recent median to have been at least this fraction "
        "of std(returns): a feed-forward Acrobot agent that learnt nothing (return -500 throughout) "
        "held a critic spread of 0.05-1.1 against a return std of 3.6 (median ratio 0.13) and was "
        "judged collapsed; healthy critics of the demo and the two-head Acrobot agent hold 0.4-0.9",
    )
    value_std_constant_fraction: float = _t(
        1e-3,
        "value_collapse without the tracking condition: std(values) at or below this fraction of its "
        "recent median is a critic whose output is one constant (zeroed head, dead units); a critic "
        "that learnt little still spreads its predictions within ~10x of its median from update to update",
    )
    value_collapse_critical_updates: int = _t(
        2,
        "a flat critic (not a constant output) is critical once flat this many updates in a row: a "
        "healthy feed-forward Acrobot critic on unnormalised returns dipped to 0.02x the return std for "
        "one update, twice in 30 updates, and recovered; a zeroed critic stays flat for 5+ updates",
    )
    ev_return_cv_min: float = _t(
        0.05,
        "ev_low is not judged when the returns' spread (std, or the inter-decile range / 2.563 when "
        "smaller) < this x |mean(returns)|: EV of nearly constant returns is noise. The solved demo "
        "(seeds 1, 2) fired ev_low 5 times in 2 x 300 updates on returns whose bulk spread was 1-3% "
        "of the mean (one failed episode making the std); a recurrent Acrobot agent failing every "
        "episode alike (returns within 3.1% of their mean, the critic blind to the time limit) fired "
        "in 2 of 3 seeds; 0.01 on the std alone let all of them through",
    )
    baseline_min_updates: int = _t(
        5,
        "rolling baselines (KL, value loss, gradient and LSTM norms, entropy) give no relative "
        "verdict before this many updates",
    )
    # ---- gradients (relative to max_grad_norm) -----------------------------------------------
    grad_hist_edges: tuple[float, ...] = _t(
        (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        "edges of the |g| magnitude histogram (log-spaced; plus a zero bin and an overflow bin)",
    )
    grad_vanishing_rel: float = _t(
        1e-5, "a parameter whose grad norm is below this x max_grad_norm counts as vanishing"
    )
    grad_exploding_rel: float = _t(
        10.0, "a parameter whose grad norm exceeds this x max_grad_norm counts as exploding"
    )
    grad_total_vanishing_rel: float = _t(
        1e-4, "pre-clip total norm below this x max_grad_norm: gradient_vanishing"
    )
    grad_total_exploding_rel: float = _t(
        10.0, "pre-clip total norm above this x max_grad_norm: gradient_exploding (warning)"
    )
    grad_total_exploding_critical_rel: float = _t(
        100.0, "pre-clip total norm above this x max_grad_norm: gradient_exploding (critical)"
    )
    grad_vanishing_param_fraction: float = _t(
        0.5, "more than this fraction of parameters vanishing: gradient_vanishing"
    )
    grad_total_relative_factor: float = _t(
        10.0,
        "gradient_exploding also needs the pre-clip norm above this multiple of its rolling median: "
        "with unnormalised returns healthy runs sit at 60-300x max_grad_norm, but never jump >6x",
    )
    grad_baseline_window: int = _t(20, "updates in the rolling pre-clip gradient norm baseline (median)")
    clip_rate_warning: float = _t(
        0.9, "share of minibatches clipped above this is shown yellow: the cap limits learning"
    )
    grad_ema_momentum: float = _t(0.99, "EMA momentum of gradient drift tracking (reference)")
    grad_drift: float = _t(
        3.0,
        "|x - ema| / ema above this (for grad_drift_patience updates) is gradient_drift. The reference's "
        "0.5 flagged ~55 of 300 healthy demo updates; 2.0 (patience 3) still fired 2 onsets per healthy "
        "demo run (seeds 1, 2: updates 24-36, where the pre-clip norm rises 6x while the EMA of momentum "
        "0.99 still remembers update 1: drift 2-4.3); a reward scale changed 30x mid-run (a real small "
        "PPO) drifts 13-39 for the 7 updates after it",
    )
    grad_drift_patience: int = _t(
        4,
        "consecutive updates of drift above grad_drift before gradient_drift fires: in 3 healthy demo "
        "runs x 300 updates the drift stayed above 3 for 3 updates once (seed 3, 158-160, a 5x burst of "
        "the norm that settled), never for 4",
    )
    grad_drift_warmup: int = _t(10, "no drift verdict before this many updates")
    # ---- LSTM -----------------------------------------------------------------------------------
    lstm_norm_max: float = _t(100.0, "h or c L2 norm above this: state explosion (reference)")
    lstm_norm_min: float = _t(1e-6, "h L2 norm below this: state vanished (reference)")
    lstm_c_max_abs: float = _t(
        50.0, "|c| above this: cell state drifting without bound (tanh(c) saturated long before)"
    )
    lstm_gate_eps: float = _t(0.01, "a gate within this of 0 or 1 counts as saturated")
    lstm_gate_saturation_warning: float = _t(
        0.5,
        "more than this fraction of gates saturated is shown yellow, and is lstm_unhealthy (warning) when "
        "it also jumped lstm_gate_saturation_jump above the run's own recent level",
    )
    lstm_gate_saturation_jump: float = _t(
        0.2,
        "... the jump: the share of saturated gates above the median of its last lstm_baseline_window "
        "unflagged updates. A converging LSTM saturates its gates slowly (the healthy demo: 0.45 -> 0.71 "
        "over 1,900 updates, never more than 0.12 above that median, but above 0.5 on and off from update "
        "514 on: nine flapping warnings and one lasting 1,300 updates); a broken one jumps",
    )
    lstm_gate_saturation_critical: float = _t(
        0.9, "more than this fraction of gates saturated: lstm_unhealthy (gradients cannot flow)"
    )
    lstm_gate_sample: int = _t(64, "rows of the batch used for gate saturation at NORMAL (DEBUG uses all)")
    lstm_relative_factor: float = _t(
        4.0,
        "lstm_unhealthy's state explosion also needs the h/c L2 norm above this multiple of its recent "
        "level (median of the last baseline_min_updates norms): a healthy counting LSTM grows its "
        "state ~8% per update, the demo's lstm-explosion jumps ~8x in one update",
    )
    lstm_spread_k: float = _t(
        5.0,
        "... and its log-norm more than this many robust sigmas (1.4826 x MAD) of its own recent "
        "update-to-update log changes above that level: a bursty healthy LSTM (c norm 77 -> 250 in "
        "one update while its return improved) is judged against its own burstiness",
    )
    lstm_baseline_window: int = _t(
        20, "updates in the rolling LSTM state log-norm baselines (the spread of their update-to-update changes)"
    )
    # ---- advantages -------------------------------------------------------------------------------
    adv_skew_warning: float = _t(3.0, "|skew| of raw advantages above this is shown yellow: outliers")
    adv_kurtosis_warning: float = _t(
        20.0, "excess kurtosis of raw advantages above this is shown yellow: heavy tails dominate"
    )
    adv_std_min: float = _t(1e-8, "raw advantage std below this: normalisation divides by ~0")
    # ---- returns ----------------------------------------------------------------------------------
    perf_warmup_fraction: float = _t(
        0.1, "performance_degradation is not judged in the first 10% of training (reference)"
    )
    perf_drop: float = _t(
        0.5, "mean return this fraction below its best rolling mean: performance_degradation"
    )
    perf_window: int = _t(10, "updates in the rolling mean of episode returns")
    # ---- distributed ------------------------------------------------------------------------------
    rank_divergence: float = _t(
        5.0,
        "a rank whose grad norm, KL, entropy or value loss lies more than this many robust sigmas "
        "(1.4826 x MAD, at least the typical cross-rank MAD of recent updates) from the rank median "
        "diverges; with 2 ranks the pair's half-spread is judged against its recent level. 3 flagged "
        "4-10% of updates of simulated healthy 4-8 rank runs, 5 about 1% (before patience)",
    )
    rank_divergence_min_rel: float = _t(
        0.25,
        "a divergent rank must also differ from the rank median by more than this fraction of it: "
        "ranks within 25% agree, however tight their usual spread (identical DDP gradients)",
    )
    rank_divergence_patience: int = _t(
        2,
        "consecutive updates a rank must stay that far on one statistic before rank_divergence fires "
        "(a broken rank stays broken; one-off noise does not); NaN/inf fire at once",
    )
    rank_baseline_window: int = _t(
        20, "updates in each statistic's rolling typical cross-rank spread (median of per-update MADs)"
    )
    rank_straggler: float = _t(
        1.5,
        "a rank whose rollout time (the part of an update without collectives; else its update time) "
        "exceeds this multiple of the other ranks' median straggles",
    )
    rank_straggler_min_seconds: float = _t(
        0.05, "a straggler must also be this many seconds slower: smaller gaps are scheduling noise"
    )
    rank_straggler_patience: int = _t(
        2,
        "consecutive slow updates before a rank is a straggler: one-off pauses (GC, a checkpoint) "
        "are not; 4 ranks on 2 loaded cores had single 2x rollouts in 1 of 4 updates",
    )
    # ---- continuous (Gaussian) heads: log-std and action saturation --------------------------------
    std_collapse_log_std: float = _t(
        -3.5, "a continuous head whose smallest log-std is below this (std 0.03) is nearly deterministic"
    )
    std_collapse_log_std_critical: float = _t(
        -5.0, "... below this (std 0.007) it is deterministic at any usual action scale: critical"
    )
    std_drop: float = _t(
        1.0, "a head's mean log-std this many nats below its recent median (std x0.37): std_collapse"
    )
    std_drop_critical: float = _t(2.0, "... this many nats below it (std x0.14): critical")
    std_fall_step: float = _t(
        0.015,
        "an update whose mean log-std is this many nats below the previous one's counts as a fall: "
        "healthy CleanRL-continuous runs (Pendulum, InvertedPendulum; 80 Adam steps per update) made at "
        "most 1 such fall in a row once past warm-up, a wrong-sign entropy term of -1 made 3 by the "
        "second update",
    )
    std_fall_updates: int = _t(3, "falls in a row (and std_slide_drop below the median) that make a slide")
    std_slide_drop: float = _t(
        0.05, "a slide is a std_collapse warning once this many nats below the median (healthy: <= 0.059 "
        "below it, never while sliding)"
    )
    std_explosion_log_std: float = _t(
        2.0, "a continuous head whose largest log-std is above this (std 7.4) is mostly noise: warning"
    )
    std_explosion_log_std_critical: float = _t(4.0, "... above this (std 55): critical")
    std_rise: float = _t(
        1.0, "a head's mean log-std this many nats above its recent median (std x2.7): std_explosion"
    )
    std_rise_critical: float = _t(2.0, "... this many nats above it (std x7.4): critical")
    std_baseline_window: int = _t(20, "updates in each head's rolling median of its mean log-std")
    action_saturation_warning: float = _t(
        0.5, "share of a head's worst dimension's actions beyond the bounds (pre-clip) for a warning"
    )
    action_saturation_critical: float = _t(0.9, "... for a critical action_saturation")
    action_saturation_jump: float = _t(
        0.25,
        "the share must also exceed the head's recent median by this much: healthy control can ride "
        "its bounds (bang-bang torque), a jump to them is a new condition",
    )
    action_saturation_baseline_window: int = _t(20, "updates in each head's rolling median of its saturation")
    # ---- ratio outliers (DEBUG) -----------------------------------------------------------------
    outlier_top_k: int = _t(8, "worst samples per head listed in the ratio-outlier diagnostic")
    # ---- per-layer gradient table and gradient conflict (DEBUG) ------------------------------------
    grad_small_rel: float = _t(
        2e-6,
        "per-layer table: a gradient element with 0 < |g| below this x max_grad_norm is 'small' "
        "(1e-6 at the usual cap 0.5, the reference system's limit)",
    )
    grad_large_rel: float = _t(
        1.0,
        "per-layer table: a gradient element above this x max_grad_norm is 'large': "
        "that one element alone exceeds the whole clipping budget",
    )
    grad_conflict_cosine: float = _t(
        -0.1,
        "cosine of two loss terms' gradients on shared parameters below this is shown as conflict: "
        "the terms pull the shared trunk in opposing directions",
    )
    # ---- incidents (what the operator is told) -----------------------------------------------------
    incident_clear_updates: int = _t(
        3,
        "an incident clears after this many updates in a row without a judgement of its kind and "
        "scope: an intermittent condition stays one incident instead of flapping",
    )
    incident_group_updates: int = _t(
        1,
        "incidents opening within this many updates of each other are one group, headed by the most "
        "upstream signal (one cause, one alarm)",
    )
    incident_cleared_display_updates: int = _t(
        10, "a panel says 'cleared at S' for this many updates after its incident cleared"
    )

    def entropy_limit(self, head: str) -> float:
        """The collapse limit for one head (its override, else the common one)."""
        return self.entropy_collapse_per_head.get(head, self.entropy_collapse)

    def ev_limit(self, phase: Phase) -> float:
        return {
            Phase.WARMUP: self.ev_warmup,
            Phase.EARLY: self.ev_early,
            Phase.MID: self.ev_mid,
            Phase.LATE: self.ev_late,
        }[phase]

    def validate(self) -> Thresholds:
        """Raise ValueError naming the field when a value is meaningless; return self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"Thresholds.{f.name} must be finite, got {value!r}")
        edges = self.grad_hist_edges
        if len(edges) < 7 or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] <= 0:
            raise ValueError("Thresholds.grad_hist_edges must be >= 7 increasing positive edges")
        if not (0 < self.phase_warmup_end < self.phase_early_end < self.phase_mid_end < 1):
            raise ValueError("Thresholds phase boundaries must satisfy 0 < warmup < early < mid < 1")
        if self.entropy_patience < 1 or self.ev_patience < 1:
            raise ValueError("Thresholds.entropy_patience and ev_patience must be >= 1")
        if not 0 < self.grad_ema_momentum < 1:
            raise ValueError("Thresholds.grad_ema_momentum must lie in (0, 1)")
        if self.incident_clear_updates < 1 or self.incident_group_updates < 0:
            raise ValueError("Thresholds.incident_clear_updates must be >= 1, incident_group_updates >= 0")
        return self


def threshold_reasons() -> dict[str, str]:
    """Field name -> its one-line reason, in declaration order (for help and thresholds screens)."""
    return {f.name: f.metadata.get("why", "") for f in dataclasses.fields(Thresholds)}


def phase_of(step: int, total_updates: int | None, thresholds: Thresholds) -> Phase:
    """Phase by progress; with no plan known the run is treated as mid-training after warm-up."""
    if not total_updates or total_updates <= 0:
        return Phase.MID
    progress = step / total_updates
    if progress < thresholds.phase_warmup_end:
        return Phase.WARMUP
    if progress < thresholds.phase_early_end:
        return Phase.EARLY
    if progress < thresholds.phase_mid_end:
        return Phase.MID
    return Phase.LATE


# Updates of automatic DEBUG after each anomaly kind (its spec's): severe, rare events get long
# captures; noisy, mild ones short ones.
DEFAULT_ESCALATION_UPDATES: dict[str, int] = {k: s.escalation_updates for k, s in SPECS.items()}


@dataclass
class TelemetryConfig:
    """What the trainer measures and how it escalates.

    The effective level is, by priority: an operator's manual override (a DEBUG lease or a set
    level, both applied by commands at update boundaries), then an active automatic escalation,
    then ``level``. :meth:`effective` returns it with the reason the snapshot shows.
    """

    level: TelemetryLevel = TelemetryLevel.NORMAL
    auto_escalate: bool = True
    escalate_to: TelemetryLevel = TelemetryLevel.DEBUG
    escalation_updates: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_ESCALATION_UPDATES))
    thresholds: Thresholds = field(default_factory=Thresholds)
    # Manual override, set by commands: (level, until_step or None for "until changed", reason).
    override_level: TelemetryLevel | None = None
    override_until: int | None = None
    override_reason: str = ""
    # The DEBUG budget: automatic escalation may put at most this share of any window of
    # ``debug_budget_window`` updates at DEBUG (on a large model one DEBUG update costs seconds).
    # Operator leases are not limited, but their updates count in the share shown.
    debug_budget_share: float = 0.10
    debug_budget_window: int = 100
    # Automatic escalation state: kind -> step until which it holds.
    _escalations: dict[str, int] = field(default_factory=dict, repr=False)
    # The last ``debug_budget_window`` updates: (ran at DEBUG, of which by automatic escalation).
    _debug_window: deque[tuple[bool, bool]] = field(default_factory=deque, repr=False)
    escalations_refused: int = 0
    debug_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.level = TelemetryLevel.parse(self.level)
        self.escalate_to = TelemetryLevel.parse(self.escalate_to)
        if not 0.0 <= float(self.debug_budget_share) <= 1.0:
            raise ValueError(f"debug_budget_share must lie in [0, 1], got {self.debug_budget_share!r}")
        if int(self.debug_budget_window) < 1:
            raise ValueError(f"debug_budget_window must be >= 1, got {self.debug_budget_window!r}")
        self.debug_budget_share = float(self.debug_budget_share)
        self.debug_budget_window = int(self.debug_budget_window)
        self._debug_window = deque(self._debug_window, maxlen=self.debug_budget_window)
        unknown = set(self.escalation_updates) - set(ANOMALY_KINDS)
        if unknown:
            raise ValueError(f"escalation_updates names unknown anomaly kinds: {sorted(unknown)}")
        self.thresholds.validate()

    # -- manual override -------------------------------------------------------------------------
    def set_override(self, level: TelemetryLevel, *, until_step: int | None, reason: str) -> None:
        self.override_level = TelemetryLevel.parse(level)
        self.override_until = until_step
        self.override_reason = reason

    def clear_override(self) -> None:
        self.override_level = None
        self.override_until = None
        self.override_reason = ""

    # -- automatic escalation ------------------------------------------------------------------
    def escalate(self, kind: str, step: int) -> int | None:
        """Escalate for ``kind`` from ``step`` within the DEBUG budget; return the step it holds
        until, or None when disabled or refused (no budget left: counted in ``escalations_refused``).

        The kind's duration is cut to what the budget has left: updates already spent at automatic
        DEBUG in the current window, plus those still planned by other escalations, may not exceed
        ``debug_budget_share`` x ``debug_budget_window``.
        """
        if not self.auto_escalate:
            return None
        planned_until = max(self.active_escalations(step).values(), default=step)
        spent = sum(auto for _, auto in self._debug_window)
        room = int(self.debug_budget_share * self.debug_budget_window) - spent - (planned_until - step)
        until = min(step + self.escalation_updates.get(kind, 5), planned_until + max(0, room))
        if until <= step:
            self.escalations_refused += 1
            return None
        self._escalations[kind] = max(until, self._escalations.get(kind, until))
        return self._escalations[kind]

    def note_update(self, level: TelemetryLevel, reason: str, seconds: float) -> None:
        """Record the level an update ran at (the budget's window and the DEBUG cost shown)."""
        debug = level >= TelemetryLevel.DEBUG
        self._debug_window.append((debug, debug and reason.startswith("anomaly ")))
        if debug and math.isfinite(seconds):
            self.debug_seconds += seconds

    def debug_share(self) -> tuple[float, int]:
        """Share of the window's updates that ran at DEBUG (any cause), and the window's length."""
        n = len(self._debug_window)
        return (sum(d for d, _ in self._debug_window) / n if n else 0.0), n

    def active_escalations(self, step: int) -> dict[str, int]:
        """Kinds whose escalation still holds at ``step`` (expired ones are forgotten)."""
        for kind in [k for k, until in self._escalations.items() if until <= step]:
            del self._escalations[kind]
        return dict(self._escalations)

    def effective(self, step: int) -> tuple[TelemetryLevel, str]:
        """The level that applies to update ``step`` and the words that explain it."""
        if self.override_level is not None:
            if self.override_until is not None and step >= self.override_until:
                self.clear_override()
            else:
                return self.override_level, self.override_reason or "operator override"
        active = self.active_escalations(step)
        if self.auto_escalate and active and self.escalate_to > self.level:
            kind = max(active, key=lambda k: active[k])
            return self.escalate_to, f"anomaly {kind} until step {active[kind]}"
        return self.level, "configured"
