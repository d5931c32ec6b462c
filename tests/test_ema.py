"""GradientEMA: drift against a float64 reference, warm-up, non-finite inputs, checkpoints."""

from __future__ import annotations

import json
import math
import random

import pytest

from telemetry_core.config import Thresholds
from telemetry_core.ema import GradientEMA


def reference(values: list[float], momentum: float, warmup: int, eps: float = 1e-8) -> list[float | None]:
    """Drift of each value against the EMA before it, None in warm-up or for non-finite values."""
    ema, count, out = None, 0, []
    for x in values:
        if not math.isfinite(x):
            out.append(None)
            continue
        if ema is None:
            out.append(None)
            ema = x
        else:
            out.append(abs(x - ema) / (abs(ema) + eps) if count >= warmup else None)
            ema = momentum * ema + (1 - momentum) * x
        count += 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_drift_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    momentum = rng.choice([0.5, 0.9, 0.99])
    warmup = rng.choice([0, 1, 5, 10])
    values = [rng.lognormvariate(0, 1) for _ in range(60)]
    ema = GradientEMA(momentum=momentum, warmup=warmup)
    got = [ema.update(v) for v in values]
    want = reference(values, momentum, warmup)
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-12)
    assert ema.count == 60 and ema.drift == got[-1]


def test_warmup_gives_no_verdict() -> None:
    ema = GradientEMA(momentum=0.9, warmup=10)
    drifts = [ema.update(1.0 + i) for i in range(12)]
    assert drifts[:10] == [None] * 10  # the first 10 updates: no verdict
    assert drifts[10] is not None and drifts[11] is not None
    assert ema.drifting(0.5) is not None
    assert not GradientEMA(warmup=3).warmed_up


def test_first_value_initialises_without_bias() -> None:
    ema = GradientEMA(momentum=0.99, warmup=0)
    assert ema.value is None
    assert ema.update(4.0) is None  # nothing to compare with yet
    assert ema.value == 4.0
    assert ema.update(4.0) == 0.0
    assert ema.update(6.0) == pytest.approx(0.5)
    assert ema.drifting(0.4) is True and ema.drifting(0.6) is False


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_do_not_poison_the_ema(bad: float) -> None:
    ema = GradientEMA(momentum=0.9, warmup=0)
    for v in (1.0, 2.0, 3.0):
        ema.update(v)
    before = ema.state_dict()
    assert ema.update(bad) is None
    assert ema.main.skipped == 1 and ema.count == 3
    assert ema.value == before["main"]["ema"]
    clean = GradientEMA(momentum=0.9, warmup=0)
    for v in (1.0, 2.0, 3.0):
        clean.update(v)
    assert ema.update(5.0) == clean.update(5.0)  # as if the bad value never came


def test_extras_have_their_own_warmup() -> None:
    ema = GradientEMA(momentum=0.9, warmup=2)
    ema.update(1.0, {"actor": 0.5})
    ema.update(1.0, {"actor": 0.5})
    ema.update(1.0, {"actor": 0.5, "critic": 2.0})  # critic appears late
    assert ema.extras_drift["actor"] == 0.0
    assert ema.extras_drift["critic"] is None
    ema.update(1.0, {"actor": 1.0, "critic": 2.0})
    ema.update(1.0, {"actor": 1.0, "critic": 3.0})
    assert ema.extras_drift["critic"] == pytest.approx(0.5)
    assert ema.extras_value["actor"] == pytest.approx(0.9 * (0.9 * 0.5 + 0.1 * 1.0) + 0.1 * 1.0)
    ema.update(1.0, {"actor": math.nan})
    assert ema.extras_drift == {"actor": None} and ema.extras["actor"].skipped == 1


def test_state_dict_round_trips_exactly_through_json() -> None:
    rng = random.Random(7)
    a = GradientEMA(momentum=0.97, warmup=3)
    for _ in range(20):
        a.update(rng.random() * 10, {"lstm": rng.random(), "heads": rng.random()})
    a.update(math.nan, {"lstm": math.inf})
    state = json.loads(json.dumps(a.state_dict()))  # plain Python types only
    b = GradientEMA()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for _ in range(10):
        x, extras = rng.random() * 10, {"lstm": rng.random(), "heads": rng.random()}
        assert a.update(x, extras) == b.update(x, extras)
        assert a.extras_drift == b.extras_drift
    assert a.state_dict() == b.state_dict()


def test_from_thresholds() -> None:
    th = Thresholds(grad_ema_momentum=0.95, grad_drift_warmup=4)
    ema = GradientEMA.from_thresholds(th)
    assert (ema.momentum, ema.warmup) == (0.95, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"momentum": 0.0}, ValueError, "momentum"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": math.nan}, TypeError, "momentum"),
        ({"momentum": True}, TypeError, "momentum"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"warmup": 1.5}, ValueError, "warmup"),
        ({"eps": 0.0}, ValueError, "eps"),
    ],
)
def test_bad_arguments(kwargs, error, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=words):
        GradientEMA(**kwargs)


def test_bad_updates() -> None:
    ema = GradientEMA()
    with pytest.raises(TypeError, match="value"):
        ema.update("1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extras"):
        ema.update(1.0, [("a", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"extras\['a'\]"):
        ema.update(1.0, {"a": None})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda s: s.pop("main"), "lacks"),
        (lambda s: s["main"].update(count=-1), "count"),
        (lambda s: s["main"].update(ema=math.nan), "ema"),
        (lambda s: s["main"].update(ema=None), "exactly when count is 0"),
        (lambda s: s["main"].pop("skipped"), "state\\['main'\\]"),
        (lambda s: s["extras"].update(a={"ema": 1.0}), "extras"),
        (lambda s: s.update(momentum=2.0), "momentum"),
        (lambda s: s.update(extras=[1]), "extras"),
    ],
)
def test_load_state_dict_rejects_malformed_state(mutate, words) -> None:  # type: ignore[no-untyped-def]
    ema = GradientEMA(warmup=1)
    ema.update(1.0, {"a": 2.0})
    state = ema.state_dict()
    mutate(state)
    fresh = GradientEMA()
    with pytest.raises(ValueError, match=words):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == GradientEMA().state_dict()  # unchanged on error
