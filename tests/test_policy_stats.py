"""PolicyReducer: every statistic against a float64 numpy reference, accumulation over minibatches and
epochs, NaN/Inf/zero/constant inputs, bad input, and zero host syncs before the hub's transfer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.transfer import transfer

NORMAL = TelemetryLevel.NORMAL
HEADS = {"direction": 2, "force": 3, "noop": 1}
SYNC_NAMES = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
}


class SyncCounter(TorchFunctionMode):
    """Counts every tensor call that materialises a value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_NAMES:
            self.calls.append(name)
        elif name == "to" and any(
            isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
            for a in (*args[1:], kwargs.get("device"))
            if a is not None and not isinstance(a, torch.dtype)
        ):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)


def run(reducer: PolicyReducer, level: TelemetryLevel = NORMAL):
    return reducer.build(transfer(reducer.pending(level)), level)


# ------------------------------------------------------------------------------------------------
# The float64 reference
# ------------------------------------------------------------------------------------------------


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy().reshape(-1)


def reference(minibatches: list[dict], eps: float) -> dict:
    """Everything the reducer promises, computed directly in float64 numpy."""
    lrs = [f64(mb["new"]) - f64(mb["old"]) for mb in minibatches]
    lr = np.concatenate(lrs)
    r = np.exp(lr)
    k3 = (r - 1) - lr
    k1 = -lr
    ref = {
        "samples": lr.size,
        "ratio_mean": r.mean(),
        "ratio_std": r.std(),
        "ratio_max": r.max(),
        "ratio_min": r.min(),
        "kl_k3_mean": k3.mean(),
        "kl_k1_mean": k1.mean(),
        "kl_k3_max": max(((np.exp(x) - 1) - x).mean() for x in lrs),
        "kl_k1_max": max((-x).mean() for x in lrs),
        "clip_fraction": np.mean(np.abs(r - 1) > eps),
        "clip_fraction_high": np.mean(r > 1 + eps),
        "clip_fraction_low": np.mean(r < 1 - eps),
    }
    ess_b = [np.exp(x).sum() ** 2 / (x.size * (np.exp(x) ** 2).sum()) for x in lrs]
    ref["ess"] = sum(e * x.size for e, x in zip(ess_b, lrs)) / lr.size
    ref["ess_min"] = min(ess_b)
    epochs = sorted({mb["epoch"] for mb in minibatches})
    for key in ("kl_k3_per_epoch", "kl_k1_per_epoch", "kl_k3_max_per_epoch", "kl_k1_max_per_epoch"):
        ref[key] = []
    for e in epochs:
        mine = [lrs[i] for i, mb in enumerate(minibatches) if mb["epoch"] == e]
        x = np.concatenate(mine)
        ref["kl_k3_per_epoch"].append(((np.exp(x) - 1) - x).mean())
        ref["kl_k1_per_epoch"].append((-x).mean())
        ref["kl_k3_max_per_epoch"].append(max(((np.exp(y) - 1) - y).mean() for y in mine))
        ref["kl_k1_max_per_epoch"].append(max((-y).mean() for y in mine))
    for key in ("head_kl_k3", "head_ratio_max", "head_ratio_min", "head_clip_fraction"):
        ref[key] = {}
    ref["head_clip_high"], ref["head_clip_low"] = {}, {}
    heads = sorted({h for mb in minibatches for h in mb.get("hnew", {})})
    for h in heads:
        x = np.concatenate([f64(mb["hnew"][h]) - f64(mb["hold"][h]) for mb in minibatches if h in mb["hnew"]])
        rh = np.exp(x)
        ref["head_kl_k3"][h] = ((rh - 1) - x).mean()
        ref["head_ratio_max"][h] = rh.max()
        ref["head_ratio_min"][h] = rh.min()
        ref["head_clip_high"][h] = np.mean(rh > 1 + eps)
        ref["head_clip_low"][h] = np.mean(rh < 1 - eps)
        ref["head_clip_fraction"][h] = np.mean(np.abs(rh - 1) > eps)
    ref["entropy"], ref["entropy_normalized"] = {}, {}
    for h in sorted({h for mb in minibatches for h in mb.get("ent", {})}):
        e = np.concatenate([f64(mb["ent"][h]) for mb in minibatches if h in mb.get("ent", {})])
        ref["entropy"][h] = e.mean()
        if HEADS[h] > 1:
            ref["entropy_normalized"][h] = e.mean() / np.log(HEADS[h])
    ref["entropy_normalized_per_epoch"] = {}
    if len(epochs) > 1:
        for h in ref["entropy_normalized"]:
            ref["entropy_normalized_per_epoch"][h] = [
                np.concatenate(
                    [f64(mb["ent"][h]) for mb in minibatches if mb["epoch"] == e and h in mb.get("ent", {})]
                ).mean()
                / np.log(HEADS[h])
                for e in epochs
            ]
    losses = [float(mb["loss"]) for mb in minibatches if "loss" in mb]
    ref["policy_loss"] = float(np.mean(losses)) if losses else math.nan
    return ref


def feed(reducer: PolicyReducer, minibatches: list[dict], eps: float, level=NORMAL) -> None:
    for mb in minibatches:
        reducer.observe(
            new_logprob=mb["new"],
            old_logprob=mb["old"],
            clip_range=eps,
            epoch=mb["epoch"],
            head_new_logprobs=mb.get("hnew"),
            head_old_logprobs=mb.get("hold"),
            head_entropies=mb.get("ent"),
            policy_loss=mb.get("loss"),
            level=level,
        )


def make_minibatches(
    gen: torch.Generator, shapes: list[tuple[int, ...]], epochs: int, scale: float = 0.3, dtype=torch.float32
) -> list[dict]:
    out = []
    for epoch in range(epochs):
        for shape in shapes:
            hnew = {h: -torch.rand(shape, generator=gen) * 2 for h in ("direction", "force")}
            hold = {h: hnew[h] + torch.randn(shape, generator=gen) * scale for h in hnew}
            new = (hnew["direction"] + hnew["force"]).to(dtype)
            old = (hold["direction"] + hold["force"]).to(dtype)
            ent = {
                "direction": torch.rand(shape, generator=gen) * math.log(2),
                "force": torch.rand(shape, generator=gen) * math.log(3),
                "noop": torch.zeros(shape),
            }
            loss = torch.randn((), generator=gen)
            out.append(
                {"epoch": epoch, "new": new, "old": old, "hnew": hnew, "hold": hold, "ent": ent, "loss": loss}
            )
    return out


SCALARS = (
    "ratio_mean",
    "ratio_std",
    "ratio_max",
    "ratio_min",
    "kl_k3_mean",
    "kl_k1_mean",
    "kl_k3_max",
    "kl_k1_max",
    "clip_fraction",
    "clip_fraction_high",
    "clip_fraction_low",
    "ess",
    "ess_min",
)


def assert_matches(stats, ref, rtol=1e-10, atol=1e-13) -> None:
    for key in SCALARS:
        assert getattr(stats, key) == pytest.approx(ref[key], rel=rtol, abs=atol, nan_ok=True), key
    assert stats.samples == ref["samples"]
    for key in ("kl_k3_per_epoch", "kl_k1_per_epoch", "kl_k3_max_per_epoch", "kl_k1_max_per_epoch"):
        np.testing.assert_allclose(getattr(stats, key), ref[key], rtol=rtol, atol=atol, err_msg=key)
    for key in (
        "head_kl_k3",
        "head_ratio_max",
        "head_ratio_min",
        "head_clip_fraction",
        "head_clip_high",
        "head_clip_low",
        "entropy",
        "entropy_normalized",
    ):
        got = getattr(stats, key)
        assert set(got) == set(ref[key]), key
        for h in got:
            assert got[h] == pytest.approx(ref[key][h], rel=rtol, abs=atol, nan_ok=True), (key, h)
    got = stats.entropy_normalized_per_epoch
    assert set(got) == set(ref["entropy_normalized_per_epoch"])
    for h in got:
        np.testing.assert_allclose(got[h], ref["entropy_normalized_per_epoch"][h], rtol=rtol, atol=atol)
    assert stats.policy_loss == pytest.approx(ref["policy_loss"], rel=1e-6, nan_ok=True)


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [
        [(64,), (64,), (64,), (17,)],  # a short last minibatch
        [(8, 16), (8, 16)],
        [(2, 3, 5)] * 5,
        [(1,)],
    ],
)
@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_every_statistic_matches_float64_reference(shapes, scale):
    gen = torch.Generator().manual_seed(hash((tuple(shapes), scale)) % 2**31)
    mbs = make_minibatches(gen, shapes, epochs=3, scale=scale)
    reducer = PolicyReducer(HEADS)
    feed(reducer, mbs, 0.2)
    stats = run(reducer)
    assert_matches(stats, reference(mbs, 0.2))
    assert stats.minibatches == len(mbs)
    assert stats.epochs == 3
    assert stats.clip_range == 0.2
    assert stats.logratio_nan == 0 and stats.logratio_inf == 0
    assert 0 < stats.ess <= 1 and 0 < stats.ess_min <= stats.ess
    assert not stats.early_stopped


@pytest.mark.parametrize("shapes", [[(64,), (64,), (64,), (17,)], [(8, 16), (8, 16)], [(1,)]])
def test_ratio_tail_counts_match_float64_reference(shapes):
    """Samples beyond the anomaly limits (Thresholds the reducer is given), joint and per head,
    counted over every minibatch and epoch; tight limits so the wide log-ratios cross them often."""
    gen = torch.Generator().manual_seed(len(shapes))
    mbs = make_minibatches(gen, shapes, epochs=2, scale=0.8)
    limits = {
        "ratio_explosion": 1.5,
        "ratio_explosion_critical": 3.0,
        "ratio_collapse": 0.6,
        "ratio_collapse_critical": 0.25,
    }
    reducer = PolicyReducer(HEADS, Thresholds(**limits))
    feed(reducer, mbs, 0.2)
    stats = run(reducer)
    r = np.exp(np.concatenate([f64(mb["new"]) - f64(mb["old"]) for mb in mbs]))
    expected = (
        int((r > 1.5).sum()),
        int((r > 3.0).sum()),
        int((r < 0.6).sum()),
        int((r < 0.25).sum()),
    )
    got = (stats.ratio_above, stats.ratio_above_critical, stats.ratio_below, stats.ratio_below_critical)
    assert got == expected
    if r.size > 100:  # the test means something: every count but the deepest tail is crossed
        assert all(n > 0 for n in expected[:3]) and expected[0] > expected[1]
    assert stats.ratio_tail_limits == [1.5, 3.0, 0.6, 0.25]
    for h in ("direction", "force"):
        rh = np.exp(np.concatenate([f64(mb["hnew"][h]) - f64(mb["hold"][h]) for mb in mbs]))
        assert stats.head_ratio_above[h] == int((rh > 1.5).sum())
        assert stats.head_ratio_below[h] == int((rh < 0.6).sum())
    # The default limits: nothing of this noise reaches them (and a value exactly at a limit is not beyond it).
    reducer = PolicyReducer(HEADS)
    at = torch.tensor([math.log(10.0), math.log(0.02), 0.0], dtype=torch.float64)
    reducer.observe(new_logprob=at, old_logprob=torch.zeros(3, dtype=torch.float64), clip_range=0.2, epoch=0)
    stats = run(reducer)
    assert stats.ratio_max == pytest.approx(10.0) and stats.ratio_min == pytest.approx(0.02)
    r_at = np.exp(f64(at))
    assert stats.ratio_above == int((r_at > 10.0).sum()) and stats.ratio_below == int((r_at < 0.02).sum())
    assert (stats.ratio_above_critical, stats.ratio_below_critical) == (0, 0)


def test_accumulation_over_minibatches_equals_one_big_batch():
    gen = torch.Generator().manual_seed(7)
    mbs = make_minibatches(gen, [(50,), (50,), (30,), (70,)], epochs=1)
    many = PolicyReducer(HEADS)
    feed(many, mbs, 0.1)
    cat = {
        "epoch": 0,
        "new": torch.cat([m["new"] for m in mbs]),
        "old": torch.cat([m["old"] for m in mbs]),
        "hnew": {h: torch.cat([m["hnew"][h] for m in mbs]) for h in mbs[0]["hnew"]},
        "hold": {h: torch.cat([m["hold"][h] for m in mbs]) for h in mbs[0]["hold"]},
        "ent": {h: torch.cat([m["ent"][h] for m in mbs]) for h in mbs[0]["ent"]},
    }
    one = PolicyReducer(HEADS)
    feed(one, [cat], 0.1)
    a, b = run(many), run(one)
    # Sample-weighted statistics are the same as one batch (ESS and the max-over-minibatch KL are
    # per-minibatch by definition and are checked against the reference elsewhere).
    for key in (
        "ratio_mean",
        "ratio_std",
        "ratio_max",
        "ratio_min",
        "kl_k3_mean",
        "kl_k1_mean",
        "clip_fraction",
        "clip_fraction_high",
        "clip_fraction_low",
    ):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-12, abs=1e-15), key
    for key in ("head_kl_k3", "head_ratio_max", "head_ratio_min", "head_clip_fraction", "entropy"):
        for h, v in getattr(b, key).items():
            assert getattr(a, key)[h] == pytest.approx(v, rel=1e-12, abs=1e-15), (key, h)
    assert a.kl_k3_per_epoch == pytest.approx([b.kl_k3_mean], rel=1e-12)
    assert a.kl_k1_per_epoch == pytest.approx([b.kl_k1_mean], rel=1e-12)
    assert a.kl_k3_max_per_epoch == [a.kl_k3_max]  # one epoch: its max is the update's
    assert b.ess == pytest.approx(b.ess_min)  # one minibatch: the mean is the minimum


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_logprobs_are_upcast_before_subtracting(dtype):
    gen = torch.Generator().manual_seed(3)
    mbs = make_minibatches(gen, [(40,), (40,)], epochs=2, dtype=dtype)
    reducer = PolicyReducer(HEADS)
    feed(reducer, mbs, 0.2)
    assert_matches(run(reducer), reference(mbs, 0.2))


def test_small_kl_keeps_precision():
    """k3 ~ lr**2/2 is computed from a float64 log-ratio: tiny KL is not lost to cancellation."""
    old = -torch.rand(1000, dtype=torch.float64)
    new = old + 1e-5 * torch.randn(1000, dtype=torch.float64)
    reducer = PolicyReducer({})
    reducer.observe(new_logprob=new, old_logprob=old, clip_range=0.2, epoch=0)
    stats = run(reducer)
    lr = (new - old).numpy()
    exact = np.mean(np.expm1(lr) - lr)
    assert stats.kl_k3_mean == pytest.approx(exact, rel=1e-6)
    assert stats.kl_k3_mean > 0


def test_one_action_head_has_entropy_but_no_normalised_entropy():
    reducer = PolicyReducer(HEADS)
    x = -torch.rand(16)
    reducer.observe(
        new_logprob=x,
        old_logprob=x,
        clip_range=0.2,
        epoch=0,
        head_entropies={"noop": torch.zeros(16), "force": torch.full((16,), math.log(3))},
    )
    stats = run(reducer)
    assert stats.entropy == {"noop": 0.0, "force": pytest.approx(math.log(3), rel=1e-6)}
    assert set(stats.entropy_normalized) == {"force"}
    assert stats.entropy_normalized["force"] == pytest.approx(1.0, rel=1e-6)


def test_scalar_entropies_count_as_minibatch_means():
    reducer = PolicyReducer(HEADS)
    x = -torch.rand(8)
    for value in (0.2, 0.4, 0.9):
        reducer.observe(
            new_logprob=x,
            old_logprob=x,
            clip_range=0.2,
            epoch=0,
            head_entropies={"direction": torch.tensor(value)},
            policy_loss=value,  # a Python float is accepted too
        )
    stats = run(reducer)
    assert stats.entropy["direction"] == pytest.approx(0.5, rel=1e-6)
    assert stats.policy_loss == pytest.approx(0.5)


def test_partial_heads_and_heads_missing_in_some_minibatches():
    gen = torch.Generator().manual_seed(11)
    mbs = make_minibatches(gen, [(32,)] * 4, epochs=1)
    for mb in mbs[::2]:  # every other minibatch reports only the "force" head
        mb["hnew"] = {"force": mb["hnew"]["force"]}
        mb["hold"] = {"force": mb["hold"]["force"]}
        mb["ent"] = {"force": mb["ent"]["force"]}
    reducer = PolicyReducer(HEADS)
    feed(reducer, mbs, 0.2)
    assert_matches(run(reducer), reference(mbs, 0.2))


def test_early_stop_records_the_first_event_without_sync():
    for kl, expected in ((torch.tensor(0.031), 0.031), (0.02, 0.02), (None, None)):
        reducer = PolicyReducer(HEADS)
        x = -torch.rand(8)
        reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.2, epoch=0)
        with SyncCounter() as counter:
            reducer.early_stop(2, kl)
            reducer.early_stop(3, 1.0)  # later calls do not overwrite the event that ended the epochs
            pending = reducer.pending(NORMAL)
        assert counter.calls == []
        stats = reducer.build(transfer(pending), NORMAL)
        assert stats.early_stopped and stats.early_stop_epoch == 2
        assert stats.early_stop_kl == (pytest.approx(expected, rel=1e-6) if expected is not None else None)


# ------------------------------------------------------------------------------------------------
# Non-finite, zero and constant inputs
# ------------------------------------------------------------------------------------------------


def test_nan_shows_as_nan_and_is_counted():
    gen = torch.Generator().manual_seed(5)
    mbs = make_minibatches(gen, [(32,), (32,)], epochs=1)
    mbs[1]["new"][3] = math.nan
    mbs[1]["hnew"]["force"][0] = math.nan
    reducer = PolicyReducer(HEADS)
    feed(reducer, mbs, 0.2)
    stats = run(reducer)
    assert stats.logratio_nan == 1
    for key in SCALARS:
        assert math.isnan(getattr(stats, key)), key
    assert all(math.isnan(v) for v in stats.kl_k3_per_epoch)
    assert math.isnan(stats.head_clip_fraction["force"]) and math.isnan(stats.head_kl_k3["force"])
    assert not math.isnan(stats.head_clip_fraction["direction"])


def test_infinite_log_ratios_give_their_limits():
    old = torch.tensor([-1.0, -float("inf"), -0.5, -0.7])
    new = torch.tensor([-float("inf"), -2.0, -0.5, -0.6])  # r = 0, inf, 1, e^0.1
    reducer = PolicyReducer({})
    reducer.observe(new_logprob=new, old_logprob=old, clip_range=0.2, epoch=0)
    stats = run(reducer)
    assert stats.logratio_inf == 2 and stats.logratio_nan == 0
    assert stats.ratio_max == math.inf and stats.ratio_min == 0.0
    assert stats.kl_k3_mean == math.inf and stats.kl_k3_max == math.inf
    assert stats.clip_fraction_high == 0.25 and stats.clip_fraction_low == 0.25
    assert stats.clip_fraction == 0.5


def test_identical_policies_and_constant_shift():
    x = -torch.rand(3, 40, dtype=torch.float64)
    reducer = PolicyReducer({})
    reducer.observe(new_logprob=x, old_logprob=x.clone(), clip_range=0.2, epoch=0)
    stats = run(reducer)
    assert (stats.ratio_mean, stats.ratio_std, stats.ratio_max, stats.ratio_min) == (1.0, 0.0, 1.0, 1.0)
    assert stats.kl_k3_mean == 0.0 and stats.kl_k1_mean == 0.0 and stats.clip_fraction == 0.0
    assert stats.ess == pytest.approx(1.0, abs=1e-15)

    reducer = PolicyReducer({})
    for epoch in range(3):
        reducer.observe(new_logprob=x + 0.5, old_logprob=x, clip_range=0.2, epoch=epoch)
    stats = run(reducer)
    assert stats.ratio_std == pytest.approx(0.0, abs=1e-12)
    assert stats.ratio_mean == pytest.approx(math.exp(0.5), rel=1e-12)
    assert stats.clip_fraction_high == 1.0 and stats.clip_fraction_low == 0.0
    assert stats.ess == pytest.approx(1.0, abs=1e-15)
    assert stats.kl_k3_per_epoch == pytest.approx([math.exp(0.5) - 1.5] * 3, rel=1e-12)


def test_ess_extremes_and_no_overflow():
    """One sample carrying the weight gives ESS ~ 1/n; huge log-ratios do not overflow the ESS."""
    n = 100
    old = torch.zeros(n, dtype=torch.float64)
    new = torch.zeros(n, dtype=torch.float64)
    new[0] = 800.0  # exp(800) overflows float64: the ratio is inf, the ESS is still defined
    reducer = PolicyReducer({})
    reducer.observe(new_logprob=new, old_logprob=old, clip_range=0.2, epoch=0)
    stats = run(reducer)
    assert stats.ratio_max == math.inf
    assert stats.ess == pytest.approx(1.0 / n, rel=1e-12)


def test_nothing_observed_and_off_level():
    reducer = PolicyReducer(HEADS)
    stats = run(reducer)
    assert stats.minibatches == 0 and math.isnan(stats.ratio_mean) and stats.entropy == {}
    x = -torch.rand(8)
    reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.2, epoch=0, level=TelemetryLevel.OFF)
    assert reducer.pending(TelemetryLevel.OFF) == {}
    assert reducer.build({}, TelemetryLevel.OFF) is None
    assert run(reducer).minibatches == 0
    reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.2, epoch=0, level=TelemetryLevel.MINIMAL)
    assert run(reducer, TelemetryLevel.MINIMAL).minibatches == 1  # all policy statistics are MINIMAL
    reducer.reset()
    assert run(reducer).minibatches == 0


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------------


def _call(reducer: PolicyReducer, **overrides):
    x = -torch.rand(8)
    kwargs = {"new_logprob": x, "old_logprob": x.clone(), "clip_range": 0.2, "epoch": 0}
    kwargs.update(overrides)
    reducer.observe(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"old_logprob": -torch.rand(9)}, ValueError, "old_logprob"),
        ({"new_logprob": -torch.rand(2, 4)}, ValueError, "new_logprob"),
        ({"new_logprob": torch.empty(0), "old_logprob": torch.empty(0)}, ValueError, "new_logprob is empty"),
        ({"new_logprob": torch.zeros(8, dtype=torch.long)}, TypeError, "new_logprob must be a floating"),
        ({"old_logprob": torch.zeros(8, dtype=torch.bool)}, TypeError, "old_logprob"),
        ({"old_logprob": [0.0] * 8}, TypeError, "old_logprob must be a torch.Tensor"),
        ({"clip_range": torch.tensor(0.2)}, TypeError, "clip_range"),
        ({"clip_range": -0.1}, ValueError, "clip_range"),
        ({"clip_range": math.nan}, ValueError, "clip_range"),
        ({"epoch": -1}, ValueError, "epoch"),
        ({"epoch": 1.5}, ValueError, "epoch"),
        ({"head_new_logprobs": {"direction": -torch.rand(8)}}, ValueError, "given together"),
        (
            {"head_new_logprobs": {"jump": -torch.rand(8)}, "head_old_logprobs": {"jump": -torch.rand(8)}},
            ValueError,
            "unknown heads ['jump']",
        ),
        (
            {
                "head_new_logprobs": {"force": -torch.rand(8)},
                "head_old_logprobs": {"direction": -torch.rand(8)},
            },
            ValueError,
            "same heads",
        ),
        (
            {"head_new_logprobs": {"force": -torch.rand(7)}, "head_old_logprobs": {"force": -torch.rand(7)}},
            ValueError,
            "head_new_logprobs['force']",
        ),
        (
            {"head_new_logprobs": {"force": torch.zeros(8, dtype=torch.int32)}, "head_old_logprobs": {}},
            TypeError,
            "head_new_logprobs['force']",
        ),
        ({"head_entropies": {"jump": torch.rand(8)}}, ValueError, "head_entropies names unknown heads"),
        ({"head_entropies": {"force": torch.empty(0)}}, ValueError, "head_entropies['force'] is empty"),
        ({"policy_loss": "0.3"}, TypeError, "policy_loss"),
        ({"policy_loss": torch.tensor(1, dtype=torch.int64)}, TypeError, "policy_loss"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    reducer = PolicyReducer(HEADS)
    with pytest.raises(error) as info:
        _call(reducer, **overrides)
    assert words in str(info.value)
    assert reducer.pending(NORMAL) == {}  # nothing half-recorded


@pytest.mark.parametrize(
    ("heads", "words"),
    [({"a": 0}, "heads['a']"), ({"a": 2.5}, "heads['a']"), ({"": 2}, "non-empty"), ([("a", 2)], "mapping")],
)
def test_bad_head_configuration(heads, words):
    with pytest.raises((ValueError, TypeError)) as info:
        PolicyReducer(heads)
    assert words in str(info.value)


def test_bad_early_stop_arguments():
    reducer = PolicyReducer(HEADS)
    with pytest.raises(ValueError, match="kl must hold one value"):
        reducer.early_stop(1, torch.ones(2))
    with pytest.raises(TypeError, match="kl must be"):
        reducer.early_stop(1, "big")
    with pytest.raises(ValueError, match="epoch"):
        reducer.early_stop(-2, 0.1)


# ------------------------------------------------------------------------------------------------
# Host syncs, a real PPO update, CUDA
# ------------------------------------------------------------------------------------------------


def test_observe_and_pending_never_sync_and_transfer_once():
    gen = torch.Generator().manual_seed(2)
    mbs = make_minibatches(gen, [(64,)] * 4, epochs=3)
    reducer = PolicyReducer(HEADS)
    with SyncCounter() as counter:
        feed(reducer, mbs, 0.2)
        reducer.early_stop(2, torch.tensor(0.05))
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]  # the one materialisation, done by the hub's transfer
    assert_matches(reducer.build(host, NORMAL), reference(mbs, 0.2))


class TwoHeadPolicy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh())
        self.direction = torch.nn.Linear(32, 2)
        self.force = torch.nn.Linear(32, 3)

    def dists(self, obs: torch.Tensor) -> dict[str, torch.distributions.Categorical]:
        z = self.body(obs)
        return {
            "direction": torch.distributions.Categorical(logits=self.direction(z)),
            "force": torch.distributions.Categorical(logits=self.force(z)),
        }


def test_real_ppo_update_matches_reference():
    """A real clipped-PPO update (4 epochs x 4 minibatches, SGD steps between them)."""
    torch.manual_seed(0)
    policy = TwoHeadPolicy()
    obs = torch.randn(256, 6)
    with torch.no_grad():
        dists = policy.dists(obs)
        actions = {h: d.sample() for h, d in dists.items()}
        old_heads = {h: d.log_prob(actions[h]) for h, d in dists.items()}
    old_joint = old_heads["direction"] + old_heads["force"]
    advantages = torch.randn(256)
    reducer = PolicyReducer({"direction": 2, "force": 3})
    seen = []
    for epoch in range(4):
        for idx in torch.randperm(256).split(64):
            dists = policy.dists(obs[idx])
            new_heads = {h: d.log_prob(actions[h][idx]) for h, d in dists.items()}
            new_joint = new_heads["direction"] + new_heads["force"]
            ratio = torch.exp(new_joint - old_joint[idx])
            adv = advantages[idx]
            loss = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).mean()
            entropies = {h: d.entropy() for h, d in dists.items()}
            reducer.observe(
                new_logprob=new_joint,
                old_logprob=old_joint[idx],
                clip_range=0.2,
                epoch=epoch,
                head_new_logprobs=new_heads,
                head_old_logprobs={h: v[idx] for h, v in old_heads.items()},
                head_entropies=entropies,
                policy_loss=loss,
            )
            seen.append(
                {
                    "epoch": epoch,
                    "new": new_joint.detach().clone(),
                    "old": old_joint[idx],
                    "hnew": {h: v.detach().clone() for h, v in new_heads.items()},
                    "hold": {h: v[idx] for h, v in old_heads.items()},
                    "ent": {h: v.detach().clone() for h, v in entropies.items()},
                    "loss": loss.detach().clone(),
                }
            )
            policy.zero_grad()
            (loss - 0.01 * sum(e.mean() for e in entropies.values())).backward()
            with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: seconds)
                for param in policy.parameters():
                    param -= 0.5 * param.grad
    stats = run(reducer)
    assert_matches(stats, reference(seen, 0.2))
    assert all(k > 0 for k in stats.kl_k3_per_epoch)  # the policy moved away from the old one
    assert stats.clip_fraction > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_sync_and_same_result():
    gen = torch.Generator().manual_seed(9)
    mbs = make_minibatches(gen, [(128,)] * 4, epochs=2)

    def to_cuda(value):
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, dict):
            return {k: to_cuda(v) for k, v in value.items()}
        return value

    cuda_mbs = [to_cuda(mb) for mb in mbs]
    reducer = PolicyReducer(HEADS)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        feed(reducer, cuda_mbs, 0.2)
        reducer.early_stop(1, cuda_mbs[0]["loss"])
        pending = reducer.pending(NORMAL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = reducer.build(transfer(pending), NORMAL)
    assert_matches(stats, reference(mbs, 0.2), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Deferred work: private copies, early folds, per-call cost
# ------------------------------------------------------------------------------------------------


def test_a_loop_that_refills_its_buffers_changes_nothing():
    """observe() keeps private copies: overwriting the caller's tensors in place afterwards (a loop
    that reuses minibatch buffers) must not change what the update reports."""
    gen = torch.Generator().manual_seed(21)
    mbs = make_minibatches(gen, [(48,)] * 3, epochs=2)
    buffers = {
        "new": torch.empty(48),
        "old": torch.empty(48),
        "hnew": {h: torch.empty(48) for h in ("direction", "force")},
        "hold": {h: torch.empty(48) for h in ("direction", "force")},
        "ent": {h: torch.empty(48) for h in ("direction", "force", "noop")},
        "loss": torch.empty(()),
    }
    reducer = PolicyReducer(HEADS)
    for mb in mbs:
        buffers["new"].copy_(mb["new"])
        buffers["old"].copy_(mb["old"])
        buffers["loss"].copy_(mb["loss"])
        for key in ("hnew", "hold", "ent"):
            for h, t in buffers[key].items():
                t.copy_(mb[key][h])
        feed(reducer, [{**buffers, "epoch": mb["epoch"]}], 0.2)
    for t in (buffers["new"], buffers["old"], buffers["loss"]):
        t.fill_(123.0)  # the next rollout overwrites the buffers before the update's pending()
    for key in ("hnew", "hold", "ent"):
        for t in buffers[key].values():
            t.fill_(123.0)
    assert_matches(run(reducer), reference(mbs, 0.2))


def test_early_folds_of_a_huge_update_give_the_same_statistics(monkeypatch):
    """Past FOLD_ELEMENTS stored elements the minibatches are reduced early (bounded memory); the
    statistics are those of the reference, whatever the fold boundaries."""
    import telemetry_core.reductions.policy as policy_module

    gen = torch.Generator().manual_seed(22)
    mbs = make_minibatches(gen, [(40,), (40,), (25,)], epochs=3)
    for limit in (1, 500, 2000):
        monkeypatch.setattr(policy_module, "FOLD_ELEMENTS", limit)
        reducer = PolicyReducer(HEADS)
        for mb in mbs:
            feed(reducer, [mb], 0.2)
            assert reducer._stored_elements <= max(limit, 40 * 9)  # never more than the limit + a block
        with SyncCounter() as counter:
            pending = reducer.pending(NORMAL)
        assert counter.calls == []
        assert_matches(reducer.build(transfer(pending), NORMAL), reference(mbs, 0.2))


def test_clip_range_changing_between_minibatches():
    """Each minibatch's clip fraction uses the clip range it was observed with (an annealed range)."""
    gen = torch.Generator().manual_seed(23)
    mbs = make_minibatches(gen, [(64,)] * 4, epochs=1, scale=0.5)
    reducer = PolicyReducer(HEADS)
    ranges = (0.3, 0.3, 0.2, 0.1)
    for mb, eps in zip(mbs, ranges):
        feed(reducer, [mb], eps)
    stats = run(reducer)
    highs = lows = 0.0
    for mb, eps in zip(mbs, ranges):
        r = np.exp(f64(mb["new"]) - f64(mb["old"]))
        highs += np.sum(r > 1 + eps)
        lows += np.sum(r < 1 - eps)
    assert stats.clip_fraction_high == pytest.approx(highs / 256, rel=1e-12)
    assert stats.clip_fraction_low == pytest.approx(lows / 256, rel=1e-12)
    assert stats.clip_range == 0.1  # the latest
    whole = reference(mbs, 0.2)
    for key in ("ratio_mean", "ratio_std", "kl_k3_mean", "ess", "ess_min", "kl_k3_max"):
        assert getattr(stats, key) == pytest.approx(whole[key], rel=1e-10), key


@pytest.mark.parametrize("loss", [torch.tensor([0.25]), torch.tensor([0.1, 0.3, 0.5]), 0.75])
def test_loss_of_any_shape_counts_as_its_mean(loss):
    reducer = PolicyReducer(HEADS)
    x = -torch.rand(8)
    reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.2, epoch=0, policy_loss=torch.tensor(0.5))
    reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.2, epoch=0, policy_loss=loss)
    value = float(loss.double().mean()) if isinstance(loss, torch.Tensor) else loss
    assert run(reducer).policy_loss == pytest.approx((0.5 + value) / 2, rel=1e-7)


class KernelCounter(TorchDispatchMode):
    """Counts the aten operations (kernel launches and views) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_observe_costs_one_copy_and_defers_the_rest():
    """Per minibatch only one stack (the private copy) and one copy per loss tensor: every statistic
    is computed once per update, in pending(). A regression guard for the per-call dispatch cost."""
    gen = torch.Generator().manual_seed(24)
    mb = make_minibatches(gen, [(64,)], epochs=1)[0]
    reducer = PolicyReducer(HEADS)
    with KernelCounter() as counter:
        feed(reducer, [mb], 0.2)
    assert sorted(counter.ops) == ["clone", "stack"]
    square = {"epoch": 0, "new": mb["new"].reshape(8, 8), "old": mb["old"].reshape(8, 8)}
    with KernelCounter() as counter:
        feed(reducer, [square], 0.2)
    assert counter.ops == ["stack", "view"]  # a 2-D minibatch: its block is viewed flat


# ------------------------------------------------------------------------------------------------
# Boundaries: comparisons at exactly their limits, counts by shape
# ------------------------------------------------------------------------------------------------


def _at(lr: float) -> float:
    """r - 1 for log-ratio ``lr``, computed as the reducer does (float64 expm1): a clip range equal
    to it puts a sample exactly on the clip limit."""
    return float(torch.expm1(torch.tensor(lr, dtype=torch.float64)))


@pytest.mark.parametrize("side", ["high", "low"])
def test_clip_fractions_at_exactly_the_clip_limit(side):
    """A ratio exactly at 1 + eps (or 1 - eps) is not clipped; the next log-ratio out is. Also a
    clip range of 0 with identical policies (r = 1 exactly) clips nothing.
    Mutation check (by hand): ``d > eps`` -> ``d >= eps`` fails the "high" case, ``d < -eps`` ->
    ``d <= -eps`` the "low" case; each also fails the clip-range-0 check."""
    lr_at = 0.15 if side == "high" else -0.15
    eps = abs(_at(lr_at))
    outward = np.nextafter(lr_at, math.copysign(1.0, lr_at))
    inward = np.nextafter(lr_at, 0.0)
    new = torch.tensor([lr_at, float(outward), float(inward), 0.0], dtype=torch.float64)
    reducer = PolicyReducer({"a": 2})
    reducer.observe(new_logprob=new, old_logprob=torch.zeros(4, dtype=torch.float64), clip_range=eps, epoch=0)
    stats = run(reducer)
    assert _at(float(outward)) != _at(lr_at)  # the neighbour really is past the limit
    high, low = (0.25, 0.0) if side == "high" else (0.0, 0.25)
    assert (stats.clip_fraction_high, stats.clip_fraction_low) == (high, low)
    assert stats.clip_fraction == 0.25
    reducer = PolicyReducer({"a": 2})
    x = -torch.rand(5, dtype=torch.float64)
    reducer.observe(new_logprob=x, old_logprob=x, clip_range=0.0, epoch=0)
    stats = run(reducer)
    assert (stats.clip_fraction, stats.clip_fraction_high, stats.clip_fraction_low) == (0.0, 0.0, 0.0)


def test_entropy_counts_a_0d_value_once_and_a_batch_per_sample():
    """The pooled entropy is the mean over every value handed over: a minibatch's per-sample
    entropies count each, a 0-d entropy (the minibatch mean) counts once, whatever the minibatch
    size. Minibatches of different sizes tell the two apart.
    Mutation check (by hand): counting a 0-d entropy as the minibatch's samples, or a batched one
    as one value, each fail this test."""
    reducer = PolicyReducer({"a": 4, "b": 4})
    small, large = -torch.rand(3), -torch.rand(9)
    per_sample = torch.tensor([0.1, 0.2, 0.3])
    reducer.observe(
        new_logprob=small, old_logprob=small, clip_range=0.2, epoch=0,
        head_entropies={"a": per_sample, "b": torch.tensor(1.0)},
    )  # fmt: skip
    reducer.observe(
        new_logprob=large, old_logprob=large, clip_range=0.2, epoch=0,
        head_entropies={"a": torch.tensor(0.9), "b": torch.full((3, 3), 0.5)},  # a [T, N] batch
    )  # fmt: skip
    stats = run(reducer)
    assert stats.entropy["a"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.9) / 4, rel=1e-6)
    assert stats.entropy["b"] == pytest.approx((1.0 + 9 * 0.5) / 10, rel=1e-6)
