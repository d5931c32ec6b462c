"""GradientReducer against a float64 reference, on real gradients and on hand-made hard cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import telemetry_core.reductions.gradients as gradients_module
import telemetry_core.reductions.gradients.categories as categories_module
import telemetry_core.reductions.gradients.plan as plan_module
from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.gradients import (
    FOLD_EVERY,
    ROTATION,
    GradientReducer,
    category_boundaries,
    default_groups,
    resolve_groups,
    sample_plan,
)
from telemetry_core.reductions.transfer import transfer
from telemetry_core.schema import GradientStats

L = TelemetryLevel
TH = Thresholds()


@pytest.fixture(autouse=True, params=["flat", "per-call", "aminmax"])
def cpu_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs the three CPU paths: small buckets kept as one flat copy per call and reduced in
    the fold ("flat", the default below FLAT_MAX elements) and the per-call fused kernels used for
    larger buckets and on CUDA ("per-call", forced here by FLAT_MAX = 0), where each tensor's max |g|
    comes from one foreach abs + max for the tensors under BIG_TENSOR elements and from its own
    aminmax for the larger ones ("aminmax": BIG_TENSOR = 64 as well, which splits SHAPES between
    the two and the tests' larger models mostly to aminmax)."""
    if request.param != "flat":
        monkeypatch.setattr(plan_module, "FLAT_MAX", 0)
    if request.param == "aminmax":
        monkeypatch.setattr(plan_module, "BIG_TENSOR", 64)
    return str(request.param)


EDGES = np.array(TH.grad_hist_edges, dtype=np.float64)
MATERIALISING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


# --------------------------------------------------------------------------------------------
# The float64 reference
# --------------------------------------------------------------------------------------------


def ref_stats(
    calls: list[list[torch.Tensor | None]],
    mgn: float,
    groups: dict[str, list[int]],
    examined: list[list[np.ndarray | None]] | None = None,
) -> dict:
    """Every statistic of GradientStats in float64 numpy, from the gradients of each call.

    ``examined[c][p]`` are the flat indices binned for parameter p in call c (None: all of them).
    """
    n_params = len(calls[0])
    totals, clipped, maxabs, vanish, explode, model_normd = [], 0, [], [], [], []
    p_sum, p_cnt = np.zeros(n_params), np.zeros(n_params)
    g_sum = {g: 0.0 for g in groups}
    g_nsum = {g: 0.0 for g in groups}
    g_cnt = {g: 0 for g in groups}
    hist = np.zeros(len(EDGES) + 2, dtype=np.int64)
    nan_count = inf_count = nan_params = inf_params = 0
    n_examined = n_total = 0
    for c, grads in enumerate(calls):
        norms = {}
        for p, g in enumerate(grads):
            if g is None or g.numel() == 0:
                continue
            a = g.detach().double().reshape(-1).numpy()
            norms[p] = math.sqrt(float(np.sum(a * a)))
            maxabs.append(float(np.max(np.abs(a))) if not np.isnan(a).any() else math.nan)
            has_nan, has_inf = bool(np.isnan(a).any()), bool(np.isinf(a).any())
            nan_params += has_nan
            inf_params += has_inf and not has_nan
            idx = None if examined is None else examined[c][p]
            s = a if idx is None else a[idx]
            scale = a.size / s.size
            n_examined += s.size
            n_total += a.size
            nan_s, inf_s = int(np.isnan(s).sum()), int(np.isinf(s).sum())
            if has_nan:
                nan_count += max(1, round(nan_s * scale))
                inf_count += round(inf_s * scale)
            elif has_inf:
                inf_count += max(1, round(inf_s * scale))
            m = np.abs(s[np.isfinite(s)])
            hist[0] += int(np.sum(m == 0))
            pos = m[m > 0]
            hist[1:] += np.bincount(np.searchsorted(EDGES, pos, side="right"), minlength=len(EDGES) + 1)
        total = math.sqrt(sum(v * v for v in norms.values()))
        totals.append(total)
        clipped += total > mgn
        numel = sum(grads[p].numel() for p in norms)
        model_normd.append(total / math.sqrt(numel))
        vanish.append(sum(v < TH.grad_vanishing_rel * mgn for v in norms.values()))
        explode.append(sum(v > TH.grad_exploding_rel * mgn for v in norms.values()))
        for p, v in norms.items():
            p_sum[p] += v
            p_cnt[p] += 1
        for gname, members in groups.items():
            present = [p for p in members if p in norms]
            if present:
                gn = math.sqrt(sum(norms[p] ** 2 for p in present))
                g_sum[gname] += gn
                g_nsum[gname] += gn / math.sqrt(sum(grads[p].numel() for p in present))
                g_cnt[gname] += 1
    model = float(np.mean(model_normd))
    return {
        "total_norm": float(np.mean(totals)),
        "total_norm_max": max(totals),
        "total_norm_last": totals[-1],
        "clip_rate": clipped / len(calls),
        "max_abs": math.nan if any(math.isnan(v) for v in maxabs) else max(maxabs),
        "nan_count": nan_count,
        "inf_count": inf_count,
        "nan_params": nan_params,
        "inf_params": inf_params,
        "hist_counts": hist.tolist(),
        "zero_fraction": hist[0] / n_examined,
        "examined_elements": n_examined,
        "total_elements": n_total,
        "param_norms": [s / c if c else math.nan for s, c in zip(p_sum, p_cnt)],
        "group_norms": {g: g_sum[g] / g_cnt[g] if g_cnt[g] else math.nan for g in groups},
        "group_norms_normalized": {g: g_nsum[g] / g_cnt[g] if g_cnt[g] else math.nan for g in groups},
        "group_ratios": {
            g: (g_nsum[g] / g_cnt[g]) / model if g_cnt[g] and model > 0 else math.nan for g in groups
        },
        "vanishing_count": max(vanish),
        "exploding_count": max(explode),
    }


def close(a: float, b: float, rel: float = 2e-5) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-30)


def assert_matches(stats: GradientStats, ref: dict, rel: float = 2e-5) -> None:
    for key, want in ref.items():
        got = getattr(stats, key)
        if isinstance(want, dict):
            assert set(got) == set(want), key
            for g in want:
                assert close(got[g], want[g], rel), (key, g, got[g], want[g])
        elif isinstance(want, list) and key == "param_norms":
            assert len(got) == len(want)
            for i, (x, y) in enumerate(zip(got, want)):
                assert close(x, y, rel), (key, i, x, y)
        elif isinstance(want, float):
            assert close(got, want, rel), (key, got, want)
        else:
            assert got == want, (key, got, want)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_params(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32
) -> list[tuple[str, nn.Parameter]]:
    return [(name, nn.Parameter(torch.zeros(shape, dtype=dtype))) for name, shape in shapes.items()]


SHAPES = {
    "lstm.weight_ih_l0": (64, 12),  # LSTM-like 4h x in
    "lstm.weight_hh_l0": (64, 16),
    "lstm.bias_ih_l0": (64,),
    "lstm.bias_hh_l0": (64,),
    "trunk.weight": (3, 4, 5),  # a 3-D (conv-like) tensor
    "actor.scale": (),  # a scalar parameter
    "actor.weight": (5, 16),
    "critic.weight": (1, 16),
    "critic.bias": (1,),
}


def random_grad(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Log-uniform magnitudes over 1e-10..10 with random signs and some exact zeros: every bin is hit."""
    n = int(np.prod(shape)) if shape else 1
    mag = torch.pow(10.0, torch.rand(n, generator=gen, dtype=torch.float64) * 11 - 10)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    g = mag * sign
    g[torch.rand(n, generator=gen) < 0.1] = 0.0
    return g.to(dtype).reshape(shape)


def run(
    reducer: GradientReducer, calls: list[list[torch.Tensor | None]], level: L = L.NORMAL
) -> GradientStats:
    reducer.reset()
    for grads in calls:
        for p, g in zip(reducer.params, grads):
            p.grad = g
        reducer.observe(level)
    return reducer.build(transfer(reducer.pending(level)), level)


# --------------------------------------------------------------------------------------------
# Exact statistics (every element)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_statistic_matches_float64_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    named = make_params(SHAPES)
    groups = resolve_groups(named, {"lstm": "lstm", "heads": ["actor.", "critic"]})
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    calls = []
    for c in range(3):
        scale = [1e-4, 1.0, 100.0][c]  # calls below and above the clipping cap
        calls.append([random_grad(p.shape, gen) * scale for _, p in named])
    stats = run(reducer, calls)
    ref = ref_stats(calls, 0.5, groups)
    assert_matches(stats, ref)
    assert stats.calls == 3 and stats.skipped_params == 0
    assert 0 < stats.clip_rate < 1
    assert sum(stats.hist_counts) == stats.examined_elements == stats.total_elements
    assert all(c > 0 for c in stats.hist_counts[1:])  # log-uniform data reaches every bin


def test_hist_edges_are_exact_at_the_boundaries() -> None:
    """The nearest value to every edge and its two neighbours (in the gradient's own dtype), both
    signs, land in the bin float64 says."""
    int_of = {
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }
    for dtype, int_dtype in int_of.items():
        patterns = set()
        for e in TH.grad_hist_edges:  # (edges below a dtype's smallest subnormal round to 0 there)
            bits = int(torch.tensor(e, dtype=torch.float64).to(dtype).view(int_dtype))
            patterns |= {b for b in (bits - 1, bits, bits + 1) if b >= 0}
        g = torch.tensor(sorted(patterns), dtype=int_dtype).view(dtype)
        g = torch.cat([g, -g])
        named = [("w", nn.Parameter(torch.zeros(g.shape, dtype=dtype)))]
        reducer = GradientReducer(named, max_grad_norm=1.0, thresholds=TH, groups={}, sample_size=None)
        stats = run(reducer, [[g]])
        want = ref_stats([[g]], 1.0, {})["hist_counts"]
        assert stats.hist_counts == want, dtype
        assert sum(1 for c in want[1:] if c) >= 5  # the values really straddle the edges


def test_category_boundaries_round_edges_up_into_each_dtype() -> None:
    for dtype, int_dtype in (
        (torch.float16, torch.int16),
        (torch.bfloat16, torch.int16),
        (torch.float32, torch.int32),
        (torch.float64, torch.int64),
    ):
        bounds = category_boundaries(TH.grad_hist_edges, dtype)
        assert len(bounds) == len(TH.grad_hist_edges) + 3
        assert bounds == sorted(bounds)
        for edge, bits in zip(TH.grad_hist_edges, bounds[1:-2]):
            value = torch.tensor([bits, bits - 1], dtype=int_dtype).view(dtype).double()
            assert value[0] >= edge, (dtype, edge)
            assert bits == 1 or value[1] < edge, (dtype, edge)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_do_not_overflow(dtype: torch.dtype) -> None:
    """fp16 squares overflow above 256; norms must come from float32 accumulation."""
    gen = torch.Generator().manual_seed(3)
    named = make_params({"a.w": (32, 32), "a.b": (32,), "b.w": (8, 8)}, dtype)
    calls = []
    for _ in range(2):
        grads = [random_grad(p.shape, gen, dtype) for _, p in named]
        grads[0][0, :8] = 300.0  # 300^2 = 90000 > 65504: overflows fp16
        grads[0][1, :] = (
            1000.0 if dtype == torch.float16 else 1e18
        )  # norm far above fp16 range, squares within float32
        calls.append(grads)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups={"a": [0, 1]}, sample_size=None)
    stats = run(reducer, calls)
    ref = ref_stats(calls, 0.5, {"a": [0, 1]})
    assert math.isfinite(stats.total_norm) and stats.inf_count == 0
    assert_matches(stats, ref, rel=1e-5)


def test_mixed_dtypes_in_one_model() -> None:
    gen = torch.Generator().manual_seed(4)
    named = [
        ("lstm.w", nn.Parameter(torch.zeros(64, 16, dtype=torch.bfloat16))),
        ("actor.w", nn.Parameter(torch.zeros(5, 16))),
        ("actor.b", nn.Parameter(torch.zeros(5, dtype=torch.float16))),
        ("critic.w", nn.Parameter(torch.zeros(1, 16, dtype=torch.float64))),
    ]
    calls = [[random_grad(p.shape, gen, p.dtype) for _, p in named] for _ in range(2)]
    groups = {"actor": [1, 2], "all": [0, 1, 2, 3]}
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    stats = run(reducer, calls)
    assert_matches(stats, ref_stats(calls, 0.5, groups))


# --------------------------------------------------------------------------------------------
# Non-finite and degenerate gradients
# --------------------------------------------------------------------------------------------


def test_nan_inf_and_zero_counts_exact_when_every_element_is_binned() -> None:
    named = make_params({"a": (10, 10), "b": (50,), "c": (7,), "d": (4,)})
    a = torch.full((10, 10), 0.01)
    a[0, 0], a[3, 3], a[5, 5] = math.nan, math.inf, -math.inf  # NaN and inf in one tensor
    b = torch.zeros(50)
    b[7] = -math.inf
    b[8] = math.inf
    c = torch.full((7,), 2.0)
    d = torch.zeros(4)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups={}, sample_size=None)
    stats = run(reducer, [[a, b, c, d]])
    ref = ref_stats([[a, b, c, d]], 0.5, {})
    assert_matches(stats, ref)
    assert stats.nan_count == 1 and stats.inf_count == 4
    assert stats.nan_params == 1  # "a" holds NaN (and inf, which NaN hides from the exact flag)
    assert stats.inf_params == 1  # "b"
    assert math.isnan(stats.total_norm) and math.isnan(stats.max_abs)
    assert stats.clip_rate == 0.0  # a NaN norm is not "above the cap"
    assert math.isnan(stats.param_norms[0]) and stats.param_norms[1] == math.inf
    assert stats.param_norms[3] == 0.0


def test_inf_only_update() -> None:
    named = make_params({"a": (20,), "b": (5,)})
    a = torch.full((20,), 1e-3)
    a[4] = math.inf
    stats = run(
        GradientReducer(named, max_grad_norm=0.5, thresholds=TH, sample_size=None), [[a, torch.ones(5)]]
    )
    assert stats.total_norm == math.inf and stats.max_abs == math.inf
    assert stats.clip_rate == 1.0 and stats.inf_params == 1 and stats.inf_count == 1
    assert stats.nan_count == 0 and stats.nan_params == 0
    assert stats.exploding_count == 1  # inf > 10 x cap


def test_all_zero_gradients() -> None:
    named = make_params(SHAPES)
    zeros = [torch.zeros(p.shape) for _, p in named]
    groups = default_groups(named)
    stats = run(
        GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None), [zeros]
    )
    n = sum(p.numel() for _, p in named)
    assert stats.total_norm == 0.0 and stats.max_abs == 0.0 and stats.clip_rate == 0.0
    assert stats.zero_fraction == 1.0 and stats.hist_counts[0] == n and sum(stats.hist_counts) == n
    assert stats.vanishing_count == len(named) and stats.exploding_count == 0
    assert all(math.isnan(r) for r in stats.group_ratios.values())  # 0 / 0: undefined, not 0
    assert all(v == 0.0 for v in stats.group_norms.values())


# --------------------------------------------------------------------------------------------
# Sampled mode (the default)
# --------------------------------------------------------------------------------------------


def examined_indices(numels: list[int], present: list[int], sample_size: int, rounds: list[int]) -> list:
    out = []
    for r in rounds:
        plan = sample_plan([numels[p] for p in present], sample_size, r % ROTATION)
        row: list[np.ndarray | None] = [None] * len(numels)
        for p, (off, stride, count) in zip(present, plan):
            row[p] = off + stride * np.arange(count)
        out.append(row)
    return out


def test_sampled_statistics_match_reference_on_the_examined_elements() -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = {"lstm.w": (256, 64), "lstm.b": (256,), "actor.w": (3, 64), "critic.w": (1, 64), "s": ()}
    named = make_params(shapes)
    groups = default_groups(named)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=500)
    calls = [[random_grad(p.shape, gen) for _, p in named] for _ in range(4)]
    stats = run(reducer, calls)
    numels = [p.numel() for _, p in named]
    examined = examined_indices(numels, list(range(len(named))), 500, list(range(4)))
    ref = ref_stats(calls, 0.5, groups, examined)
    assert_matches(stats, ref)
    assert stats.examined_elements < stats.total_elements
    assert stats.total_elements == 4 * sum(numels)


def test_sample_plan_stays_in_bounds_and_rotates() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        numels = [int(v) for v in rng.integers(0, 100_000, size=rng.integers(1, 12))]
        size = int(rng.integers(1, 50_000))
        counts = None
        for r in range(ROTATION):
            plan = sample_plan(numels, size, r)
            for n, (off, stride, count) in zip(numels, plan):
                assert count == 0 or off + (count - 1) * stride <= n - 1
                assert count >= min(n, 32) and stride >= 1
            now = [c for _, _, c in plan]
            assert counts is None or now == counts  # fixed count per tensor, whatever the round
            counts = now
    offsets = {sample_plan([1_000_000], 1000, r)[0][0] for r in range(ROTATION)}
    assert len(offsets) == ROTATION  # successive calls look at different elements
    assert sample_plan([10, 20], None, 3) == [(0, 1, 10), (0, 1, 20)]


def test_nan_estimates_keep_their_guarantees_when_sampled() -> None:
    named = make_params({"big": (200, 100), "all_nan": (100, 100), "small": (16,), "clean": (300, 100)})
    big = torch.full((200, 100), 1e-3)
    all_nan = torch.full((100, 100), math.nan)
    small = torch.ones(16)
    small[3] = math.inf
    clean = torch.full((300, 100), 1e-2)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups={}, sample_size=256)
    plan = sample_plan([p.numel() for _, p in named], 256, 0)
    off, stride, _ = plan[0]
    assert stride > 2
    big.view(-1)[off + 1] = math.nan  # one NaN the sample cannot see
    stats = run(reducer, [[big, all_nan, small, clean]])
    assert stats.nan_params == 2 and stats.inf_params == 1
    assert stats.nan_count == 1 + 100 * 100  # >= 1 for the unseen NaN, exact for the all-NaN tensor
    assert stats.inf_count == 1  # the small tensor is examined in full
    assert stats.examined_elements < stats.total_elements


# --------------------------------------------------------------------------------------------
# Missing gradients, levels, accumulation
# --------------------------------------------------------------------------------------------


def test_parameters_without_gradients_are_counted_skips() -> None:
    gen = torch.Generator().manual_seed(6)
    named = make_params({"lstm.w": (16, 8), "head_a.w": (2, 8), "head_b.w": (3, 8), "frozen.w": (4, 4)})
    groups = {"lstm": [0], "head_b": [2], "frozen": [3], "heads": [1, 2]}
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    calls = [
        [random_grad((16, 8), gen), random_grad((2, 8), gen), None, None],
        [random_grad((16, 8), gen), None, random_grad((3, 8), gen), None],
        [random_grad((16, 8), gen), random_grad((2, 8), gen), random_grad((3, 8), gen), None],
    ]
    stats = run(reducer, calls)
    assert_matches(stats, ref_stats(calls, 0.5, groups))
    assert stats.skipped_params == 3 and reducer.skipped_params == 3
    assert math.isnan(stats.param_norms[3]) and math.isnan(stats.group_norms["frozen"])
    assert stats.vanishing_count <= 3  # the frozen parameter is not "vanishing"


def test_no_gradient_at_all_is_not_a_call() -> None:
    named = make_params({"a": (4,), "b": (2,)})
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH)
    reducer.observe(L.NORMAL)
    assert reducer.calls == 0 and reducer.skipped_params == 2
    assert reducer.pending(L.NORMAL) == {}
    stats = reducer.build({}, L.NORMAL)
    assert stats.calls == 0 and stats.skipped_params == 2 and math.isnan(stats.total_norm)


def test_levels() -> None:
    gen = torch.Generator().manual_seed(7)
    named = make_params(SHAPES)
    calls = [[random_grad(p.shape, gen) for _, p in named]]
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, sample_size=None)
    reducer.reset()
    for p, g in zip(reducer.params, calls[0]):
        p.grad = g
    reducer.observe(L.OFF)
    assert reducer.calls == 0 and reducer.pending(L.OFF) == {}
    minimal = run(reducer, calls, L.MINIMAL)
    ref = ref_stats(calls, 0.5, {})
    for key in ("total_norm", "total_norm_max", "total_norm_last", "clip_rate", "max_abs"):
        assert close(getattr(minimal, key), ref[key]), key
    assert minimal.param_norms == [] and minimal.hist_counts == [] and minimal.zero_fraction is None
    keys = list(reducer.pending(L.MINIMAL))  # the histogram, then each fold's rows and counts
    assert keys[0] == "grad.stats" and all(k.startswith("grad.") for k in keys)
    normal = run(reducer, calls, L.NORMAL)
    assert len(normal.param_norms) == len(named) and normal.zero_fraction is not None


def test_accumulation_beyond_the_fold_interval() -> None:
    """More calls than FOLD_EVERY: partial folds combine to the same statistics."""
    gen = torch.Generator().manual_seed(8)
    named = make_params({"a.w": (8, 4), "a.b": (8,), "c.w": (2, 8)})
    groups = default_groups(named)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    calls = [
        [random_grad(p.shape, gen) * (10.0 if c % 3 else 0.01) for _, p in named]
        for c in range(FOLD_EVERY + 9)
    ]
    calls[FOLD_EVERY + 2][1] = None
    stats = run(reducer, calls)
    assert stats.calls == FOLD_EVERY + 9
    assert_matches(stats, ref_stats(calls, 0.5, groups))


def test_reset_starts_a_new_update() -> None:
    gen = torch.Generator().manual_seed(9)
    named = make_params({"a": (30,), "b": (3, 3)})
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups={}, sample_size=None)
    first = [[random_grad(p.shape, gen) * 50 for _, p in named] for _ in range(3)]
    second = [[random_grad(p.shape, gen) for _, p in named]]
    run(reducer, first)
    stats = run(reducer, second)
    assert stats.calls == 1
    assert_matches(stats, ref_stats(second, 0.5, {}))


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def test_resolve_groups_by_prefix_and_by_parameters() -> None:
    model = nn.ModuleDict(
        {
            "actor": nn.Linear(4, 2),
            "actor_head": nn.Linear(2, 2),
            "critic": nn.Linear(4, 1),
            "lstm": nn.LSTM(3, 4),
        }
    )
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    groups = resolve_groups(
        named,
        {
            "actor": "actor",
            "actor_dot": "actor.",
            "pair": ["critic", "lstm."],
            "by_params": list(model["critic"].parameters()),
            "one": model["actor_head"].weight,
        },
    )
    assert [names[i] for i in groups["actor"]] == ["actor.weight", "actor.bias"]  # not actor_head
    assert groups["actor_dot"] == groups["actor"]
    assert {names[i] for i in groups["pair"]} == {
        "critic.weight",
        "critic.bias",
        *[n for n in names if n.startswith("lstm")],
    }
    assert [names[i] for i in groups["by_params"]] == ["critic.weight", "critic.bias"]
    assert [names[i] for i in groups["one"]] == ["actor_head.weight"]


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ({"policy": "policy"}, ValueError, "groups['policy']"),
        ({"x": ["actor", "nope."]}, None, None),
        ({"bad": [torch.zeros(3)]}, ValueError, "not a parameter"),
        ({"mixed": ["actor", torch.zeros(1)]}, TypeError, "mixes"),
        ({"empty": []}, ValueError, "groups['empty'] is empty"),
        ({"num": 3}, TypeError, "groups['num']"),
        ({"": "actor"}, TypeError, "non-empty"),
        (["actor"], TypeError, "mapping"),
    ],
)
def test_resolve_groups_rejects_bad_specs(spec, error, words) -> None:  # type: ignore[no-untyped-def]
    named = list(nn.ModuleDict({"actor": nn.Linear(2, 2), "critic": nn.Linear(2, 1)}).named_parameters())
    if error is None:  # a list of prefixes matches when any of them does
        assert resolve_groups(named, spec) == {"x": [0, 1]}
        return
    with pytest.raises(error, match=None) as info:
        resolve_groups(named, spec)
    assert words in str(info.value)


def test_default_groups_are_top_level_modules() -> None:
    named = make_params(SHAPES)
    groups = default_groups(named)
    assert set(groups) == {"lstm", "trunk", "actor", "critic"}
    assert groups["critic"] == [7, 8]
    assert default_groups(make_params({"net.a": (2,), "net.b": (2,)})) == {}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_grad_norm": 0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": -1}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": math.inf}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": True}, TypeError, "max_grad_norm"),
        ({"max_grad_norm": "0.5"}, TypeError, "max_grad_norm"),
        ({"thresholds": {"grad_drift": 0.5}}, TypeError, "thresholds"),
        ({"groups": {"g": [5]}}, ValueError, "groups['g']"),
        ({"groups": {"g": []}}, ValueError, "groups['g']"),
        ({"groups": {"g": "actor"}}, TypeError, "resolve_groups"),
        ({"sample_size": 0}, ValueError, "sample_size"),
        ({"sample_size": 1.5}, ValueError, "sample_size"),
        ({"sample_size": "all"}, ValueError, "sample_size"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, words) -> None:  # type: ignore[no-untyped-def]
    args = {"max_grad_norm": 0.5, "thresholds": TH, "groups": None, **kwargs}
    with pytest.raises(error) as info:
        GradientReducer(make_params({"a": (2,), "b": (3,)}), **args)
    assert words in str(info.value)


def test_bad_parameter_lists_name_the_entry() -> None:
    with pytest.raises(ValueError, match="named_params is empty"):
        GradientReducer([], max_grad_norm=0.5, thresholds=TH)
    with pytest.raises(TypeError, match=r"named_params\[1\] \('b'\) has dtype torch.int64"):
        GradientReducer(
            [("a", nn.Parameter(torch.zeros(2))), ("b", torch.zeros(2, dtype=torch.int64))],
            max_grad_norm=0.5,
            thresholds=TH,
        )
    with pytest.raises(TypeError, match=r"named_params\[0\]"):
        GradientReducer([("a", [1.0, 2.0])], max_grad_norm=0.5, thresholds=TH)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"named_params\[0\] must be a \(name, parameter\) pair"):
        GradientReducer([nn.Parameter(torch.zeros(2))], max_grad_norm=0.5, thresholds=TH)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="twice"):
        GradientReducer(make_params({"a": (2,)}) * 2, max_grad_norm=0.5, thresholds=TH)


def test_integer_max_grad_norm_is_accepted() -> None:
    reducer = GradientReducer(make_params({"a": (2,)}), max_grad_norm=1, thresholds=TH)
    assert reducer.max_grad_norm == 1.0 and isinstance(reducer.max_grad_norm, float)


# --------------------------------------------------------------------------------------------
# Host syncs
# --------------------------------------------------------------------------------------------


class CountMaterialisations(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in MATERIALISING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sample_size", ["auto", None])
def test_observe_and_pending_never_materialise(sample_size) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(10)
    named = [*make_params(SHAPES), ("half.w", nn.Parameter(torch.zeros(6, 6, dtype=torch.bfloat16)))]
    groups = default_groups(named)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=sample_size)
    with CountMaterialisations() as mode:
        for level in (L.MINIMAL, L.NORMAL, L.DEBUG):
            reducer.reset()
            for c in range(3):  # the first call builds and caches the plan inside the mode
                for i, (_, p) in enumerate(named):
                    p.grad = None if (i == 2 and c == 1) else random_grad(p.shape, gen, p.dtype)
                reducer.observe(level)
            pending = reducer.pending(level)
        assert mode.calls == []
        host = transfer(pending)
    assert mode.calls == ["tolist"]  # the hub's one transfer
    assert reducer.build(host, L.DEBUG).calls == 3


# --------------------------------------------------------------------------------------------
# A real model and a real training step
# --------------------------------------------------------------------------------------------


class Agent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16)
        self.actor = nn.ModuleDict({"direction": nn.Linear(16, 2), "force": nn.Linear(16, 3)})
        self.critic = nn.Linear(16, 1)
        self.unused = nn.Linear(16, 4)  # a head this loss never reaches: its grad stays None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        logits = torch.cat([self.actor["direction"](h), self.actor["force"](h)], -1)
        return logits.logsumexp(-1).mean() + self.critic(h).pow(2).mean()


def train_and_compare(device: torch.device) -> None:
    torch.manual_seed(0)
    agent = Agent().to(device)
    named = list(agent.named_parameters())
    groups = resolve_groups(named, {"lstm": "lstm", "actor": "actor", "critic": "critic"})
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    reducer.reset()
    calls, clip_norms = [], []
    for step in range(4):
        x = torch.randn(5, 8, 6, device=device) * (1 + 10 * step)
        agent.zero_grad(set_to_none=True)
        agent(x).backward()
        calls.append([None if p.grad is None else p.grad.detach().cpu().clone() for _, p in named])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # observe must not sync
        try:
            reducer.observe(L.NORMAL)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        clip_norms.append(float(nn.utils.clip_grad_norm_(agent.parameters(), 0.5)))
        with torch.no_grad():  # plain SGD by hand: torch.optim's first use imports torch._dynamo (seconds)
            for p in agent.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.1)
    stats = reducer.build(transfer(reducer.pending(L.NORMAL)), L.NORMAL)
    assert_matches(stats, ref_stats(calls, 0.5, groups), rel=1e-5)
    assert math.isclose(stats.total_norm_last, clip_norms[-1], rel_tol=1e-6)
    assert stats.clip_rate == sum(n > 0.5 for n in clip_norms) / 4
    assert stats.skipped_params == 2  # unused.weight, unused.bias


def test_real_lstm_training_step_cpu() -> None:
    train_and_compare(torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_sync_and_matches_reference() -> None:
    train_and_compare(torch.device("cuda"))
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        named = [(n, nn.Parameter(torch.zeros(s, dtype=dtype, device="cuda"))) for n, s in SHAPES.items()]
        groups = default_groups(named)
        for sample_size in ("auto", None):
            reducer = GradientReducer(
                named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=sample_size
            )
            calls = [[random_grad(p.shape, gen, dtype) for _, p in named] for _ in range(3)]
            calls[1][0].view(-1)[0] = math.nan
            on_gpu = [[g.cuda() for g in grads] for grads in calls]  # blocking copies: outside the check
            reducer.reset()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for grads in on_gpu:
                    for (_, p), g in zip(named, grads):
                        p.grad = g
                    reducer.observe(L.NORMAL)
                pending = reducer.pending(L.NORMAL)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            stats = reducer.build(transfer(pending), L.NORMAL)
            if sample_size is None:
                assert_matches(stats, ref_stats(calls, 0.5, groups), rel=1e-5)
            else:
                assert stats.nan_params == 1 and stats.nan_count >= 1 and math.isnan(stats.max_abs)


def test_zero_element_parameters_are_ignored() -> None:
    gen = torch.Generator().manual_seed(12)
    named = make_params({"a": (6, 3), "empty": (0, 4), "b": (5,)})
    calls = [[random_grad((6, 3), gen), torch.zeros(0, 4), random_grad((5,), gen)] for _ in range(2)]
    for sample_size in (None, 8):
        reducer = GradientReducer(
            named, max_grad_norm=0.5, thresholds=TH, groups={"ab": [0, 1, 2]}, sample_size=sample_size
        )
        stats = run(reducer, calls)
        assert math.isnan(stats.param_norms[1]) and stats.skipped_params == 0
        ref = ref_stats(calls, 0.5, {"ab": [0, 1, 2]})
        for key in ("total_norm", "max_abs", "clip_rate"):
            assert close(getattr(stats, key), ref[key]), key
        assert close(stats.group_norms["ab"], ref["group_norms"]["ab"])


def test_sparse_gradients_are_counted_skips() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 2)
    named = [("emb.weight", emb.weight), ("head.weight", head.weight), ("head.bias", head.bias)]
    head(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups={}, sample_size=None)
    reducer.observe(L.NORMAL)
    stats = reducer.build(transfer(reducer.pending(L.NORMAL)), L.NORMAL)
    assert stats.skipped_params == 1 and math.isnan(stats.param_norms[0])
    dense = [None, head.weight.grad, head.bias.grad]
    assert close(stats.total_norm, ref_stats([dense], 0.5, {})["total_norm"])


# --------------------------------------------------------------------------------------------
# Deferred work: private samples, per-call cost
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_samples_are_private_copies_binned_at_the_end(layout: str) -> None:
    """The sample is binned in pending(), so observe() copies it out: clipping, zeroing or the next
    backward writing into the same gradient tensors must not change what the update reports. Also
    for non-contiguous gradients (sampled through a flat copy instead of a strided view)."""
    gen = torch.Generator().manual_seed(31)
    shapes = {"lstm.w": (256, 64), "lstm.b": (256,), "actor.w": (3, 64), "critic.w": (1, 64), "s": ()}
    named = make_params(shapes)
    groups = default_groups(named)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=500)
    calls = [[random_grad(p.shape, gen) for _, p in named] for _ in range(3)]
    reducer.reset()
    buffers = [torch.empty_like(g) for g in calls[0]]
    if layout == "transposed":  # same values, column-major storage
        buffers = [b if b.dim() < 2 else torch.empty(b.shape[::-1]).t() for b in buffers]
    for grads in calls:
        for (_, p), buf, g in zip(named, buffers, grads):
            buf.copy_(g)
            p.grad = buf  # the same tensors every call, like zero_grad(set_to_none=False)
        reducer.observe(L.NORMAL)
        for buf in buffers:
            buf.mul_(0.0)  # in-place clipping / zeroing after observe
    stats = reducer.build(transfer(reducer.pending(L.NORMAL)), L.NORMAL)
    numels = [p.numel() for _, p in named]
    examined = examined_indices(numels, list(range(len(named))), 500, list(range(3)))
    assert_matches(stats, ref_stats(calls, 0.5, groups, examined))


def test_observe_launches_a_fixed_small_number_of_kernels(cpu_mode: str) -> None:
    """Per backward on CPU, a small model: one flat copy of its gradients (views and a cat inside one
    C++ call); a larger one: one fused norm, one strided view per tensor, one stack and one cat, and
    for max |g| one aminmax per tensor of at least BIG_TENSOR elements (64 in "aminmax") and one
    foreach abs and one foreach max for all the others. Nothing else until pending() (a
    regression guard for the per-call dispatch cost)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(32)
    named = make_params(SHAPES)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=default_groups(named))
    for _, p in named:
        p.grad = random_grad(p.shape, gen)
    reducer.observe(L.NORMAL)  # the first call builds the plan
    with KernelCounter() as counter:
        reducer.observe(L.NORMAL)
    n = len(named)
    if cpu_mode == "flat":  # the views come from inside the C++ flatten: one Python-level dispatch
        assert [op for op in counter.ops if op != "view"] == ["cat"]
        assert len(counter.ops) == 1 + n
    elif cpu_mode == "per-call":  # every tensor under BIG_TENSOR: no dispatch per tensor but a view
        ops = ["_foreach_abs", "_foreach_max", "_foreach_norm", "as_strided", "cat", "stack"]
        assert sorted(set(counter.ops)) == ops
        assert len(counter.ops) == 5 + n
    else:
        big = sum(p.numel() >= 64 for _, p in named)
        assert 0 < big < n
        ops = ["_foreach_abs", "_foreach_max", "_foreach_norm", "aminmax", "as_strided", "cat", "stack"]
        assert sorted(set(counter.ops)) == ops
        assert counter.ops.count("aminmax") == big and len(counter.ops) == 5 + n + big
    assert reducer.build(transfer(reducer.pending(L.NORMAL)), L.NORMAL).calls == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_binade_tables_categorise_exactly_like_bucketize(dtype: torch.dtype) -> None:
    """The two-lookup categorisation gives bucketize's category for every bit pattern that matters:
    each boundary and its neighbours, every binade's first and last pattern, zero, subnormals, inf,
    NaNs, and random magnitudes. float16's subnormal binade holds several default edges: no tables,
    bucketize is used (and the reducer's statistics are the same either way, tested above)."""
    int_dtype, _ = categories_module._BITS[dtype]
    bounds = category_boundaries(TH.grad_hist_edges, dtype)
    tables = gradients_module.category_lut(bounds, dtype)
    if dtype == torch.float16:
        assert tables is None
        return
    assert tables is not None
    shift = categories_module._MANTISSA[dtype]
    top = (1 << (int_dtype.itemsize * 8 - 1)) - 1
    patterns = {0, 1, 2, top, top - 1}
    for b in bounds:
        patterns.update({b - 1, b, b + 1})
    for e in range(top >> shift):
        patterns.update({e << shift, ((e + 1) << shift) - 1})
    gen = torch.Generator().manual_seed(33)
    random = torch.randint(0, top, (5000,), generator=gen, dtype=torch.int64).tolist()
    bits = torch.tensor(sorted(patterns | set(random)), dtype=torch.int64).clamp(0, top).to(int_dtype)
    lut = tables
    want = torch.bucketize(bits, torch.tensor(bounds, dtype=int_dtype), right=True)
    got = gradients_module.categorize(
        bits.view(2, -1) if bits.numel() % 2 == 0 else bits, lut, torch.tensor([])
    )
    assert torch.equal(got.reshape(-1), want)


def test_two_edges_in_one_binade_fall_back_to_bucketize() -> None:
    bounds = category_boundaries((1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.2, 1.5), torch.float32)
    assert gradients_module.category_lut(bounds, torch.float32) is None  # 1.2 and 1.5 inside [1, 2)
    reducer = GradientReducer(make_params({"w": (40,)}), max_grad_norm=0.5, thresholds=TH)
    assert reducer._luts[torch.float32] is not None  # the default edges do have tables


def test_a_model_cast_between_updates_gets_new_plans() -> None:
    """Plans are keyed per call on presence, layout and graph only (a gradient always has its
    parameter's dtype and device); casting the model between updates rebuilds them."""
    gen = torch.Generator().manual_seed(34)
    named = make_params({"a.w": (16, 8), "b.w": (8,)})
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=default_groups(named))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for _, p in named:
            p.data = p.data.to(dtype)
        calls = [[random_grad(p.shape, gen, dtype) for _, p in named] for _ in range(2)]
        stats = run(reducer, calls)
        ref = ref_stats(calls, 0.5, default_groups(named))
        assert stats.calls == 2
        rel = 2e-2 if dtype == torch.bfloat16 else 2e-5
        assert close(stats.total_norm, ref["total_norm"], rel) and close(stats.max_abs, ref["max_abs"], rel)
        assert stats.hist_counts == ref["hist_counts"]


# --------------------------------------------------------------------------------------------
# Where a NaN starts: GradientStats.nonfinite_params
# --------------------------------------------------------------------------------------------


class _Agent(nn.Module):
    """Encoder, LSTM trunk, two action heads and a critic: the value loss can be made to produce a
    NaN gradient that reaches the critic and everything under it, never the action heads."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8)
        self.heads = nn.ModuleDict({"move": nn.Linear(8, 3), "fire": nn.Linear(8, 2)})
        self.critic = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h, _ = self.lstm(torch.tanh(self.encoder(x)))
        return {k: torch.log_softmax(m(h), -1) for k, m in self.heads.items()}, self.critic(h).squeeze(-1)


def _nan_at_the_critic_step(agent: _Agent, poison: bool) -> None:
    """One real PPO-shaped backward. With ``poison`` the critic predicts the returns exactly and the
    value loss is an RMSE: d sqrt(u)/du at u = 0 is inf, times d u/dv = 0 gives NaN, which flows
    into the critic and, through the shared features, the LSTM and the encoder."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, generator=gen)
    logp, v = agent(x)
    actions = {
        "move": torch.randint(0, 3, (4, 3), generator=gen),
        "fire": torch.randint(0, 2, (4, 3), generator=gen),
    }
    joint = sum(logp[k].gather(-1, actions[k][..., None]).squeeze(-1) for k in logp)
    adv = torch.randn(4, 3, generator=gen)
    returns = v.detach().clone() if poison else torch.randn(4, 3, generator=gen)
    value_loss = torch.sqrt(((v - returns) ** 2).mean())
    (-(joint * adv).mean() + value_loss).backward()


@pytest.mark.parametrize("level", [L.MINIMAL, L.NORMAL])
def test_nonfinite_params_names_the_tensors_a_nan_reached_in_model_order(level: L) -> None:
    torch.manual_seed(0)
    agent = _Agent()
    named = list(agent.named_parameters())
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH)
    reducer.reset()
    _nan_at_the_critic_step(agent, poison=False)
    reducer.observe(level)
    agent.zero_grad(set_to_none=True)
    _nan_at_the_critic_step(agent, poison=True)  # the second backward of the update goes bad
    reducer.observe(level)
    want = [n for n, p in named if not torch.isfinite(p.grad).all()]
    stats = reducer.build(transfer(reducer.pending(level)), level)
    assert want and not any(n.startswith("heads.") for n in want)  # the mechanism did what it says
    assert want[0] == "encoder.weight" and want[-1] == "critic.bias"
    assert stats.nonfinite_params == want
    assert stats.nan_params == len(want)
    # the next update is clean again: the names are per update
    agent.zero_grad(set_to_none=True)
    _nan_at_the_critic_step(agent, poison=False)
    assert run(reducer, [[p.grad for _, p in named]], level).nonfinite_params == []


def test_nonfinite_params_through_the_hub_and_capped_at_sixteen() -> None:
    from telemetry_core.hub import TelemetryHub

    torch.manual_seed(1)
    agent = _Agent()
    hub = TelemetryHub(agent, heads={"move": 3, "fire": 2}, max_grad_norm=0.5, bind=None)
    try:
        _nan_at_the_critic_step(agent, poison=True)
        hub.observe_gradients()
        snap = hub.end_update(0)
        assert snap is not None
        assert snap.gradients.nonfinite_params == [
            n for n, p in agent.named_parameters() if not torch.isfinite(p.grad).all()
        ]
    finally:
        hub.close()
    # a deep stack where every tensor goes bad: the first 16 in model order, an inf counted too
    deep = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)])
    named = list(deep.named_parameters())
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH)
    for i, (_, p) in enumerate(named):
        p.grad = torch.full_like(p, math.inf if i == 0 else math.nan)
    stats = run(reducer, [[p.grad for _, p in named]])
    assert stats.nonfinite_params == [n for n, _ in named][:16]
    assert stats.inf_params == 1 and stats.nan_params == len(named) - 1


# --------------------------------------------------------------------------------------------
# Boundaries: every comparison at exactly its limit
# --------------------------------------------------------------------------------------------


def test_clip_rate_vanishing_and_exploding_at_exactly_their_limits() -> None:
    """Clip rate counts a pre-clip norm strictly above max_grad_norm; a parameter vanishes strictly
    below grad_vanishing_rel x cap and explodes strictly above grad_exploding_rel x cap. Limits are
    powers of two and each gradient one element, so every norm is exactly the value set.
    Mutation check (by hand): ``>`` -> ``>=`` in the clip flag, ``<`` -> ``<=`` in the vanishing and
    ``>`` -> ``>=`` in the exploding count each fail this test."""
    th = Thresholds(grad_vanishing_rel=2.0**-10, grad_exploding_rel=8.0)
    mgn = 0.5  # vanishing below 2**-11, exploding above 4.0
    names = ["at_vanish", "below_vanish", "at_explode", "above_explode"]
    named = [(n, nn.Parameter(torch.zeros(1))) for n in names]
    reducer = GradientReducer(named, max_grad_norm=mgn, thresholds=th, groups={})
    vanish, explode = 2.0**-11, 4.0
    below = float(np.nextafter(np.float32(vanish), np.float32(0)))
    above = float(np.nextafter(np.float32(explode), np.float32(np.inf)))
    grads = [torch.tensor([v]) for v in (vanish, below, explode, above)]
    stats = run(reducer, [grads])
    assert stats.vanishing_count == 1  # below_vanish only
    assert stats.exploding_count == 1  # above_explode only
    assert stats.param_norms == [vanish, below, explode, above]
    # clip flag: a total norm of exactly the cap is not clipped, the next float up is
    single = [("w", nn.Parameter(torch.zeros(1)))]
    reducer = GradientReducer(single, max_grad_norm=mgn, thresholds=th, groups={})
    at_cap = run(reducer, [[torch.tensor([mgn])], [torch.tensor([-mgn])]])
    assert at_cap.total_norm_max == mgn and at_cap.clip_rate == 0.0
    over = float(np.nextafter(np.float32(mgn), np.float32(1)))
    assert run(reducer, [[torch.tensor([mgn])], [torch.tensor([over])]]).clip_rate == 0.5


def test_counts_have_the_shape_of_the_model_not_of_the_calls() -> None:
    """Counts over parameters are maxima over calls, counts over elements are sums: two identical
    calls double the element counts and the NaN/Inf tensor counts but not the vanishing count."""
    th = Thresholds(grad_vanishing_rel=2.0**-10, grad_exploding_rel=8.0)
    named = [("a", nn.Parameter(torch.zeros(3))), ("b", nn.Parameter(torch.zeros(2)))]
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=th, groups={}, sample_size=None)
    grads = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([math.nan, 1.0])]
    one, two = run(reducer, [grads]), run(reducer, [grads, grads])
    assert (one.vanishing_count, two.vanishing_count) == (1, 1)
    assert (one.nan_params, two.nan_params) == (1, 2)
    assert (one.nan_count, two.nan_count) == (1, 2)
    assert (one.hist_counts[0], two.hist_counts[0]) == (3, 6)
    assert (one.examined_elements, two.examined_elements) == (5, 10)
    assert one.nonfinite_params == two.nonfinite_params == ["b"]


def test_float32_accumulation_path_matches_the_reference() -> None:
    """Devices without float64 (MPS) accumulate and transfer in float32: forced here on the CPU."""
    from telemetry_core.reductions.transfer import accumulation_dtype, float64_disabled

    gen = torch.Generator().manual_seed(21)
    named = make_params(SHAPES)
    groups = default_groups(named)
    reducer = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups, sample_size=None)
    calls = [[random_grad(p.shape, gen) for _, p in named] for _ in range(3)]
    calls[0][1].view(-1)[4] = math.nan  # first: the reference's max() keeps a leading NaN
    with float64_disabled():
        assert accumulation_dtype("cpu") == torch.float32
        reducer.reset()
        for grads in calls:
            for (_, p), g in zip(named, grads):
                p.grad = g
            reducer.observe(L.NORMAL)
        pending = reducer.pending(L.NORMAL)
        assert all(t.dtype != torch.float64 for t in pending.values())
        stats = reducer.build(transfer(pending), L.NORMAL)
    assert accumulation_dtype("cpu") == torch.float64
    assert_matches(stats, ref_stats(calls, 0.5, groups), rel=1e-5)
    assert stats.nonfinite_params == ["lstm.weight_hh_l0"]


def test_device_totals_agree_with_rank_sums_and_with_the_host_path() -> None:
    """With ``device_totals`` (set by the hub when ranks are aggregated) the totals are computed on the
    device, and ``rank_sums`` (what the ranks all_gather) agrees with ``build`` to the bit; without it
    ``build`` computes them on the host. Both match the float64 reference, absent gradients, a NaN and
    an Inf included, and the present gradients changing within the update (two plans)."""
    gen = torch.Generator().manual_seed(71)
    named = make_params(SHAPES)
    calls: list[list[torch.Tensor | None]] = []
    for c in range(5):
        grads: list[torch.Tensor | None] = [random_grad(p.shape, gen) for _, p in named]
        if c % 2:
            grads[2] = None
        calls.append(grads)
    bad_nan, bad_inf = calls[3][0], calls[4][1]
    assert bad_nan is not None and bad_inf is not None
    bad_nan.view(-1)[5] = math.nan
    bad_inf.view(-1)[0] = -math.inf
    groups = default_groups(named)
    host_path = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups)
    device_path = GradientReducer(named, max_grad_norm=0.5, thresholds=TH, groups=groups)
    device_path.device_totals = True
    with pytest.raises(RuntimeError):
        host_path.rank_sums()
    def through_device(update: list[list[torch.Tensor | None]]) -> tuple[list[float], GradientStats]:
        device_path.reset()
        for grads in update:
            for p, g in zip(device_path.params, grads):
                p.grad = g
            device_path.observe(L.NORMAL)
        pending = device_path.pending(L.NORMAL)
        sums = device_path.rank_sums().tolist()
        return sums, device_path.build(transfer(pending), L.NORMAL)

    clean = calls[:3]
    sums, stats = through_device(clean)
    assert sums == [stats.total_norm * 3, 0.0, 0.0]  # the same float64 sum, not a recomputation
    assert_matches(stats, ref_stats(clean, 0.5, groups), rel=1e-5)
    assert_matches(run(host_path, clean), ref_stats(clean, 0.5, groups), rel=1e-5)
    on_host = run(host_path, calls)
    sums, on_device = through_device(calls)
    assert math.isnan(sums[0]) and (sums[1], sums[2]) == (on_device.nan_count, on_device.inf_count)
    assert on_device.nan_params == on_host.nan_params == 1 and on_device.inf_params == on_host.inf_params == 1
    assert on_device.nonfinite_params == on_host.nonfinite_params == [named[0][0], named[1][0]]
    for stats in (on_host, on_device):
        assert stats.skipped_params == 1
        assert math.isnan(stats.total_norm) and math.isnan(stats.max_abs)
        assert close(
            stats.total_norm_last,
            math.sqrt(sum(float(g.double().norm()) ** 2 for g in calls[4] if g is not None)),
        )
