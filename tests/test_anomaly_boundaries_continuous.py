"""The continuous-head rules (std_collapse, std_explosion, action_saturation) at their limits: a value
exactly at the limit, the next float below it and the next float above it, with the limits read from
the default ``Thresholds`` and computed with the rule's own arithmetic (so recalibrating a threshold
keeps these tests meaningful)."""

from __future__ import annotations

import math

import pytest
from test_anomaly import detector, healthy, kinds

from telemetry_core.config import Thresholds
from telemetry_core.detection import CRITICAL, WARNING, AnomalyDetector
from telemetry_core.schema import Snapshot

T = Thresholds()
HEAD = "arm"


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def sides(limit: float, *, high: bool) -> list[tuple[float, bool]]:
    """(value, beyond the limit?) at the limit and on both sides; ``high``: beyond means above."""
    return [(limit, False), (below(limit), not high), (above(limit), high)]


def gaussian(step: int, mean: float, low: float | None = None, high: float | None = None) -> Snapshot:
    return healthy(
        step,
        policy={
            "log_std_mean": {HEAD: mean},
            "log_std_min": {HEAD: mean if low is None else low},
            "log_std_max": {HEAD: mean if high is None else high},
        },
    )


def saturating(step: int, share: float) -> Snapshot:
    return healthy(step, policy={"action_saturation": {HEAD: share}, "action_saturation_max": {HEAD: share}})


def sev(found: list, kind: str) -> str | None:
    return kinds(found).get((kind, HEAD))


def warm_std(det: AnomalyDetector, value: float = 0.0, n: int = 20) -> int:
    for step in range(100, 100 + n):
        assert det.check(gaussian(step, value)) == []
    return 100 + n


# ------------------------------------------------------------------------------------------------
# std_collapse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("low", "fires"), sides(T.std_collapse_log_std, high=False))
def test_std_collapse_floor(low: float, fires: bool) -> None:
    found = detector().check(gaussian(150, 0.0, low=low))
    assert sev(found, "std_collapse") == (WARNING if fires else None)


@pytest.mark.parametrize(("low", "critical"), sides(T.std_collapse_log_std_critical, high=False))
def test_std_collapse_critical_floor(low: float, critical: bool) -> None:
    found = detector().check(gaussian(150, 0.0, low=low))
    assert sev(found, "std_collapse") == (CRITICAL if critical else WARNING)


@pytest.mark.parametrize(("mean", "fires"), sides(-T.std_drop, high=False))
def test_std_collapse_drop_below_the_median(mean: float, fires: bool) -> None:
    det = detector()
    step = warm_std(det)
    assert sev(det.check(gaussian(step, mean)), "std_collapse") == (WARNING if fires else None)


@pytest.mark.parametrize(("mean", "critical"), sides(-T.std_drop_critical, high=False))
def test_std_collapse_critical_drop(mean: float, critical: bool) -> None:
    det = detector()
    step = warm_std(det)
    assert sev(det.check(gaussian(step, mean)), "std_collapse") == (CRITICAL if critical else WARNING)


def test_std_drop_needs_a_known_baseline() -> None:
    det = detector()
    for step in range(1, T.baseline_min_updates + 1):
        det.check(gaussian(step, 0.0))
    # the median of baseline_min_updates values is known: the drop counts now, not before
    assert sev(det.check(gaussian(50, -T.std_drop_critical - 0.5)), "std_collapse") == CRITICAL
    det = detector()
    for step in range(1, T.baseline_min_updates):
        det.check(gaussian(step, 0.0))
    assert sev(det.check(gaussian(50, -T.std_drop_critical - 0.5)), "std_collapse") is None


def _slide(values: list[float]) -> str | None:
    """A baseline at 0, then ``values``: the std_collapse severity of the last one."""
    det = detector()
    step = warm_std(det)
    for i, v in enumerate(values[:-1]):
        assert det.check(gaussian(step + i, v)) == []
    return sev(det.check(gaussian(step + len(values), values[-1])), "std_collapse")


def _falls() -> list[float]:
    """std_fall_updates - 1 falls of twice the step, starting at the slide's drop."""
    return [-T.std_slide_drop - 2 * T.std_fall_step * i for i in range(T.std_fall_updates - 1)]


@pytest.mark.parametrize(("final", "fires"), sides(-T.std_slide_drop, high=False))
def test_std_slide_below_its_drop(final: float, fires: bool) -> None:
    # every value (the first one from the baseline at 0) a fall of 1.1 x std_fall_step, ending at
    # ``final``: the drop decides
    assert T.std_slide_drop > 1.1 * T.std_fall_step * T.std_fall_updates  # (so the first is a fall)
    prior = [final + 1.1 * T.std_fall_step * k for k in range(T.std_fall_updates - 1, 0, -1)]
    assert _slide([*prior, final]) == (WARNING if fires else None)


@pytest.mark.parametrize(("side", "fires"), [("at", False), ("above", False), ("below", True)])
def test_std_slide_fall_step_limit(side: str, fires: bool) -> None:
    falls = _falls()
    limit = falls[-1] - T.std_fall_step  # the rule's own arithmetic
    final = {"at": limit, "above": above(limit), "below": below(limit)}[side]
    assert _slide([*falls, final]) == (WARNING if fires else None)


def test_std_slide_needs_its_falls_in_a_row() -> None:
    det = detector()
    step = warm_std(det)
    values = [-0.05, -0.10, -0.10, -0.2]  # the third update is no fall: two falls before the last
    found = [det.check(gaussian(step + i, v)) for i, v in enumerate(values)]
    assert sev(found[-1], "std_collapse") is None


def test_std_rules_ignore_nan_and_missing() -> None:
    det = detector()
    step = warm_std(det)
    found = det.check(gaussian(step, math.nan)) + det.check(healthy(step + 1))
    assert not [a for a in found if a.kind in ("std_collapse", "std_explosion")]


# ------------------------------------------------------------------------------------------------
# std_explosion
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("high", "fires"), sides(T.std_explosion_log_std, high=True))
def test_std_explosion_ceiling(high: float, fires: bool) -> None:
    found = detector().check(gaussian(150, 0.0, high=high))
    assert sev(found, "std_explosion") == (WARNING if fires else None)


@pytest.mark.parametrize(("high", "critical"), sides(T.std_explosion_log_std_critical, high=True))
def test_std_explosion_critical_ceiling(high: float, critical: bool) -> None:
    found = detector().check(gaussian(150, 0.0, high=high))
    assert sev(found, "std_explosion") == (CRITICAL if critical else WARNING)


@pytest.mark.parametrize(("mean", "fires"), sides(T.std_rise, high=True))
def test_std_explosion_rise_above_the_median(mean: float, fires: bool) -> None:
    det = detector()
    step = warm_std(det)
    assert sev(det.check(gaussian(step, mean)), "std_explosion") == (WARNING if fires else None)


@pytest.mark.parametrize(("mean", "critical"), sides(T.std_rise_critical, high=True))
def test_std_explosion_critical_rise(mean: float, critical: bool) -> None:
    det = detector()
    step = warm_std(det)
    assert sev(det.check(gaussian(step, mean)), "std_explosion") == (CRITICAL if critical else WARNING)


def test_a_flagged_std_stays_out_of_the_baseline() -> None:
    det = detector()
    step = warm_std(det)
    for i in range(30):  # a sustained collapse is never the new normal
        assert sev(det.check(gaussian(step + i, -3.0)), "std_collapse") == CRITICAL


# ------------------------------------------------------------------------------------------------
# action_saturation
# ------------------------------------------------------------------------------------------------
def warm_sat(det: AnomalyDetector, share: float, n: int = 20) -> int:
    for step in range(100, 100 + n):
        assert det.check(saturating(step, share)) == []
    return 100 + n


@pytest.mark.parametrize(("share", "fires"), sides(T.action_saturation_warning, high=True))
def test_action_saturation_warning_limit(share: float, fires: bool) -> None:
    det = detector()
    step = warm_sat(det, 0.0)
    assert sev(det.check(saturating(step, share)), "action_saturation") == (WARNING if fires else None)


@pytest.mark.parametrize(("share", "critical"), sides(T.action_saturation_critical, high=True))
def test_action_saturation_critical_limit(share: float, critical: bool) -> None:
    det = detector()
    step = warm_sat(det, 0.0)
    assert sev(det.check(saturating(step, share)), "action_saturation") == (CRITICAL if critical else WARNING)


@pytest.mark.parametrize(("share", "fires"), sides(0.6 + T.action_saturation_jump, high=True))
def test_action_saturation_must_jump_above_its_median(share: float, fires: bool) -> None:
    det = detector()
    step = warm_sat(det, 0.6)  # a bang-bang controller riding its bounds
    assert sev(det.check(saturating(step, share)), "action_saturation") == (WARNING if fires else None)


@pytest.mark.parametrize(("share", "fires"), sides(T.action_saturation_critical, high=True))
def test_action_saturation_before_a_baseline_warns_on_the_critical_share_only(share: float, fires: bool) -> None:
    found = detector().check(saturating(1, share))
    assert sev(found, "action_saturation") == (WARNING if fires else None)


def test_action_saturation_ignores_nan() -> None:
    det = detector()
    step = warm_sat(det, 0.0)
    assert det.check(saturating(step, math.nan)) == []


def test_continuous_rule_state_round_trips() -> None:
    det = detector()
    step = warm_std(det, 0.5)
    warm_sat(det, 0.1)
    again = detector()
    again.load_state_dict(det.state_dict())
    for d in (det, again):
        assert sev(d.check(gaussian(step, 0.5 - T.std_drop - 0.01)), "std_collapse") == WARNING
    assert again.state_dict() == det.state_dict()
