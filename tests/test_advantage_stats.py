"""AdvantageReducer (raw and normalised moments merged exactly across minibatches, returns with
percentiles) and EpisodeReducer, against float64 numpy; degenerate inputs; bad input; no host sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel
from telemetry_core.reductions.advantage import AdvantageReducer
from telemetry_core.reductions.episodes import EpisodeReducer
from telemetry_core.reductions.transfer import transfer

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


def run(reducer, level: TelemetryLevel = NORMAL):
    return reducer.build(transfer(reducer.pending(level)), level)


def f64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().double().cpu().numpy().reshape(-1)
    return np.asarray(t, dtype=np.float64).reshape(-1)


def ref_moments(x: np.ndarray) -> dict:
    """Population moments, like scipy.stats.skew(bias=True) / kurtosis(fisher=True, bias=True)."""
    mean = x.mean()
    c = x - mean
    m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
    constant = x.min() == x.max()
    return {
        "count": x.size,
        "mean": mean,
        "std": 0.0 if constant else math.sqrt(m2),
        "min": x.min(),
        "max": x.max(),
        "skew": None if constant else m3 / m2**1.5,
        "kurtosis": None if constant else m4 / m2**2 - 3,
        "frac_positive": np.mean(x > 0),
    }


def assert_moments(got, ref, rtol=1e-9, atol=1e-12) -> None:
    for key, want in ref.items():
        value = getattr(got, key)
        if want is None:
            assert value is None, key
        else:
            assert value == pytest.approx(want, rel=rtol, abs=atol, nan_ok=True), key


def ref_returns(x: np.ndarray) -> dict:
    p10, p50, p90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {"count": x.size, "mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
            "p10": p10, "p50": p50, "p90": p90}  # fmt: skip


def normalise(a: torch.Tensor) -> torch.Tensor:
    return (a - a.mean()) / (a.std() + 1e-8)


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2048,), (128, 8), (7, 5, 3), (3,)])
@pytest.mark.parametrize("dist", ["normal", "skewed", "heavy"])
def test_matches_float64_reference(shape, dist):
    gen = torch.Generator().manual_seed(hash((shape, dist)) % 2**31)
    base = torch.randn(shape, generator=gen)
    raw = {"normal": base * 2 + 0.5, "skewed": base.exp() - 1, "heavy": base**3}[dist]
    returns = raw + torch.randn(shape, generator=gen) * 5 + 10
    reducer = AdvantageReducer()
    reducer.observe_rollout(raw, returns)
    flat = raw.reshape(-1)
    minibatches = [normalise(flat[idx]) for idx in torch.randperm(flat.numel(), generator=gen).split(64)]
    for epoch in range(3):
        for mb in minibatches:
            reducer.observe_minibatch(mb if epoch == 0 else mb.flip(0))
    stats = run(reducer)
    assert_moments(stats.raw, ref_moments(f64(raw)))
    fed = np.concatenate([f64(mb) for mb in minibatches] * 3)
    assert_moments(stats.normalized, ref_moments(fed))
    assert_moments(stats.returns, ref_returns(f64(returns)))
    assert stats.returns.quantile_n == returns.numel()


def test_merging_many_minibatches_equals_one_batch_even_far_from_zero():
    """Groups whose means sit 1e6 apart from the overall mean: the binomial merge stays exact."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen, dtype=torch.float64) * s + off
             for n, s, off in ((100, 1.0, 1e6), (57, 3.0, -1e6), (300, 0.01, 5.0), (1, 1.0, 42.0))]  # fmt: skip
    split = AdvantageReducer()
    for p in parts:
        split.observe_minibatch(p)
    one = AdvantageReducer()
    one.observe_minibatch(torch.cat(parts))
    a, b = run(split).normalized, run(one).normalized
    ref = ref_moments(f64(torch.cat(parts)))
    assert_moments(a, ref, rtol=1e-9)
    assert_moments(b, ref, rtol=1e-9)


def test_bf16_and_fp16_advantages():
    for dtype in (torch.bfloat16, torch.float16):
        adv = torch.randn(300).to(dtype)
        reducer = AdvantageReducer()
        reducer.observe_rollout(adv, adv * 2)
        reducer.observe_minibatch(adv[:100])
        stats = run(reducer)
        assert_moments(stats.raw, ref_moments(f64(adv)))
        assert_moments(stats.normalized, ref_moments(f64(adv[:100])))


@pytest.mark.parametrize("value", [0.0, 0.1, -7.25])
def test_constant_advantages_have_no_skew_or_kurtosis(value):
    adv = torch.full((1000,), value, dtype=torch.float64)  # 0.1: the one-ulp mean trap
    reducer = AdvantageReducer()
    reducer.observe_rollout(adv, adv)
    reducer.observe_minibatch(adv[:10])
    reducer.observe_minibatch(adv[10:])
    stats = run(reducer)
    for m in (stats.raw, stats.normalized):
        assert m.std == 0.0 and m.skew is None and m.kurtosis is None
        assert m.mean == pytest.approx(value, abs=1e-12)
        assert m.frac_positive == (1.0 if value > 0 else 0.0)
    assert stats.returns.std == 0.0 and stats.returns.p50 == pytest.approx(value)


def test_nan_and_inf_show():
    adv = torch.randn(100)
    adv[3] = math.nan
    reducer = AdvantageReducer()
    reducer.observe_rollout(adv, torch.randn(100))
    reducer.observe_minibatch(torch.randn(10))
    reducer.observe_minibatch(adv[:10])
    stats = run(reducer)
    for m in (stats.raw, stats.normalized):
        for key in ("mean", "std", "min", "max", "skew", "kurtosis", "frac_positive"):
            assert math.isnan(getattr(m, key)), key
    assert not math.isnan(stats.returns.mean)

    ret = torch.randn(100)
    ret[0] = math.inf
    reducer = AdvantageReducer()
    reducer.observe_rollout(torch.randn(100), ret)
    stats = run(reducer)
    assert stats.returns.max == math.inf and math.isinf(stats.returns.mean)
    assert stats.returns.p50 == pytest.approx(np.quantile(f64(ret), 0.5))


def test_levels_below_normal_measure_nothing():
    reducer = AdvantageReducer()
    reducer.observe_rollout(torch.randn(10), torch.randn(10), level=TelemetryLevel.MINIMAL)
    reducer.observe_minibatch(torch.randn(10), level=TelemetryLevel.MINIMAL)
    assert reducer.pending(TelemetryLevel.MINIMAL) == {}
    assert reducer.build({}, TelemetryLevel.MINIMAL) is None
    assert run(reducer).raw.count == 0  # nothing was recorded at MINIMAL
    reducer.observe_minibatch(torch.randn(10))
    stats = run(reducer)
    assert stats.normalized.count == 10 and stats.raw.count == 0 and math.isnan(stats.returns.p50)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            lambda r: r.observe_rollout(torch.randn(4), torch.randn(5)),
            ValueError,
            "advantages has shape (4,)",
        ),
        (
            lambda r: r.observe_rollout(torch.randn(4, 1), torch.randn(4)),
            ValueError,
            "returns has shape (4,)",
        ),
        (
            lambda r: r.observe_rollout(torch.empty(0, 3), torch.empty(0, 3)),
            ValueError,
            "advantages is empty",
        ),
        (
            lambda r: r.observe_rollout(torch.arange(4), torch.randn(4)),
            TypeError,
            "advantages must be a floating",
        ),
        (lambda r: r.observe_minibatch(torch.empty(0)), ValueError, "advantages is empty"),
        (lambda r: r.observe_minibatch(torch.ones(3, dtype=torch.int8)), TypeError, "advantages"),
        (lambda r: r.observe_minibatch([1.0, 2.0]), TypeError, "advantages must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(call, error, words):
    reducer = AdvantageReducer()
    with pytest.raises(error) as info:
        call(reducer)
    assert words in str(info.value)
    assert reducer.pending(NORMAL) == {}


def test_observe_and_pending_never_sync():
    reducer = AdvantageReducer(quantile_max_exact=500)
    adv, ret = torch.randn(2048), torch.randn(2048)
    with SyncCounter() as counter:
        reducer.observe_rollout(adv, ret)
        for _ in range(4):
            for idx in torch.arange(2048).split(256):
                reducer.observe_minibatch(normalise(adv[idx]))
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]
    stats = reducer.build(host, NORMAL)
    assert stats.normalized.count == 4 * 2048 and stats.returns.quantile_n == 500


def test_real_gae_advantages():
    """Advantages and returns from GAE over a real gymnasium rollout (CartPole, random policy)."""
    gym = pytest.importorskip("gymnasium")
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(4)])
    obs, _ = envs.reset(seed=0)
    steps, gamma, lam = 64, 0.99, 0.95
    rewards = torch.zeros(steps, 4)
    dones = torch.zeros(steps, 4)
    values = torch.zeros(steps + 1, 4)
    critic = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for t in range(steps):
            values[t] = critic(torch.as_tensor(obs, dtype=torch.float32)).squeeze(-1)
            obs, rew, term, trunc, _ = envs.step(envs.action_space.sample())
            rewards[t] = torch.as_tensor(rew, dtype=torch.float32)
            dones[t] = torch.as_tensor(term | trunc, dtype=torch.float32)
        values[steps] = critic(torch.as_tensor(obs, dtype=torch.float32)).squeeze(-1)
    envs.close()
    adv = torch.zeros(steps, 4)
    last = torch.zeros(4)
    for t in reversed(range(steps)):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * values[t + 1] * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    returns = adv + values[:steps]
    reducer = AdvantageReducer()
    reducer.observe_rollout(adv, returns)
    for idx in torch.randperm(steps * 4).split(64):
        reducer.observe_minibatch(normalise(adv.reshape(-1)[idx]))
    stats = run(reducer)
    assert_moments(stats.raw, ref_moments(f64(adv)))
    assert_moments(stats.returns, ref_returns(f64(returns)))
    assert stats.normalized.mean == pytest.approx(0.0, abs=1e-6)
    assert stats.normalized.std == pytest.approx(1.0, abs=0.01)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_sync_and_same_result():
    adv, ret = torch.randn(4096), torch.randn(4096)
    reducer = AdvantageReducer(quantile_max_exact=1024)
    ac, rc = adv.cuda(), ret.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reducer.observe_rollout(ac, rc)
        for idx in torch.arange(4096, device="cuda").split(512):
            reducer.observe_minibatch(ac[idx])
        pending = reducer.pending(NORMAL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = reducer.build(transfer(pending), NORMAL)
    assert_moments(stats.raw, ref_moments(f64(adv)), rtol=1e-8)
    assert_moments(stats.normalized, ref_moments(f64(adv)), rtol=1e-8)
    assert stats.returns.quantile_n == 1024


# ------------------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_episodes_match_numpy(as_tensor):
    rng = np.random.default_rng(0)
    chunks = [(rng.normal(size=n) * 50, rng.integers(1, 500, size=n)) for n in (5, 0, 12)]
    reducer = EpisodeReducer()
    for ret, length in chunks:
        if as_tensor:
            reducer.observe(torch.as_tensor(ret, dtype=torch.float32), torch.as_tensor(length))
        else:
            reducer.observe(list(ret), list(length))
    stats = run(reducer)
    ret = np.concatenate([c[0] for c in chunks])
    length = np.concatenate([c[1] for c in chunks])
    if as_tensor:
        ret = ret.astype(np.float32).astype(np.float64)
    assert stats.count == 17
    assert stats.return_mean == pytest.approx(ret.mean(), rel=1e-12)
    assert stats.return_min == ret.min() and stats.return_max == ret.max()
    assert stats.length_mean == pytest.approx(length.mean(), rel=1e-12)


def test_episodes_mixed_empty_nan_and_integer():
    reducer = EpisodeReducer()
    reducer.observe([], [])
    reducer.observe(torch.empty(0))
    assert run(reducer).count == 0 and math.isnan(run(reducer).return_mean)
    reducer.observe([1, 2, 3], [10, 20, 30])  # integers are fine here
    reducer.observe(torch.tensor([4, 5]), torch.tensor([40, 50]))  # integer tensors too
    stats = run(reducer)
    assert (stats.count, stats.return_mean, stats.return_min, stats.return_max) == (5, 3.0, 1.0, 5.0)
    assert stats.length_mean == 30.0
    reducer.observe(torch.tensor([math.nan]))
    stats = run(reducer)
    assert stats.count == 6 and math.isnan(stats.return_mean) and math.isnan(stats.return_min)
    assert stats.length_mean == 30.0  # lengths of the episodes that reported one
    reducer.reset()
    reducer.observe([1.0, math.nan])
    stats = run(reducer)
    assert math.isnan(stats.return_max) and math.isnan(stats.length_mean)


def test_episodes_bad_input_and_levels():
    reducer = EpisodeReducer()
    with pytest.raises(ValueError, match="episode_lengths has 2 entries but episode_returns has 3"):
        reducer.observe([1.0, 2.0, 3.0], [1, 2])
    with pytest.raises(ValueError, match="episode_lengths has 1 entries"):
        reducer.observe(torch.ones(2), torch.ones(1))
    with pytest.raises(TypeError, match="episode_returns must be a real-valued tensor"):
        reducer.observe(torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="episode_returns must be a sequence of numbers"):
        reducer.observe(["a", "b"])
    with pytest.raises(ValueError, match="episode_returns must be one-dimensional"):
        reducer.observe([[1.0], [2.0]])
    reducer.observe([1.0], level=TelemetryLevel.OFF)
    assert reducer.build({}, TelemetryLevel.OFF) is None
    assert run(reducer).count == 0
    reducer.observe([1.0], level=TelemetryLevel.MINIMAL)
    assert run(reducer, TelemetryLevel.MINIMAL).count == 1


def test_episodes_never_sync():
    reducer = EpisodeReducer()
    with SyncCounter() as counter:
        reducer.observe(torch.randn(7), torch.arange(1, 8))
        reducer.observe([1.0, 2.0], [3, 4])
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    stats = reducer.build(transfer(pending), NORMAL)
    assert stats.count == 9 and stats.length_mean == pytest.approx((28 + 7) / 9)


# ------------------------------------------------------------------------------------------------
# Deferred work: private copies, early folds, per-call cost
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 150, 10**9])
def test_early_folds_merge_exactly_even_far_from_zero(monkeypatch, limit):
    """Stored minibatches are reduced early past FOLD_ELEMENTS (limit 1: every minibatch is its own
    moment row, merged by the binomial formula); the result is that of one batch either way."""
    import telemetry_core.reductions.advantage as advantage_module

    monkeypatch.setattr(advantage_module, "FOLD_ELEMENTS", limit)
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen, dtype=torch.float64) * s + off
             for n, s, off in ((100, 1.0, 1e6), (57, 3.0, -1e6), (300, 0.01, 5.0), (1, 1.0, 42.0))]  # fmt: skip
    raw = torch.cat(parts) * 0.5
    reducer = AdvantageReducer()
    for _ in range(2):  # two rollout calls, too
        reducer.observe_rollout(raw, raw + 1.0)
    for p in parts:
        reducer.observe_minibatch(p)
    stats = run(reducer)
    assert_moments(stats.normalized, ref_moments(f64(torch.cat(parts))), rtol=1e-9)
    assert_moments(stats.raw, ref_moments(f64(torch.cat([raw, raw]))), rtol=1e-9)
    assert_moments(stats.returns, ref_returns(f64(torch.cat([raw, raw]) + 1.0)), rtol=1e-9)


def test_a_loop_that_refills_its_buffers_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    raw, returns = torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    minibatches = [normalise(raw[i : i + 64]) for i in range(0, 256, 64)]
    reducer = AdvantageReducer()
    buf_raw, buf_ret, buf_mb = raw.clone(), returns.clone(), torch.empty(64)
    reducer.observe_rollout(buf_raw, buf_ret)
    for mb in minibatches:
        buf_mb.copy_(mb)
        reducer.observe_minibatch(buf_mb)
    for t in (buf_raw, buf_ret, buf_mb):
        t.fill_(-7.0)  # the loop reuses its buffers before pending()
    stats = run(reducer)
    assert_moments(stats.raw, ref_moments(f64(raw)))
    assert_moments(stats.returns, ref_returns(f64(returns)))
    assert_moments(stats.normalized, ref_moments(np.concatenate([f64(mb) for mb in minibatches])))


def test_observe_minibatch_is_one_copy():
    """Per minibatch a single private copy; the moments wait for pending() (regression guard)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    reducer = AdvantageReducer()
    adv = torch.randn(128)
    with KernelCounter() as counter:
        reducer.observe_minibatch(adv)
    assert counter.ops == ["unsqueeze", "clone"]


# ------------------------------------------------------------------------------------------------
# Boundaries: comparisons at exactly their limits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folded", [False, True], ids=["at-once", "folded-early"])
def test_frac_positive_is_strict_and_quantiles_exact_up_to_their_limit(folded, monkeypatch):
    """frac_positive counts x > 0: +0 and -0 are not positive, the smallest subnormal is, in the raw
    advantages (rollout path) and in the normalised ones (minibatch path). Percentiles use every
    element up to exactly ``quantile_max_exact`` elements and a sample of that size beyond.
    "folded-early" forces the streaming path (moment rows merged) that large updates take.
    Mutation check (by hand): ``> 0`` -> ``>= 0`` in either moment path, and ``n > max_exact`` ->
    ``n >= max_exact`` in the quantiles, each fail this test."""
    import telemetry_core.reductions.advantage as advantage_module

    if folded:
        monkeypatch.setattr(advantage_module, "FOLD_ELEMENTS", 0)
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    x = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0, -1.0])
    reducer = AdvantageReducer(quantile_max_exact=6)
    reducer.observe_rollout(x, x + 1.0)
    reducer.observe_minibatch(x.clone())
    stats = run(reducer)
    assert stats.raw.frac_positive == 2 / 6
    assert stats.normalized.frac_positive == 2 / 6
    assert stats.returns.quantile_n == 6  # exactly the limit: every element
    want = ref_returns(f64(x + 1.0))
    assert [stats.returns.p10, stats.returns.p50, stats.returns.p90] == pytest.approx(
        [want["p10"], want["p50"], want["p90"]], rel=1e-12
    )
    reducer = AdvantageReducer(quantile_max_exact=5)
    reducer.observe_rollout(x, x + 1.0)
    assert run(reducer).returns.quantile_n == 5  # one past it: a sample of the limit's size
