"""ValueReducer: explained variance (undefined on constant returns), value and error distributions,
value loss, against float64 numpy; big buffers; bad input; zero host syncs before the transfer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.advantage import QuantileSampler, quantiles
from telemetry_core.reductions.transfer import transfer
from telemetry_core.reductions.value import ValueReducer

NORMAL = TelemetryLevel.NORMAL
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
        if getattr(func, "__name__", "") in SYNC_NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def run(reducer: ValueReducer, level: TelemetryLevel = NORMAL):
    return reducer.build(transfer(reducer.pending(level)), level)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy().reshape(-1)


def reference(values: np.ndarray, returns: np.ndarray) -> dict:
    err = values - returns
    var_ret = returns.var()
    p5, p50, p95 = np.quantile(err, [0.05, 0.5, 0.95])
    return {
        "explained_variance": None if returns.min() == returns.max() else 1 - err.var() / var_ret,
        "value_mean": values.mean(),
        "value_std": values.std(),
        "value_min": values.min(),
        "value_max": values.max(),
        "return_std": returns.std(),
        "error_mean": err.mean(),
        "error_std": err.std(),
        "error_p5": p5,
        "error_p50": p50,
        "error_p95": p95,
    }


def assert_matches(stats, ref, rtol=1e-10, atol=1e-12) -> None:
    for key, want in ref.items():
        got = getattr(stats, key)
        if want is None:
            assert got is None, key
        else:
            assert got == pytest.approx(want, rel=rtol, abs=atol, nan_ok=True), key


@pytest.mark.parametrize("shape", [(2048,), (128, 8), (16, 4, 3), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_float64_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    returns = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    values = (returns.float() * 0.7 + torch.randn(shape, generator=gen)).to(dtype)
    reducer = ValueReducer()
    reducer.observe_rollout(values, returns)
    losses = [torch.rand((), generator=gen) for _ in range(6)]
    for loss in losses:
        reducer.observe_minibatch(loss)
    stats = run(reducer)
    assert_matches(stats, reference(f64(values), f64(returns)))
    assert stats.value_loss == pytest.approx(np.mean([float(x) for x in losses]), rel=1e-6)
    assert stats.value_loss_max == pytest.approx(max(float(x) for x in losses), rel=1e-6)
    assert stats.error_quantile_n == returns.numel()


def test_several_rollout_calls_merge_like_one_buffer():
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(n, generator=gen) + k for k, n in enumerate((100, 37, 512))]
    r = [torch.randn(n, generator=gen) * 2 for n in (100, 37, 512)]
    split = ValueReducer()
    for a, b in zip(v, r):
        split.observe_rollout(a, b)
    stats = run(split)
    assert_matches(stats, reference(f64(torch.cat(v)), f64(torch.cat(r))))


@pytest.mark.parametrize("constant", [0.0, 0.1, -3.7, 1e30])
def test_explained_variance_is_undefined_for_constant_returns(constant):
    """0.1 is the trap: a float mean of 0.1s can be one ulp off, leaving a 'variance' of ~1e-34."""
    returns = torch.full((1000,), constant, dtype=torch.float64)
    values = torch.randn(1000, dtype=torch.float64)
    reducer = ValueReducer()
    reducer.observe_rollout(values, returns)
    stats = run(reducer)
    assert stats.explained_variance is None
    assert stats.return_std == 0.0
    assert stats.value_std == pytest.approx(values.numpy().std(), rel=1e-12)


def test_explained_variance_extremes():
    returns = torch.randn(500, dtype=torch.float64)
    for values, want in ((returns.clone(), 1.0), (torch.full((500,), 0.3, dtype=torch.float64), None)):
        reducer = ValueReducer()
        reducer.observe_rollout(values, returns)
        stats = run(reducer)
        if want is None:  # a constant critic explains nothing: EV = 1 - Var(r)/Var(r) = 0
            assert stats.explained_variance == pytest.approx(0.0, abs=1e-12)
            assert stats.value_std == 0.0
        else:
            assert stats.explained_variance == want


def test_nan_and_inf_show():
    returns = torch.randn(64)
    values = torch.randn(64)
    values[5] = math.nan
    reducer = ValueReducer()
    reducer.observe_rollout(values, returns)
    reducer.observe_minibatch(torch.tensor(0.5))
    reducer.observe_minibatch(torch.tensor(math.nan))
    stats = run(reducer)
    assert math.isnan(stats.explained_variance)
    for key in ("value_mean", "value_std", "value_min", "value_max", "error_mean", "error_p5", "error_p95"):
        assert math.isnan(getattr(stats, key)), key
    assert math.isnan(stats.value_loss) and math.isnan(stats.value_loss_max)
    assert stats.return_std == pytest.approx(f64(returns).std(), rel=1e-12)

    values = torch.randn(64)
    values[0] = math.inf
    reducer = ValueReducer()
    reducer.observe_rollout(values, returns)
    stats = run(reducer)
    assert stats.value_max == math.inf and stats.error_p95 == pytest.approx(
        np.quantile(f64(values - returns), 0.95)
    )


def test_value_loss_tensors_and_numbers_mix():
    reducer = ValueReducer()
    for loss in (torch.tensor(1.0), 3.0, torch.tensor([2.0, 4.0]), 0.5):  # a vector counts as its mean
        reducer.observe_minibatch(loss)
    stats = run(reducer)
    assert stats.value_loss == pytest.approx((1 + 3 + 3 + 0.5) / 4)
    assert stats.value_loss_max == 3.0
    assert stats.explained_variance is None and math.isnan(stats.value_mean)  # no rollout observed


def test_levels():
    returns, values = torch.randn(100), torch.randn(100)
    reducer = ValueReducer()
    reducer.observe_rollout(values, returns, level=TelemetryLevel.MINIMAL)
    stats = run(reducer, TelemetryLevel.MINIMAL)
    assert stats.explained_variance is not None and not math.isnan(stats.value_std)
    assert math.isnan(stats.error_p50) and stats.error_quantile_n == 0  # percentiles are NORMAL
    reducer.reset()
    reducer.observe_rollout(values, returns, level=TelemetryLevel.OFF)
    reducer.observe_minibatch(1.0, level=TelemetryLevel.OFF)
    assert reducer.pending(TelemetryLevel.OFF) == {}
    assert reducer.build({}, TelemetryLevel.OFF) is None
    assert math.isnan(run(reducer).value_loss)


def test_big_buffers_use_a_seeded_sample():
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(200_000, generator=gen)
    returns = torch.randn(200_000, generator=gen)
    exact = np.quantile(f64(values - returns), [0.05, 0.5, 0.95])
    runs = []
    for seed in (0, 0, 1):
        reducer = ValueReducer(seed=seed, quantile_max_exact=20_000)
        reducer.observe_rollout(values, returns)
        stats = run(reducer)
        assert stats.error_quantile_n == 20_000
        runs.append((stats.error_p5, stats.error_p50, stats.error_p95))
        # Standard error of a sample quantile of N(0, 2) from 20k draws is ~0.015-0.02.
        np.testing.assert_allclose(runs[-1], exact, atol=0.08)
        assert stats.value_std == pytest.approx(f64(values).std(), rel=1e-12)  # moments stay exact
    assert runs[0] == runs[1] and runs[0] != runs[2]  # reproducible from the seed


def test_quantiles_beyond_torch_quantile_limit():
    """torch.quantile refuses more than 2**24 elements; the reducer's percentiles do not."""
    n = 2**24 + 1
    x = torch.arange(n, dtype=torch.float32) / n
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    q, used = quantiles(x, (0.1, 0.5, 0.9), QuantileSampler(seed=0))
    assert used == QuantileSampler().max_exact
    np.testing.assert_allclose(q.numpy(), [0.1, 0.5, 0.9], atol=0.005)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_quantile_helper_matches_numpy_linear(n):
    x = torch.randn(n, dtype=torch.float64)
    qs = (0.0, 0.05, 0.1, 0.5, 0.9, 0.95, 1.0)
    got, used = quantiles(x, qs)
    assert used == n
    np.testing.assert_allclose(got.numpy(), np.quantile(x.numpy(), qs), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda r: r.observe_rollout(torch.randn(10), torch.randn(11)), ValueError, "values has shape (10,)"),
        (lambda r: r.observe_rollout(torch.randn(2, 5), torch.randn(10)), ValueError, "returns has shape"),
        (lambda r: r.observe_rollout(torch.empty(0), torch.empty(0)), ValueError, "values is empty"),
        (
            lambda r: r.observe_rollout(torch.randn(4), torch.arange(4)),
            TypeError,
            "returns must be a floating",
        ),
        (
            lambda r: r.observe_rollout(np.zeros(4), torch.zeros(4)),
            TypeError,
            "values must be a torch.Tensor",
        ),
        (lambda r: r.observe_minibatch("1.0"), TypeError, "value_loss"),
        (lambda r: r.observe_minibatch(torch.tensor(2)), TypeError, "value_loss must be a floating"),
        (lambda r: r.observe_minibatch(torch.empty(0)), ValueError, "value_loss is empty"),
    ],
)
def test_bad_input_names_the_argument(call, error, words):
    reducer = ValueReducer()
    with pytest.raises(error) as info:
        call(reducer)
    assert words in str(info.value)
    assert reducer.pending(NORMAL) == {}


def test_observe_and_pending_never_sync():
    reducer = ValueReducer(quantile_max_exact=1000)  # the sampled path too
    values, returns = torch.randn(5000), torch.randn(5000)
    with SyncCounter() as counter:
        reducer.observe_rollout(values, returns)
        for _ in range(8):
            reducer.observe_minibatch(torch.rand(()))
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]
    assert reducer.build(host, NORMAL).error_quantile_n == 1000


def test_real_critic_training_raises_explained_variance():
    """A real critic fitted by SGD: EV is measured on its predictions and rises as it learns."""
    torch.manual_seed(0)
    obs = torch.randn(512, 4)
    returns = obs @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(512)
    critic = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    evs = []
    for _update in range(3):
        reducer = ValueReducer()
        with torch.no_grad():
            values = critic(obs).squeeze(-1)
        reducer.observe_rollout(values, returns)
        for idx in torch.randperm(512).split(64):
            loss = 0.5 * (critic(obs[idx]).squeeze(-1) - returns[idx]).pow(2).mean()
            critic.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in critic.parameters():
                    p -= 0.05 * p.grad
            reducer.observe_minibatch(loss)
        stats = run(reducer)
        assert_matches(stats, reference(f64(values), f64(returns)))
        evs.append(stats.explained_variance)
    assert evs[-1] > evs[0] and evs[-1] > 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_sync_and_same_result():
    values, returns = torch.randn(4096), torch.randn(4096)
    reducer = ValueReducer(quantile_max_exact=1024)
    exact = ValueReducer()
    exact.observe_rollout(values, returns)
    cpu = run(exact)
    vc, rc = values.cuda(), returns.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reducer.observe_rollout(vc, rc)
        reducer.observe_minibatch(vc.abs().mean())
        pending = reducer.pending(NORMAL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = reducer.build(transfer(pending), NORMAL)
    assert stats.explained_variance == pytest.approx(cpu.explained_variance, rel=1e-9)
    assert stats.value_std == pytest.approx(cpu.value_std, rel=1e-9)
    assert stats.error_quantile_n == 1024


@pytest.mark.parametrize("limit", [1, 300, 10**9])
def test_rollout_calls_folded_early_merge_like_one_buffer(monkeypatch, limit):
    """Past FOLD_ELEMENTS kept elements the rollouts are reduced to moment rows early (bounded
    memory) and merged exactly; a loop refilling its buffers afterwards changes nothing."""
    import telemetry_core.reductions.advantage as advantage_module

    monkeypatch.setattr(advantage_module, "FOLD_ELEMENTS", limit)
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(n, generator=gen) * 3 + 100 * k for k, n in enumerate((100, 37, 512))]
    r = [torch.randn(n, generator=gen) * 2 - 50 * k for k, n in enumerate((100, 37, 512))]
    reducer = ValueReducer()
    for a, b in zip(v, r):
        buf_v, buf_r = a.clone(), b.clone()
        reducer.observe_rollout(buf_v, buf_r)
        buf_v.fill_(0.0)  # the loop's buffer is refilled by the next rollout
        buf_r.fill_(1.0)
    assert_matches(run(reducer), reference(f64(torch.cat(v)), f64(torch.cat(r))), rtol=1e-9)
