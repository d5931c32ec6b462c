"""Every rule of the detector at its limits: a value exactly at the limit, the next float below it
and the next float above it. A limit is a boundary, not a verdict: turning a rule's ``>`` into
``>=`` (or ``<`` into ``<=``) fails here. Limits are read from the default ``Thresholds`` and
computed with the rule's own arithmetic, so recalibrating a threshold keeps these tests meaningful.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from test_anomaly import CAP, HEADS, TOTAL, detector, healthy, kinds, warm

from telemetry_core.config import Thresholds
from telemetry_core.detection import CRITICAL, WARNING, AnomalyDetector
from telemetry_core.distributed import RankJudge
from telemetry_core.schema import ReturnStats, Snapshot

T = Thresholds()
RUN = ("run", None)


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def severity(found: list, kind: str, head: str | None = None) -> str | None:
    return kinds(found).get((kind, head))


def sides(limit: float, *, high: bool) -> list[tuple[float, bool]]:
    """(value, beyond the limit?) at the limit and on both sides; ``high``: beyond means above."""
    return [(limit, False), (below(limit), not high), (above(limit), high)]


# ------------------------------------------------------------------------------------------------
# numerical_instability: any non-finite count above 0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("nan", "fires"), [(0, False), (1, True)])
def test_numerical_instability_at_zero_bad_elements(nan: int, fires: bool) -> None:
    found = detector().check(healthy(150, gradients={"nan_count": nan}))
    assert (severity(found, "numerical_instability") == CRITICAL) is fires


# ------------------------------------------------------------------------------------------------
# entropy_collapse
# ------------------------------------------------------------------------------------------------
def _ent(step: int, direction: float) -> Snapshot:
    return healthy(step, policy={"entropy_normalized": {"direction": direction, "force": 0.82}})


@pytest.mark.parametrize(("e", "fires"), sides(T.entropy_collapse, high=False))
def test_entropy_collapse_limit(e: float, fires: bool) -> None:
    det = detector(entropy_drop_fraction=0.0)
    found = [det.check(_ent(s, e)) for s in range(1, 1 + T.entropy_patience)][-1]
    assert (severity(found, "entropy_collapse", "direction") is not None) is fires


@pytest.mark.parametrize(("e", "critical"), sides(T.entropy_critical_fraction * T.entropy_collapse, high=False))
def test_entropy_collapse_critical_limit(e: float, critical: bool) -> None:
    det = detector(entropy_drop_fraction=0.0)
    found = [det.check(_ent(s, e)) for s in range(1, 1 + T.entropy_patience)][-1]
    assert severity(found, "entropy_collapse", "direction") == (CRITICAL if critical else WARNING)


@pytest.mark.parametrize(("e", "clears"), sides(T.entropy_clear_factor * T.entropy_collapse, high=True))
def test_entropy_collapse_clears_above_its_hysteresis_limit(e: float, clears: bool) -> None:
    det = detector(entropy_drop_fraction=0.0)
    for s in range(1, 1 + T.entropy_patience):
        det.check(_ent(s, 0.05))
    found = det.check(_ent(10, e))
    assert (severity(found, "entropy_collapse", "direction") is None) is clears


@pytest.mark.parametrize(("e", "fires"), sides(T.entropy_drop_fraction * 0.62, high=False))
def test_entropy_drop_below_a_fraction_of_the_median(e: float, fires: bool) -> None:
    det = detector()
    step = warm(det, 12)  # direction entropy 0.62: the median
    assert (severity(det.check(_ent(step, e)), "entropy_collapse", "direction") == WARNING) is fires


@pytest.mark.parametrize(("e", "critical"), sides(T.entropy_slide_critical_fraction * 0.62, high=False))
def test_a_sustained_slide_is_critical_below_its_fraction_of_the_median(e: float, critical: bool) -> None:
    det = detector()
    step = warm(det, 12)
    for i in range(T.entropy_slide_critical_updates - 1):  # flagged, above the critical fraction
        assert severity(det.check(_ent(step + i, 0.25)), "entropy_collapse", "direction") == WARNING
    found = det.check(_ent(step + T.entropy_slide_critical_updates, e))
    assert severity(found, "entropy_collapse", "direction") == (CRITICAL if critical else WARNING)
    if critical:
        assert "flagged for 3 updates in a row" in found[0].message


def test_a_slide_needs_its_updates_in_a_row_to_be_critical() -> None:
    det = detector()
    step = warm(det, 12)
    low = below(T.entropy_slide_critical_fraction * 0.62)
    sev = [severity(det.check(_ent(step + i, low)), "entropy_collapse", "direction") for i in range(4)]
    assert sev == [WARNING] * (T.entropy_slide_critical_updates - 1) + [CRITICAL] * (
        5 - T.entropy_slide_critical_updates
    )


@pytest.mark.parametrize(
    ("flagged_before", "critical"),
    [(T.entropy_slide_critical_window - 1, True), (T.entropy_slide_critical_window, False)],
)
def test_a_slide_must_fall_within_its_window_to_be_critical(flagged_before: int, critical: bool) -> None:
    """The update that falls below the fraction is the ``flagged_before + 1``-th flagged one: at the
    window's last update it is critical, one later it is a slow decline (and stays a warning)."""
    det = detector()
    step = warm(det, 12)
    for i in range(flagged_before):
        assert severity(det.check(_ent(step + i, 0.25)), "entropy_collapse", "direction") == WARNING
    low = below(T.entropy_slide_critical_fraction * 0.62)
    found = det.check(_ent(step + flagged_before, low))
    assert severity(found, "entropy_collapse", "direction") == (CRITICAL if critical else WARNING)
    # Critical stays so while the alarm lasts, even back above the fraction; a warning stays one.
    found = det.check(_ent(step + flagged_before + 1, 0.25))
    assert severity(found, "entropy_collapse", "direction") == (CRITICAL if critical else WARNING)


# The spread rule on a head with a known, noisy history: its update-to-update changes have a robust
# sigma the rule measures itself; the boundary is computed with the rule's arithmetic.
NOISY = [0.80, 0.83, 0.79, 0.82, 0.81, 0.84, 0.80, 0.82, 0.81, 0.83]  # ends rising


def _spread_level(hist: list[float], top: float, falls: int) -> float:
    steps = [b - a for a, b in itertools.pairwise(hist)]
    centre = statistics.median(steps)
    sigma = 1.4826 * statistics.median(abs(d - centre) for d in steps)
    margin = max(T.entropy_spread_k * sigma * math.sqrt(falls), T.entropy_spread_min_fraction * statistics.median(hist))
    return top + falls * min(centre, 0.0) - margin


def _noisy(det: AnomalyDetector) -> int:
    for i, e in enumerate(NOISY):
        assert det.check(_force(200 + i, e)) == []
    return 200 + len(NOISY)


@pytest.mark.parametrize("side", ["at", "below"])
def test_entropy_spread_slide_limit(side: str) -> None:
    """Two falls in a row (the first small enough to enter the history), the second landing at or
    just below the spread rule's level: k robust sigmas x sqrt(2) (here above the minimum fraction)."""
    det = detector(entropy_drop_fraction=0.0, entropy_fall_fraction=0.0, entropy_throttled_fall_fraction=0.0)
    step = _noisy(det)
    first = 0.79
    assert det.check(_force(step, first)) == []  # one fall: not yet a slide
    hist = [*NOISY, first][-T.entropy_baseline_window :]
    level = _spread_level(hist, NOISY[-1], T.entropy_spread_updates)
    assert NOISY[-1] - level > T.entropy_spread_min_fraction * statistics.median(hist)  # sigma decides
    e = level if side == "at" else below(level)
    found = det.check(_force(step + 1, e))
    assert (severity(found, "entropy_collapse", "force") == WARNING) is (side == "below")


def test_entropy_spread_needs_its_falls_in_a_row() -> None:
    """One large fall is not a slide for this rule (the drop rules judge levels)."""
    det = detector(entropy_drop_fraction=0.0, entropy_fall_fraction=0.0, entropy_throttled_fall_fraction=0.0)
    step = _noisy(det)
    assert det.check(_force(step, 0.6)) == []


@pytest.mark.parametrize(("side", "counts"), [("at", False), ("above", True)])
def test_entropy_spread_fall_must_exceed_one_sigma(side: str, counts: bool) -> None:
    """A fall of exactly one robust sigma of the head's changes is a dither, not a fall: after one
    large drop it does not make a slide (a healthy demo head: 0.438 -> 0.348 -> 0.346)."""
    det = detector(entropy_drop_fraction=0.0, entropy_fall_fraction=0.0, entropy_throttled_fall_fraction=0.0)
    step = _noisy(det)
    first = 0.79
    assert det.check(_force(step, first)) == []
    hist = [*NOISY, first][-T.entropy_baseline_window :]
    steps = [b - a for a, b in itertools.pairwise(hist)]
    centre = statistics.median(steps)
    sigma = 1.4826 * statistics.median(abs(d - centre) for d in steps)
    e = first - sigma
    if side == "above":
        e = below(e)
    det.check(_force(step + 1, e))
    assert det.rules["entropy_collapse"].down["force"] == (2 if counts else 0)


def test_entropy_spread_slide_alone_stays_a_warning() -> None:
    """Falls beyond the head's own spread are a warning however many in a row (a feed-forward head's
    first learning slide from 0.98 looks like that); critical comes from the level: flagged for
    entropy_slide_critical_updates and below entropy_slide_critical_fraction of the median (0.82)."""
    det = detector(entropy_drop_fraction=0.0, entropy_fall_fraction=0.0, entropy_throttled_fall_fraction=0.0)
    step = _noisy(det)
    path = [0.79, 0.35, 0.3, 0.25, 0.15]
    sev = [severity(det.check(_force(step + i, e)), "entropy_collapse", "force") for i, e in enumerate(path)]
    assert T.entropy_slide_critical_fraction * 0.82 < 0.25 and T.entropy_slide_critical_fraction * 0.82 > 0.15
    assert sev == [None, WARNING, WARNING, WARNING, CRITICAL]


# The within-update rule: each update's normalised entropy per epoch (first and last decide).
def _epochs(step: int, first: float, last: float, coef: float | None = None) -> Snapshot:
    mean = (first + last) / 2
    return healthy(
        step,
        policy={
            "entropy_normalized": {"direction": 0.62, "force": mean},
            "entropy_normalized_per_epoch": {"force": [first, (first + last) / 2, last]},
            "entropy_coef": coef,
        },
    )


SHARP_HIST = [-0.01, 0.005, -0.02, 0.0, -0.015, 0.01, -0.005, -0.01, 0.0, -0.02]  # within-update changes


def _sharp_warm(det: AnomalyDetector) -> tuple[int, float]:
    """Feed the history; return the next step and the rule's allowed change (its own arithmetic)."""
    for i, d in enumerate(SHARP_HIST):
        assert det.check(_epochs(300 + i, 0.8, 0.8 * (1 + d))) == []
    centre = statistics.median(SHARP_HIST)
    sigma = 1.4826 * statistics.median(abs(d - centre) for d in SHARP_HIST)
    return 300 + len(SHARP_HIST), min(-T.entropy_sharpen_fraction, centre - T.entropy_sharpen_k * sigma)


def _no_level_rules() -> dict[str, float]:
    return {"entropy_drop_fraction": 0.0, "entropy_fall_fraction": 0.0, "entropy_throttled_fall_fraction": 0.0}


@pytest.mark.parametrize("side", ["at", "below", "above"])
def test_entropy_sharpening_within_the_update_limit(side: str) -> None:
    """entropy_sharpen_updates updates in a row whose last epoch is below first x (1 + allowed)
    warn; at the limit (or above) they are not sharpening. The value is the last epoch's entropy,
    the limit the level it had to fall below."""
    det = detector(**_no_level_rules())
    step, allowed = _sharp_warm(det)
    first = 0.8
    level = first * (1 + allowed)
    last = {"at": level, "below": below(level), "above": above(level)}[side]
    sev = [
        severity(det.check(_epochs(step + i, first, last)), "entropy_collapse", "force")
        for i in range(T.entropy_sharpen_updates)
    ]
    fires = side == "below"
    assert sev == [None] * (T.entropy_sharpen_updates - 1) + [WARNING if fires else None]
    if fires:
        (a,) = [a for a in det.check(_epochs(step + 9, first, last)) if a.kind == "entropy_collapse"]
        assert a.value == last and a.threshold == pytest.approx(level)
        assert "within the update" in a.message and "first epoch" in a.message


def test_entropy_sharpening_turns_critical_after_its_critical_updates() -> None:
    det = detector(**_no_level_rules())
    step, allowed = _sharp_warm(det)
    last = 0.8 * (1 + allowed) * 0.99
    n = T.entropy_sharpen_critical_updates
    sev = [severity(det.check(_epochs(step + i, 0.8, last)), "entropy_collapse", "force") for i in range(n + 1)]
    w = T.entropy_sharpen_updates
    assert sev == [None] * (w - 1) + [WARNING] * (n - w) + [CRITICAL, CRITICAL]


def test_entropy_sharpening_needs_two_epochs_and_a_history() -> None:
    det = detector(**_no_level_rules())
    for i in range(T.entropy_sharpen_updates + 1):  # no history yet: no verdict, however steep
        assert severity(det.check(_epochs(300 + i, 0.8, 0.4)), "entropy_collapse", "force") is None
    det = detector(**_no_level_rules())
    step, _ = _sharp_warm(det)
    one = healthy(step, policy={"entropy_normalized_per_epoch": {"force": [0.4]}})
    assert severity(det.check(one), "entropy_collapse", "force") is None


@pytest.mark.parametrize(("coef", "fires"), sides(T.entropy_coef_min, high=False))
def test_entropy_coefficient_limit(coef: float, fires: bool) -> None:
    """A reported entropy coefficient below entropy_coef_min is critical for the run at once; at the
    limit (0: no bonus) it is not. While it is, a head's collapsing warning is critical."""
    det = detector()
    found = det.check(_epochs(150, 0.8, 0.8, coef))
    assert (severity(found, "entropy_collapse") == CRITICAL) is fires
    assert severity(det.check(_epochs(151, 0.8, 0.8, None)), "entropy_collapse") is None  # not reported


def test_a_wrong_sign_coefficient_makes_a_head_alarm_critical() -> None:
    det = detector(**_no_level_rules())
    step, allowed = _sharp_warm(det)
    last = 0.8 * (1 + allowed) * 0.99
    sev = [
        severity(det.check(_epochs(step + i, 0.8, last, -0.5)), "entropy_collapse", "force")
        for i in range(T.entropy_sharpen_updates)
    ]
    assert sev == [None] * (T.entropy_sharpen_updates - 1) + [CRITICAL]


@pytest.mark.parametrize(("fraction_side", "fires"), [("at", False), ("below", True)])
def test_entropy_spread_min_fraction_limit(fraction_side: str, fires: bool) -> None:
    """A flat history has no spread: the minimum fraction of the median is the limit."""
    det = detector(
        entropy_drop_fraction=0.0,
        entropy_fall_fraction=0.0,
        entropy_throttled_fall_fraction=0.0,
        entropy_fall_step=1.0,
        entropy_throttled_fall_step=1.0,
    )
    step = warm(det, 12)  # force 0.82 throughout: sigma 0
    first = 0.81
    assert det.check(_force(step, first)) == []
    hist = ([0.82] * 12 + [first])[-T.entropy_baseline_window :]
    level = 0.82 - T.entropy_spread_min_fraction * statistics.median(hist)
    e = level if fraction_side == "at" else below(level)
    assert (severity(det.check(_force(step + 1, e)), "entropy_collapse", "force") == WARNING) is fires


def _force(step: int, force: float, stopped: bool = False) -> Snapshot:
    return healthy(step, policy={"entropy_normalized": {"direction": 0.62, "force": force}, "early_stopped": stopped})


@pytest.mark.parametrize(("stopped", "fraction"), [(False, T.entropy_fall_fraction), (True, T.entropy_throttled_fall_fraction)])
@pytest.mark.parametrize("side", ["at", "below"])
def test_entropy_slide_fraction_limits(stopped: bool, fraction: float, side: str) -> None:
    """Three falls from a median of 0.82, the third landing at (or just below) the fraction of it;
    without early stops the fast-fall rule, with them the pushed-down rule."""
    det = detector(entropy_spread_updates=1000)  # a flat history has no spread: this rule alone
    step = warm(det, 12)  # force entropy 0.82: the median
    limit = fraction * 0.82
    path = [0.7, 0.6] if not stopped else [0.77, 0.72]
    for i, e in enumerate(path):
        assert det.check(_force(step + i, e, stopped)) == []
    e = limit if side == "at" else below(limit)
    found = det.check(_force(step + 2, e, stopped))
    assert (severity(found, "entropy_collapse", "force") == WARNING) is (side == "below")


@pytest.mark.parametrize(("stopped", "fall"), [(False, T.entropy_fall_step), (True, T.entropy_throttled_fall_step)])
@pytest.mark.parametrize("side", ["at", "below"])
def test_entropy_fall_step_limits(stopped: bool, fall: float, side: str) -> None:
    """The third update falls by exactly the fall step (not a fall: the slide ends) or just more."""
    det = detector(entropy_spread_updates=1000)  # a flat history has no spread: this rule alone
    step = warm(det, 12)
    path = [0.65, 0.55] if not stopped else [0.72, 0.68]
    for i, e in enumerate(path):
        assert det.check(_force(step + i, e, stopped)) == []
    limit = (1.0 - fall) * path[-1]
    e = limit if side == "at" else below(limit)
    found = det.check(_force(step + 2, e, stopped))
    assert (severity(found, "entropy_collapse", "force") == WARNING) is (side == "below")


# ------------------------------------------------------------------------------------------------
# kl_spike
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("limit", "sev_at", "sev_above"),
    [(T.kl_spike_warning, None, WARNING), (T.kl_spike_critical, WARNING, CRITICAL)],
)
def test_kl_spike_absolute_limits(limit: float, sev_at: str | None, sev_above: str) -> None:
    for kl, want in ((limit, sev_at), (below(limit), sev_at), (above(limit), sev_above)):
        assert severity(detector().check(healthy(1, policy={"kl_k3_mean": kl})), "kl_spike") == want


@pytest.mark.parametrize(("kl", "fires"), sides(T.kl_relative_factor * 0.009, high=True))
def test_kl_spike_relative_limit(kl: float, fires: bool) -> None:
    det = detector()
    step = warm(det, 10)  # KL 0.009 each update: the median
    assert (severity(det.check(healthy(step, policy={"kl_k3_mean": kl})), "kl_spike") == WARNING) is fires


# ------------------------------------------------------------------------------------------------
# ratio_explosion / ratio_collapse: the mass of samples beyond the limit
# ------------------------------------------------------------------------------------------------
LIMITS = [T.ratio_explosion, T.ratio_explosion_critical, T.ratio_collapse, T.ratio_collapse_critical]


def _tail(n: int, above_: int = 0, above_crit: int = 0, below_: int = 0, below_crit: int = 0) -> Snapshot:
    return healthy(
        150,
        policy={
            "samples": n,
            "ratio_above": above_,
            "ratio_above_critical": above_crit,
            "ratio_below": below_,
            "ratio_below_critical": below_crit,
            "ratio_tail_limits": list(LIMITS),
            "ratio_max": 60.0 if above_ or above_crit else 2.1,
            "ratio_min": 1e-4 if below_ or below_crit else 0.4,
        },
    )


def _counts(n: int, share: float) -> tuple[int, int, int]:
    """(at, just below, just above) the largest count of n samples that is still noise."""
    limit = max(float(T.ratio_tail_min_samples), share * n)
    assert limit == int(limit), "choose n so that the limit is a whole number of samples"
    return int(limit), int(limit) - 1, int(limit) + 1


@pytest.mark.parametrize("n", [20_000, 1_000])  # the share decides; the minimum count decides
@pytest.mark.parametrize(("kind", "field"), [("ratio_explosion", "above_"), ("ratio_collapse", "below_")])
def test_ratio_tail_warning_limit(n: int, kind: str, field: str) -> None:
    at, under, over = _counts(n, T.ratio_tail_share)
    for c, want in ((at, None), (under, None), (over, WARNING)):
        found = detector().check(_tail(n, **{field: c}))
        assert severity(found, kind) == want, (n, c)
    (a,) = detector().check(_tail(n, **{field: over}))
    assert a.value == pytest.approx(over / n) and a.threshold == pytest.approx(at / n)
    assert f"{over} of {n} samples" in a.message


@pytest.mark.parametrize(("kind", "field"), [("ratio_explosion", "above_"), ("ratio_collapse", "below_")])
def test_ratio_tail_critical_limits(kind: str, field: str) -> None:
    n = 20_000
    at, under, over = _counts(n, T.ratio_tail_share)
    crit = field.replace("_", "_crit")
    for c, want in ((at, WARNING), (under, WARNING), (over, CRITICAL)):  # beyond the critical limit
        found = detector().check(_tail(n, **{field: over, crit: c}))
        assert severity(found, kind) == want, c
    at, under, over = _counts(n, T.ratio_tail_share_critical)  # a large share beyond the warning limit
    for c, want in ((at, WARNING), (under, WARNING), (over, CRITICAL)):
        assert severity(detector().check(_tail(n, **{field: c})), kind) == want, c
    # a small (early-stopped) update: the minimum count beyond the critical limit decides
    n, m = 512, T.ratio_tail_critical_min_samples
    assert m > T.ratio_tail_share * n
    for c, want in ((m, WARNING), (m - 1, WARNING), (m + 1, CRITICAL)):
        found = detector().check(_tail(n, **{field: m + 1, crit: c}))
        assert severity(found, kind) == want, c


def test_ratio_tail_of_other_limits_falls_back_to_a_warning_on_the_extreme() -> None:
    """Counts against limits that are not this detector's (or none at all, an older recording)
    cannot be judged by mass: the extreme alone warns, never critical."""
    snap = healthy(150, policy={"ratio_max": 1e3, "ratio_min": 1e-6, "samples": 20_000})
    found = detector().check(snap)
    assert kinds(found) == {("ratio_explosion", None): WARNING, ("ratio_collapse", None): WARNING}
    for r, fires in sides(T.ratio_explosion, high=True):
        assert (severity(detector().check(healthy(1, policy={"ratio_max": r})), "ratio_explosion") is not None) is fires
    for r, fires in sides(T.ratio_collapse, high=False):
        assert (severity(detector().check(healthy(1, policy={"ratio_min": r})), "ratio_collapse") is not None) is fires


# ------------------------------------------------------------------------------------------------
# value_collapse / ev_low
# ------------------------------------------------------------------------------------------------
def test_value_collapse_tracking_limit() -> None:
    """The critic's recent spread must have been at least value_std_tracking_min x the return std:
    a median of 0.5 against a return std of 2.0 is exactly the limit. The collapsed spread (0.05)
    is flat against the returns and the median but not a constant output."""
    assert T.value_std_tracking_min * 2.0 == 0.5
    assert T.value_std_constant_fraction * 0.5 < 0.05
    for median, fires in ((0.5, True), (below(0.5), False), (above(0.5), True)):
        det = detector()
        for step in range(100, 110):
            det.check(healthy(step, value={"value_std": median, "return_std": 2.0}))
        found = det.check(healthy(110, value={"value_std": 0.05, "return_std": 2.0}))
        assert (severity(found, "value_collapse") == WARNING) is fires, median
        # flat (not constant) for value_collapse_critical_updates updates in a row: critical
        for i in range(1, T.value_collapse_critical_updates):
            found = det.check(healthy(110 + i, value={"value_std": 0.05, "return_std": 2.0}))
        assert (severity(found, "value_collapse") == CRITICAL) is fires, median


def test_value_collapse_constant_output_limit() -> None:
    """A critic that never tracked the returns (median 0.25 against a return std of 2.0, half the
    tracking limit) is still judged collapsed when its output becomes a constant: std(values) at
    value_std_constant_fraction x its median fires, just above does not."""
    median = 0.25
    assert median < T.value_std_tracking_min * 2.0
    at = T.value_std_constant_fraction * median
    for vstd, fires in ((at, True), (below(at), True), (above(at), False), (0.0, True)):
        det = detector()
        for step in range(100, 110):
            det.check(healthy(step, value={"value_std": median, "return_std": 2.0}))
        found = det.check(healthy(110, value={"value_std": vstd, "return_std": 2.0}))
        assert (severity(found, "value_collapse") == CRITICAL) is fires, vstd


def test_value_collapse_std_ratio_limit() -> None:
    rstd = 2.0  # value std = limit x 2.0 is exact in binary, so value_std / return_std is the limit
    at = T.value_std_collapse_ratio * rstd
    assert at / rstd == T.value_std_collapse_ratio
    for vstd, fires in ((at, False), (below(at), True)):
        det = detector()
        step = warm(det, 10)
        found = det.check(healthy(step, value={"value_std": vstd, "return_std": rstd}))
        assert (severity(found, "value_collapse") == WARNING) is fires, vstd


@pytest.mark.parametrize(("loss", "fires"), sides(T.value_loss_relative_factor * 0.25, high=True))
def test_value_loss_relative_limit(loss: float, fires: bool) -> None:
    det = detector()
    for step in range(100, 110):
        det.check(healthy(step, value={"value_loss": 0.25}))
    found = det.check(healthy(110, value={"value_loss": loss, "return_std": 1.0}))
    assert (severity(found, "value_collapse") == WARNING) is fires


@pytest.mark.parametrize(("rstd", "fires"), sides(T.value_returns_std_min, high=True))
def test_value_collapse_needs_returns_that_vary(rstd: float, fires: bool) -> None:
    det = detector()
    step = warm(det, 10)
    found = det.check(healthy(step, value={"value_std": 0.0, "return_std": rstd}))
    assert (severity(found, "value_collapse") == CRITICAL) is fires


@pytest.mark.parametrize(("rstd", "fires"), sides(2.5, high=False))
def test_value_loss_must_also_exceed_the_returns_variance(rstd: float, fires: bool) -> None:
    """A loss of 6.25 (25x its median 0.25) against returns whose variance is exactly 6.25."""
    det = detector()
    for step in range(100, 110):
        det.check(healthy(step, value={"value_loss": 0.25}))
    found = det.check(healthy(110, value={"value_loss": 6.25, "return_std": rstd}))
    assert (severity(found, "value_collapse") == WARNING) is fires


@pytest.mark.parametrize(
    ("rstd", "judged"),
    [
        (T.ev_return_cv_min * 10.0, True),
        (below(T.ev_return_cv_min * 10.0), False),
        (above(T.ev_return_cv_min * 10.0), True),
    ],
)
def test_ev_is_judged_only_when_the_returns_vary_enough(rstd: float, judged: bool) -> None:
    """Returns of mean 10: a spread of exactly ev_return_cv_min x 10 is still judged."""
    det = detector()
    flat = {"returns": ReturnStats(count=1024, mean=10.0, std=rstd)}  # percentiles not measured
    found = [
        det.check(healthy(150 + i, value={"explained_variance": -0.5}, advantage=flat))
        for i in range(T.ev_patience)
    ][-1]
    assert (severity(found, "ev_low") == WARNING) is judged


@pytest.mark.parametrize(("ev", "fires"), sides(T.ev_mid, high=False))
def test_ev_low_limit(ev: float, fires: bool) -> None:
    det = detector()
    found = [det.check(healthy(150 + i, value={"explained_variance": ev})) for i in range(T.ev_patience)][-1]
    assert (severity(found, "ev_low") == WARNING) is fires


def test_ev_low_names_every_phase_limit_of_its_streak() -> None:
    """Updates 224 (mid: limit 0) and 225 (late: limit 0.1) of 300: one streak, two limits."""
    det = detector()
    assert det.check(healthy(224, value={"explained_variance": -0.05})) == []
    (a,) = det.check(healthy(225, value={"explained_variance": -0.05}))
    assert "limits 0 (mid), 0.1 (late)" in a.message and "(the late limit)" not in a.message
    (a,) = detector(ev_patience=1).check(healthy(225, value={"explained_variance": -0.05}))
    assert "below 0.1 (the late limit) for 1 updates" in a.message


# ------------------------------------------------------------------------------------------------
# gradient_exploding / gradient_vanishing / gradient_drift
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tn", "fires"), sides(T.grad_total_exploding_rel * CAP, high=True))
def test_gradient_exploding_warning_limit(tn: float, fires: bool) -> None:
    det = detector()
    for step in range(1, 6):
        det.check(healthy(step, gradients={"total_norm": 0.4}))  # median 0.4: the jump holds above 4
    found = det.check(healthy(6, gradients={"total_norm": tn}))
    assert (severity(found, "gradient_exploding") == WARNING) is fires


@pytest.mark.parametrize(("tn", "fires"), sides(T.grad_total_exploding_critical_rel * CAP, high=True))
def test_gradient_exploding_without_a_baseline_warns_past_the_critical_limit(tn: float, fires: bool) -> None:
    found = detector().check(healthy(1, gradients={"total_norm": tn}))
    assert (severity(found, "gradient_exploding") == WARNING) is fires


@pytest.mark.parametrize(("tn", "critical"), sides(T.grad_total_exploding_critical_rel * CAP, high=True))
def test_gradient_exploding_critical_limit(tn: float, critical: bool) -> None:
    det = detector()
    step = warm(det, 5)  # median 1.0: the jump condition holds far below the critical limit
    found = det.check(healthy(step, gradients={"total_norm": tn}))
    assert severity(found, "gradient_exploding") == (CRITICAL if critical else WARNING)


@pytest.mark.parametrize(("tn", "fires"), sides(T.grad_total_relative_factor * 10.0, high=True))
def test_gradient_exploding_needs_its_jump(tn: float, fires: bool) -> None:
    det = detector()
    for step in range(1, 8):
        det.check(healthy(step, gradients={"total_norm": 10.0}))  # a run that always clips hard
    found = det.check(healthy(8, gradients={"total_norm": tn}))
    assert (severity(found, "gradient_exploding") == CRITICAL) is fires


@pytest.mark.parametrize(("tn", "fires"), sides(T.grad_total_vanishing_rel * CAP, high=False))
def test_gradient_vanishing_total_limit(tn: float, fires: bool) -> None:
    found = detector().check(healthy(1, gradients={"total_norm": tn}))
    assert (severity(found, "gradient_vanishing") == CRITICAL) is fires


def test_gradient_vanishing_param_fraction_limit() -> None:
    """6 of 12 tensors is exactly the 0.5 limit; 7 is above it (5 below)."""
    assert T.grad_vanishing_param_fraction == 6 / 12
    for n, fires in ((6, False), (5, False), (7, True)):
        found = detector().check(healthy(1, gradients={"vanishing_count": n}))
        assert (severity(found, "gradient_vanishing") == WARNING) is fires


@pytest.mark.parametrize(("drift", "fires"), sides(T.grad_drift, high=True))
def test_gradient_drift_limit(drift: float, fires: bool) -> None:
    det = detector()
    found = [det.check(healthy(s, gradients={"ema_drift": drift})) for s in range(1, 1 + T.grad_drift_patience)]
    assert (severity(found[-1], "gradient_drift") == WARNING) is fires
    assert all(severity(f, "gradient_drift") is None for f in found[:-1])  # patience


# ------------------------------------------------------------------------------------------------
# lstm_unhealthy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("norm", "fires"), sides(T.lstm_norm_max, high=True))
def test_lstm_norm_limit_without_a_baseline(norm: float, fires: bool) -> None:
    found = detector().check(healthy(1, lstm={"c_norm": norm, "h_norm": 13.0, "c_max_abs": 20.0}))
    assert (severity(found, "lstm_unhealthy") == WARNING) is fires


@pytest.mark.parametrize(("cmax", "fires"), sides(T.lstm_c_max_abs, high=True))
def test_lstm_c_max_abs_limit_without_a_baseline(cmax: float, fires: bool) -> None:
    found = detector().check(healthy(1, lstm={"c_norm": 85.0, "c_max_abs": cmax}))
    assert (severity(found, "lstm_unhealthy") == WARNING) is fires


def test_lstm_jump_limit_against_a_steady_state() -> None:
    """A steady baseline (no spread): the limit is lstm_relative_factor x the recent level. The rule
    compares log-norms, so the limit is probed one part in 1e12 to either side."""
    limit = T.lstm_relative_factor * 85.0
    for norm, fires in ((limit * (1 - 1e-12), False), (limit * (1 + 1e-12), True)):
        det = detector()
        step = warm(det, 10)  # c norm 85, |c| max 37
        found = det.check(healthy(step, lstm={"c_norm": norm, "c_max_abs": 80.0}))
        assert (severity(found, "lstm_unhealthy") == CRITICAL) is fires, norm
        if fires:
            assert "its recent median 85" in found[0].message


def test_lstm_jump_limit_widens_with_the_runs_own_spread() -> None:
    """A bursty state (c norm around 40, +-35% from update to update): the limit is lstm_spread_k
    robust sigmas of its update-to-update log changes above its recent level, wider than the
    fixed factor."""
    rng = random.Random(3)
    norms = [40.0 * math.exp(rng.gauss(0.0, 0.35)) for _ in range(20)]
    det = detector()
    for i, cn in enumerate(norms):
        assert det.check(healthy(100 + i, lstm={"c_norm": cn, "c_max_abs": 30.0})) == []
    logs = [math.log(x) for x in norms]
    level = statistics.median(logs[-T.baseline_min_updates :])
    steps = [b - a for a, b in itertools.pairwise(logs)]
    centre = statistics.median(steps)
    spread = 1.4826 * statistics.median(abs(d - centre) for d in steps)
    limit = math.exp(level + T.lstm_spread_k * spread)
    assert limit > 1.5 * T.lstm_relative_factor * math.exp(level)  # the spread decides here
    for norm, fires in ((limit * (1 - 1e-12), False), (limit * (1 + 1e-12), True)):
        probe = AnomalyDetector(T, total_updates=TOTAL, heads=HEADS)
        probe.load_state_dict(det.state_dict())
        found = probe.check(healthy(120, lstm={"c_norm": norm, "c_max_abs": 80.0}))
        assert (severity(found, "lstm_unhealthy") == CRITICAL) is fires, norm


@pytest.mark.parametrize(
    ("share", "want"),
    [
        (T.lstm_gate_saturation_warning, None),
        (below(T.lstm_gate_saturation_warning), None),
        (above(T.lstm_gate_saturation_warning), WARNING),
        (T.lstm_gate_saturation_critical, WARNING),
        (below(T.lstm_gate_saturation_critical), WARNING),
        (above(T.lstm_gate_saturation_critical), CRITICAL),
    ],
)
def test_lstm_gate_saturation_limits(share: float, want: str | None) -> None:
    sat = {"input": share}  # one gate type: the share is exactly this value
    found = detector().check(healthy(1, lstm={"gate_saturation": sat}))
    assert severity(found, "lstm_unhealthy") == want


def _gates(det: AnomalyDetector, step: int, share: float) -> str | None:
    return severity(det.check(healthy(step, lstm={"gate_saturation": {"input": share}})), "lstm_unhealthy")


LEVELS = [0.55, 0.62, 0.58, 0.6, 0.57, 0.61, 0.59]  # a converged LSTM's gates, above the warning limit


def test_lstm_gate_saturation_is_judged_against_its_own_level_once_known() -> None:
    """The first updates learn the level (flagged or not); then a steady share above the warning
    limit is the run's own level, not an alarm."""
    det = detector()
    sev = [_gates(det, 1 + i, share) for i, share in enumerate(LEVELS)]
    assert sev == [WARNING] * T.baseline_min_updates + [None] * (len(LEVELS) - T.baseline_min_updates)


@pytest.mark.parametrize(("delta", "fires"), [(0.0, False), (-1.0, False), (1.0, True)])
def test_lstm_gate_saturation_jump_limit(delta: float, fires: bool) -> None:
    """At, just under and just over the median of the recent shares + lstm_gate_saturation_jump."""
    det = detector()
    for i, share in enumerate(LEVELS):
        _gates(det, 1 + i, share)
    limit = statistics.median(LEVELS) + T.lstm_gate_saturation_jump
    share = limit if delta == 0 else (above(limit) if delta > 0 else below(limit))
    assert _gates(det, 20, share) == (WARNING if fires else None)


def test_lstm_gate_saturation_jump_stays_out_of_the_level() -> None:
    det = detector()
    for i, share in enumerate(LEVELS):
        _gates(det, 1 + i, share)
    jumped = statistics.median(LEVELS) + T.lstm_gate_saturation_jump + 0.01
    assert [_gates(det, 20 + i, jumped) for i in range(8)] == [WARNING] * 8  # it does not become the norm


@pytest.mark.parametrize(("h", "fires"), sides(T.lstm_norm_min, high=False))
def test_lstm_vanished_h_limit(h: float, fires: bool) -> None:
    found = detector().check(healthy(1, lstm={"h_norm": h}))
    assert (severity(found, "lstm_unhealthy") == WARNING) is fires


# ------------------------------------------------------------------------------------------------
# performance_degradation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [0.0, -1e-9, 1e-9])
def test_performance_drop_limit(delta: float) -> None:
    """Best rolling mean 300, so the limit is a mean of 300 - 0.5 x 300 = 150."""
    det = detector()
    best = 300.0
    limit = best - T.perf_drop * max(abs(best), best - best)
    for i in range(T.perf_window):
        det.check(healthy(100 + i, episodes={"count": 4, "return_mean": best}))
    found = []
    for i in range(T.perf_window):
        found = det.check(healthy(110 + i, episodes={"count": 4, "return_mean": limit + delta}))
    assert (severity(found, "performance_degradation") == WARNING) is (delta < 0)


@pytest.mark.parametrize(("step", "judged"), [(30, True), (29, False)])
def test_performance_warmup_fraction_limit(step: int, judged: bool) -> None:
    assert T.perf_warmup_fraction * TOTAL == 30
    det = detector()
    for i in range(T.perf_window):
        det.check(healthy(1 + i, episodes={"count": 4, "return_mean": 300.0}))
    found = []
    for i in range(T.perf_window):
        found = det.check(healthy(step - T.perf_window + 1 + i, episodes={"count": 4, "return_mean": 10.0}))
    assert (severity(found, "performance_degradation") == WARNING) is judged


# ------------------------------------------------------------------------------------------------
# rank_divergence (judged by the multi-rank aggregator's RankJudge)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "fires"), [(0.0, False), (1.0, True)])
def test_rank_divergence_on_non_finite_elements_of_one_rank(bad: float, fires: bool) -> None:
    judge = RankJudge(T, ["grad_norm", "grad_nan", "grad_inf"])
    _, found = judge.judge(1, [[1.0, 0.0, 0.0], [1.0, bad, 0.0], [1.0, 0.0, 0.0]])
    assert ([a.rank for a in found] == [1]) is fires
