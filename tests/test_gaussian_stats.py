"""Continuous-head statistics (telemetry_core.reductions.gaussian) against float64 references on fresh
random inputs: log-std mean / min / max / per dimension, differential entropy, the log-std trend and
the action saturation (bounded and tanh-squashed), with NaN, inf and zeros."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_policy_stats import SyncCounter

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.gaussian import HALF_LOG_2PI_E, SQUASH_SATURATION, TREND_WINDOW, slope
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.transfer import transfer
from telemetry_core.schema import PolicyStats

LEVEL = TelemetryLevel.NORMAL
SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run; the seed is in the failure


def build(reducer: PolicyReducer) -> PolicyStats:
    host = {k: v.double().reshape(-1).tolist() for k, v in reducer.pending(LEVEL).items()}
    stats = reducer.build(host, LEVEL)
    assert stats is not None
    return stats


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_log_std_and_differential_entropy_against_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(SEED)
    dims = int(torch.randint(1, 7, (), generator=g))
    calls = [
        torch.randn(dims, generator=g) * 0.5 - 0.3,  # a state-independent parameter
        torch.randn(int(torch.randint(1, 50, (), generator=g)), dims, generator=g) - 1.0,  # per sample
        torch.randn(2, 3, dims, generator=g),  # any leading shape
    ]
    reducer = PolicyReducer({"arm": 1, "grip": 1})
    for t in calls:
        reducer.observe_log_std("arm", t.to(dtype))
    stats = build(reducer)
    rows = [t.to(dtype).double().reshape(-1, dims) for t in calls]
    ref = torch.cat(rows)
    assert close(stats.log_std_mean["arm"], float(ref.mean())), SEED
    assert stats.log_std_min["arm"] == float(ref.min()) and stats.log_std_max["arm"] == float(ref.max())
    per_dim = ref.mean(0)
    assert all(close(a, float(b)) for a, b in zip(stats.log_std_dims["arm"], per_dim, strict=True)), SEED
    # differential entropy of a diagonal Gaussian: sum over dims of log sigma + log(2 pi e)/2, per
    # sample, averaged (torch's own Normal entropy in float64 as the reference)
    normal = torch.distributions.Normal(torch.zeros_like(ref), ref.exp())
    assert close(stats.entropy_differential["arm"], float(normal.entropy().sum(1).mean()), 1e-10), SEED
    assert "grip" not in stats.log_std_mean and "grip" not in stats.entropy_differential


def test_log_std_calls_of_other_dimensions_pool_without_per_dimension_means() -> None:
    reducer = PolicyReducer({"arm": 1})
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    reducer.observe_log_std("arm", a)
    reducer.observe_log_std("arm", b)
    stats = build(reducer)
    ref = torch.cat((a, b.reshape(-1)))
    assert close(stats.log_std_mean["arm"], float(ref.mean()))
    assert "arm" not in stats.log_std_dims
    # one row of 3 dims and four rows of 2: entropy per row, averaged over the 5 rows
    per_row = [float(a.sum()) + 3 * HALF_LOG_2PI_E] + [float(r.sum()) + 2 * HALF_LOG_2PI_E for r in b]
    assert close(stats.entropy_differential["arm"], sum(per_row) / 5)


def test_log_std_nan_inf_and_zeros() -> None:
    reducer = PolicyReducer({"arm": 1})
    reducer.observe_log_std("arm", torch.zeros(4))
    stats = build(reducer)
    assert stats.log_std_mean["arm"] == 0.0 and stats.log_std_dims["arm"] == [0.0] * 4
    assert close(stats.entropy_differential["arm"], 4 * HALF_LOG_2PI_E)
    reducer.reset()
    reducer.observe_log_std("arm", torch.tensor([0.0, float("nan"), 1.0]))
    stats = build(reducer)
    assert math.isnan(stats.log_std_mean["arm"]) and math.isnan(stats.entropy_differential["arm"])
    assert math.isnan(stats.log_std_min["arm"]) and math.isnan(stats.log_std_max["arm"])
    reducer.reset()
    reducer.observe_log_std("arm", torch.tensor([0.0, -math.inf]))
    stats = build(reducer)
    assert stats.log_std_mean["arm"] == -math.inf and stats.log_std_min["arm"] == -math.inf
    assert stats.log_std_max["arm"] == 0.0 and stats.entropy_differential["arm"] == -math.inf


def test_log_std_trend_is_the_least_squares_slope_of_recent_updates() -> None:
    g = torch.Generator().manual_seed(SEED)
    reducer = PolicyReducer({"arm": 1})
    means: list[float] = []
    for update in range(TREND_WINDOW + 5):
        reducer.reset()
        value = -0.05 * update + 0.01 * float(torch.randn((), generator=g))
        if update == 4:
            reducer.observe_log_std("arm", torch.tensor([math.nan], dtype=torch.float64))
            stats = build(reducer)
            assert math.isnan(stats.log_std_mean["arm"])  # a NaN update stays out of the fit
            continue
        reducer.observe_log_std("arm", torch.tensor([value, value], dtype=torch.float64))
        stats = build(reducer)
        means.append(value)
        if len(means) < 2:
            assert "arm" not in stats.log_std_trend
            continue
        recent = np.array(means[-TREND_WINDOW:], dtype=np.float64)
        ref = np.polyfit(np.arange(len(recent), dtype=np.float64), recent, 1)[0]
        assert math.isclose(stats.log_std_trend["arm"], float(ref), rel_tol=1e-9, abs_tol=1e-12), SEED
    assert slope([1.0]) != slope([1.0])  # NaN: one point has no slope
    assert slope([2.0, 2.0, 2.0]) == 0.0


def _saturation_ref(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
    bounded = np.isfinite(low) | np.isfinite(high)
    beyond = ((x < low) | (x > high))[:, bounded]
    return float(beyond.mean()), float(beyond.mean(0).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_action_saturation_against_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(SEED)
    dims = 4
    low = np.array([-2.0, -1.0, -np.inf, -0.5])
    high = np.array([2.0, 1.0, np.inf, 3.0])
    calls = [torch.randn(int(torch.randint(1, 200, (), generator=g)), dims, generator=g) * 2 for _ in range(3)]
    reducer = PolicyReducer({"arm": 1})
    for t in calls:
        reducer.observe_actions("arm", t.to(dtype), low=low.astype(np.float32), high=high.astype(np.float32))
    stats = build(reducer)
    x = torch.cat(calls).to(dtype).double().numpy()
    share, worst = _saturation_ref(x, low.astype(np.float32).astype(np.float64), high.astype(np.float32))
    assert close(stats.action_saturation["arm"], share), SEED
    assert close(stats.action_saturation_max["arm"], worst), SEED


def test_action_saturation_at_the_bound_inf_nan_and_zeros() -> None:
    reducer = PolicyReducer({"arm": 1})
    bound = np.float32(2.0)
    # exactly at the bound is not beyond it; the next float32 above is
    at = torch.tensor([[2.0], [-2.0], [float(np.nextafter(bound, np.float32(3)))], [0.0]])
    reducer.observe_actions("arm", at, low=-2.0, high=2.0)
    stats = build(reducer)
    assert stats.action_saturation["arm"] == 0.25 and stats.action_saturation_max["arm"] == 0.25
    reducer.reset()
    reducer.observe_actions("arm", torch.tensor([math.inf, -math.inf, 0.0, 0.0]), low=-1.0, high=1.0)
    assert build(reducer).action_saturation["arm"] == 0.5  # a 1-D tensor is one dimension
    reducer.reset()
    reducer.observe_actions("arm", torch.zeros(5, 2), low=[-1.0, -1.0], high=[1.0, 1.0])
    assert build(reducer).action_saturation == {"arm": 0.0}
    reducer.reset()
    reducer.observe_actions("arm", torch.tensor([[0.0, math.nan]]), low=-1.0, high=1.0)
    stats = build(reducer)
    assert math.isnan(stats.action_saturation["arm"]) and math.isnan(stats.action_saturation_max["arm"])
    reducer.reset()
    reducer.observe_actions("arm", torch.ones(3, 2), low=-np.inf, high=np.inf)
    assert "arm" not in build(reducer).action_saturation  # no bounded dimension: nothing to judge


def test_squashed_saturation_against_float64() -> None:
    g = torch.Generator().manual_seed(SEED)
    u = torch.randn(300, 3, generator=g) * 3
    reducer = PolicyReducer({"arm": 1})
    reducer.observe_actions("arm", u, squashed=True)
    stats = build(reducer)
    sat = (torch.tanh(u.double()).abs() > SQUASH_SATURATION).numpy()
    assert close(stats.action_saturation["arm"], float(sat.mean())), SEED
    assert close(stats.action_saturation_max["arm"], float(sat.mean(0).max())), SEED


def test_bad_arguments_are_refused() -> None:
    reducer = PolicyReducer({"arm": 1})
    with pytest.raises(ValueError, match="unknown head"):
        reducer.observe_actions("leg", torch.zeros(2), low=-1, high=1)
    with pytest.raises(ValueError, match="low= and high="):
        reducer.observe_actions("arm", torch.zeros(2))
    with pytest.raises(ValueError, match="takes no low/high"):
        reducer.observe_actions("arm", torch.zeros(2), low=-1, high=1, squashed=True)
    with pytest.raises(ValueError, match="1 or 3 values"):
        reducer.observe_actions("arm", torch.zeros(4, 3), low=[-1, -1], high=[1, 1])
    with pytest.raises(ValueError, match="must not exceed"):
        reducer.observe_actions("arm", torch.zeros(2), low=1, high=-1)
    with pytest.raises(TypeError, match="host values"):
        reducer.observe_actions("arm", torch.zeros(2), low=torch.tensor(-1.0), high=1)
    with pytest.raises(TypeError, match="floating-point"):
        reducer.observe_actions("arm", torch.zeros(2, dtype=torch.long), low=-1, high=1)


def test_observing_and_pending_never_sync_and_transfer_once() -> None:
    g = torch.Generator().manual_seed(SEED)
    reducer = PolicyReducer({"arm": 1})
    low, high = np.array([-2.0, -1.0]), np.array([2.0, 1.0])
    with SyncCounter() as counter:
        for _ in range(3):  # the bounds reach the device once, then come from the cache
            reducer.observe_log_std("arm", torch.randn(2, generator=g))
            reducer.observe_actions("arm", torch.randn(32, 2, generator=g), low=low, high=high)
        pending = reducer.pending(LEVEL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]  # the one materialisation, done by the hub's transfer
    stats = reducer.build(host, LEVEL)
    assert stats is not None and "arm" in stats.action_saturation and "arm" in stats.log_std_mean


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_continuous_statistics_on_cuda_match_the_cpu() -> None:
    g = torch.Generator().manual_seed(SEED)
    log_std, actions = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) * 2
    out = []
    for device in ("cpu", "cuda"):
        reducer = PolicyReducer({"arm": 1})
        reducer.observe_log_std("arm", log_std.to(device))
        reducer.observe_actions("arm", actions.to(device), low=-1.5, high=1.5)
        out.append(build(reducer))
    cpu, gpu = out
    assert close(cpu.log_std_mean["arm"], gpu.log_std_mean["arm"])
    assert close(cpu.entropy_differential["arm"], gpu.entropy_differential["arm"])
    assert cpu.action_saturation == gpu.action_saturation
