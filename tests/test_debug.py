"""DEBUG diagnostics (telemetry_core.debug) against float64 references, on real PyTorch models."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import msgspec
import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.debug import DebugDiagnostics
from telemetry_core.reductions.transfer import transfer
from telemetry_core.schema import DebugReport, Snapshot

DEBUG = TelemetryLevel.DEBUG
SYNC_NAMES = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts every way a tensor value can reach Python."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in SYNC_NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny models: intra-op threads only contend on the shared 2-core machine. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def report(diag: DebugDiagnostics, level: TelemetryLevel = DEBUG) -> DebugReport:
    out = diag.build(transfer(diag.pending(level)), level)
    assert out is not None
    return out


def close(a: float, b: float, rtol: float = 2e-5, atol: float = 1e-7) -> bool:
    if math.isnan(b):
        return math.isnan(a)
    if math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


# ---------------------------------------------------------------------------------------------
# A real small recurrent actor-critic: shared encoder + LSTM trunk, two action heads, a critic.
# ---------------------------------------------------------------------------------------------
HEADS = {"direction": 4, "force": 3}


class ActorCritic(nn.Module):
    def __init__(self, obs: int = 10, hidden: int = 24) -> None:
        super().__init__()
        self.encoder = nn.Linear(obs, hidden)
        self.lstm = nn.LSTM(hidden, hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
        self.critic = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h, _ = self.lstm(torch.tanh(self.encoder(x)))
        return {k: torch.log_softmax(m(h), -1) for k, m in self.heads.items()}, self.critic(h).squeeze(-1)


def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | dict]:
    """PPO-style terms: clipped joint surrogate, value loss, and each head's own surrogate."""
    logp, value = model(batch["obs"])
    head_lp = {k: logp[k].gather(-1, batch["actions"][k][..., None]).squeeze(-1) for k in HEADS}
    joint = sum(head_lp.values())
    adv = batch["adv"]
    ratio = torch.exp(joint - batch["old"])
    policy = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    value_loss = 0.5 * (value - batch["ret"]).square().mean()
    heads = {k: -(torch.exp(head_lp[k] - batch["old_head"][k]) * adv).mean() for k in HEADS}
    return {"policy": policy, "value": value_loss, "heads": heads, "joint": joint, "head_lp": head_lp}


def make_batch(
    t: int = 6, n: int = 5, obs: int = 10, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(t, n, obs, generator=g, dtype=dtype),
        "actions": {k: torch.randint(0, a, (t, n), generator=g) for k, a in HEADS.items()},
        "adv": torch.randn(t, n, generator=g, dtype=dtype),
        "ret": torch.randn(t, n, generator=g, dtype=dtype),
        "old": -2.0 + 0.3 * torch.randn(t, n, generator=g, dtype=dtype),
        "old_head": {k: -1.0 + 0.2 * torch.randn(t, n, generator=g, dtype=dtype) for k in HEADS},
    }


# ---------------------------------------------------------------------------------------------
# Per-layer table
# ---------------------------------------------------------------------------------------------
def random_grad(shape: tuple[int, ...], gen: torch.Generator, scale: float, extreme: bool) -> torch.Tensor:
    """Log-uniform magnitudes over many decades, random signs, some exact zeros and extremes."""
    n = math.prod(shape)
    mag = torch.exp(
        torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-9), math.log(3.0), generator=gen)
    )
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    g = scale * mag * sign
    g[torch.rand(n, generator=gen) < 0.1] = 0.0
    if extreme and n > 4:
        g[0], g[1] = 1e-7, 2.0  # explicitly small and large
    return g.reshape(shape)


def reference_layer(calls: list[torch.Tensor], small: float, large: float) -> dict[str, float]:
    """float64 reference of one parameter's row from its gradients in every call."""
    x = torch.cat([c.reshape(-1).to(torch.float64) for c in calls])
    fin = torch.isfinite(x)
    xf = x[fin]
    total = x.numel()
    a = xf.abs()
    return {
        "norm": float(np.mean([torch.linalg.vector_norm(c.to(torch.float64)).item() for c in calls])),
        "norm_max": float(np.max([torch.linalg.vector_norm(c.to(torch.float64)).item() for c in calls])),
        "mean": xf.mean().item() if xf.numel() else math.nan,
        "std": xf.std(correction=0).item() if xf.numel() else math.nan,
        "min": xf.min().item() if xf.numel() else math.nan,
        "max": xf.max().item() if xf.numel() else math.nan,
        "zero_frac": (xf == 0).sum().item() / total,
        "small_frac": ((a > 0) & (a < small)).sum().item() / total,
        "large_frac": (a > large).sum().item() / total,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "calls": len(calls),
    }


def check_row(row, ref: dict[str, float], rtol: float = 2e-5) -> None:  # type: ignore[no-untyped-def]
    for key, want in ref.items():
        got = getattr(row, key)
        if key in ("nan", "inf", "calls"):
            assert got == want, (row.name, key, got, want)
        elif key in ("zero_frac", "small_frac", "large_frac"):
            assert got == pytest.approx(want, abs=1e-12), (row.name, key, got, want)
        elif key == "mean":
            # the pooled float32 mean carries rounding relative to the spread, not to the mean
            spread = max(ref["std"], abs(want)) if not math.isnan(want) else 0.0
            assert close(got, want, rtol=0, atol=1e-5 * spread + 1e-30), (row.name, key, got, want)
        else:
            assert close(got, want, rtol=rtol), (row.name, key, got, want)


SHAPE_SETS = [
    [(7,), (3, 5), (2, 3, 4)],
    [(64, 33), (33,), (1,), (4, 4, 4, 4)],
    [(257, 129), (129,)],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=["small", "mixed", "wide"])
def test_layer_table_matches_float64_reference(dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> None:
    gen = torch.Generator().manual_seed(hash((str(dtype), len(shapes))) % 2**31)
    params = {f"p{i}": nn.Parameter(torch.zeros(s, dtype=dtype)) for i, s in enumerate(shapes)}
    mgn = 0.5
    diag = DebugDiagnostics(params, max_grad_norm=mgn)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    pre_clip = []
    for call in range(4):
        for i, (name, p) in enumerate(params.items()):
            g = random_grad(p.shape, gen, scale=10.0 ** (i - call), extreme=call == 0).to(dtype)
            p.grad = g
            seen[name].append(g)  # the values the diagnostics see (already rounded to dtype)
        pre_clip.append(
            math.sqrt(sum(torch.linalg.vector_norm(p.grad.double()).item() ** 2 for p in params.values()))
        )
        diag.observe_gradients()
    out = report(diag)
    th = Thresholds()
    small, large = th.grad_small_rel * mgn, th.grad_large_rel * mgn
    assert [r.name for r in out.layers] == list(params)
    for row, (name, p) in zip(out.layers, params.items()):
        assert row.numel == p.numel()
        check_row(row, reference_layer(seen[name], small, large))
    assert len(out.numerical.pre_clip_norms) == 4
    for got, want in zip(out.numerical.pre_clip_norms, pre_clip):
        assert close(got, want, rtol=1e-5)
    assert out.numerical.nonfinite_grads == []
    # max |g| and which parameter, against float64
    best = max(params, key=lambda n: max(c.double().abs().max().item() for c in seen[n]))
    assert out.numerical.max_abs_grad_param == best
    want = max(c.double().abs().max().item() for c in seen[best])
    assert close(
        out.numerical.max_abs_grad, want, rtol=0 if dtype != torch.float64 else 1.2e-7
    )  # f32 accumulators


def test_small_and_large_fractions_follow_thresholds_relative_to_max_grad_norm() -> None:
    p = nn.Parameter(torch.zeros(6))
    p.grad = torch.tensor([0.0, 1e-7, 3e-6, 0.5, 2.0, -30.0])
    th = Thresholds(grad_small_rel=1e-5, grad_large_rel=2.0)
    for mgn, small, large in [(0.5, 2, 2), (10.0, 2, 1), (0.02, 1, 3)]:
        diag = DebugDiagnostics({"w": p}, thresholds=th, max_grad_norm=mgn)
        diag.observe_gradients()
        row = report(diag).layers[0]
        assert row.zero_frac == pytest.approx(1 / 6)
        assert row.small_frac == pytest.approx(small / 6), mgn
        assert row.large_frac == pytest.approx(large / 6), mgn


def test_nan_inf_and_zero_gradients_are_counted_and_named() -> None:
    gen = torch.Generator().manual_seed(7)
    names = ["clean", "has_nan", "has_inf", "all_zero", "all_nan", "mixed"]
    params = {n: nn.Parameter(torch.zeros(50)) for n in names}
    diag = DebugDiagnostics(params)
    calls: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for call in range(2):
        for n, p in params.items():
            g = torch.randn(50, generator=gen)
            if n == "has_nan" and call == 1:
                g[[3, 17]] = math.nan
            if n == "has_inf":
                g[5] = math.inf if call == 0 else -math.inf
            if n == "all_zero":
                g.zero_()
            if n == "all_nan":
                g.fill_(math.nan)
            if n == "mixed":
                g[0], g[1], g[2] = math.nan, math.inf, 0.0
            p.grad = g
            calls[n].append(g.clone())
        diag.observe_gradients()
    out = report(diag)
    th = Thresholds()
    rows = {r.name: r for r in out.layers}
    for n in names:
        check_row(rows[n], reference_layer(calls[n], th.grad_small_rel * 0.5, th.grad_large_rel * 0.5))
    assert rows["has_nan"].nan == 2 and rows["has_inf"].inf == 2 and rows["mixed"].nan == 2
    assert math.isnan(rows["has_nan"].norm) and math.isinf(rows["has_inf"].norm)
    assert rows["all_zero"].zero_frac == 1.0 and rows["all_zero"].std == 0.0 and rows["all_zero"].norm == 0.0
    assert math.isnan(rows["all_nan"].mean) and math.isnan(rows["all_nan"].min) and rows["all_nan"].nan == 100
    assert out.numerical.nonfinite_grads == ["has_nan", "has_inf", "all_nan", "mixed"]
    assert math.isnan(out.numerical.pre_clip_norms[0])  # all_nan poisons both totals
    # max |g| is over finite elements only, and names its parameter
    finite_max = {
        n: max(c[torch.isfinite(c)].abs().max().item() if torch.isfinite(c).any() else -1 for c in calls[n])
        for n in names
    }
    best = max(finite_max, key=finite_max.__getitem__)
    assert out.numerical.max_abs_grad_param == best
    assert out.numerical.max_abs_grad == pytest.approx(finite_max[best], rel=1e-7)


def test_parameters_without_gradient_are_skipped_and_counted() -> None:
    a, b, frozen = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.ones(2))
    frozen.requires_grad_(False)
    diag = DebugDiagnostics([("a", a), ("b", b), ("frozen", frozen)])
    a.grad = torch.tensor([1.0, -2.0, 3.0])
    diag.observe_gradients()  # b has no gradient in this backward
    a.grad = torch.tensor([0.5, 0.5, 0.5])
    b.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    diag.observe_gradients()
    out = report(diag)
    assert [r.name for r in out.layers] == ["a", "b"]  # the table lists trainable parameters
    ra, rb = out.layers
    assert (ra.calls, rb.calls) == (2, 1)
    assert rb.norm == pytest.approx(2.0) and rb.mean == pytest.approx(1.0) and rb.std == pytest.approx(0.0)
    check_row(ra, reference_layer([torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5] * 3)], 1e-6, 0.5))
    assert out.skipped == 1
    assert out.numerical.max_abs_weight_param == "frozen"  # the weight check covers frozen ones too
    # a backward in which no parameter has a gradient is a usage error, named
    diag.reset()
    a.grad = b.grad = None
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        diag.observe_gradients()


# ---------------------------------------------------------------------------------------------
# Numerical-stability report
# ---------------------------------------------------------------------------------------------
def test_numerical_report_names_nonfinite_weights_and_reports_losses() -> None:
    torch.manual_seed(3)
    model = ActorCritic()
    diag = DebugDiagnostics(model, HEADS)
    batch = make_batch()
    t = loss_terms(model, batch)
    loss = t["policy"] + t["value"]
    loss.backward()
    diag.observe_gradients(loss)
    diag.observe_gradients(float("nan"))  # a host float is accepted too
    with torch.no_grad():
        model.lstm.weight_hh_l0[2, 3] = math.nan
        model.heads["force"].bias[1] = -math.inf
        model.critic.weight[0, 0] = 7.5  # the largest finite weight
    out = report(diag).numerical
    assert out.nonfinite_weights == ["lstm.weight_hh_l0", "heads.force.bias"]
    assert out.max_abs_weight_param == "critic.weight" and out.max_abs_weight == 7.5
    assert out.loss_finite is False and out.losses_seen == 2 and out.nonfinite_losses == 1
    grads = [p.grad for p in model.parameters()]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
    assert out.pre_clip_norms == pytest.approx([want, want], rel=1e-6)
    # matches what clip_grad_norm_ reports for the same gradients
    assert out.pre_clip_norms[0] == pytest.approx(
        nn.utils.clip_grad_norm_(model.parameters(), 0.5).item(), rel=1e-6
    )

    diag.reset()
    diag.observe_gradients(torch.tensor(1.0))
    assert report(diag).numerical.loss_finite is True
    diag.reset()
    diag.observe_gradients()
    assert report(diag).numerical.loss_finite is None


# ---------------------------------------------------------------------------------------------
# Ratio outliers
# ---------------------------------------------------------------------------------------------
def reference_topk(diffs: np.ndarray, k: int) -> np.ndarray:
    score = np.where(np.isnan(diffs), np.inf, np.abs(diffs))
    return np.argsort(-score, kind="stable")[:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_indices", [True, False])
def test_outliers_across_minibatches_equal_topk_of_the_whole_update(
    dtype: torch.dtype, with_indices: bool
) -> None:
    gen = torch.Generator().manual_seed(11)
    k = 6
    diag = DebugDiagnostics({"w": nn.Parameter(torch.zeros(1))}, HEADS, Thresholds(outlier_top_k=k))
    sizes = [3, 40, 1, 17, 64]  # some minibatches smaller than k
    rollout = torch.randperm(sum(sizes), generator=gen)
    cols: dict[str, list] = {
        c: [] for c in ("joint", "direction", "force", "pos", "mb", "epoch", "adir", "aforce")
    }
    offset = 0
    for mb, b in enumerate(sizes):
        hn = {h: (-1.0 + torch.randn(b, generator=gen, dtype=torch.float64)).to(dtype) for h in HEADS}
        ho = {
            h: (hn[h].double() + 0.3 * torch.randn(b, generator=gen, dtype=torch.float64)).to(dtype)
            for h in HEADS
        }
        new = (
            hn["direction"].double()
            + hn["force"].double()
            + 0.01 * torch.randn(b, generator=gen, dtype=torch.float64)
        ).to(dtype)
        old = (ho["direction"].double() + ho["force"].double()).to(dtype)
        acts = torch.stack([torch.randint(0, n, (b,), generator=gen) for n in HEADS.values()], 1)
        idx = rollout[offset : offset + b]
        offset += b
        diag.observe_minibatch(new, old, hn, ho, acts.float(), idx if with_indices else None, epoch=mb // 2)
        cols["joint"].append((new.double() - old.double()).numpy())
        for h in HEADS:
            cols[h].append((hn[h].double() - ho[h].double()).numpy())
        cols["pos"].append(idx.numpy() if with_indices else np.arange(b))
        cols["mb"].append(np.full(b, mb))
        cols["epoch"].append(np.full(b, mb // 2))
        cols["adir"].append(acts[:, 0].numpy())
        cols["aforce"].append(acts[:, 1].numpy())
    cat = {c: np.concatenate(v) for c, v in cols.items()}
    out = report(diag).outliers
    assert [o.head for o in out] == ["joint", "direction", "force"]
    tol = 1e-12 if dtype != torch.float32 else 1e-6
    where = {(int(pos), int(mb)): i for i, (pos, mb) in enumerate(zip(cat["pos"], cat["mb"]))}
    for o in out:
        d = cat[o.head]
        score = np.abs(d)
        assert o.index_kind == ("rollout" if with_indices else "minibatch")
        # the listed samples are a top-k of the whole update, worst first (ties may pick either)
        top = np.array([where[(i, mb)] for i, mb in zip(o.indices, o.minibatches)])
        assert len(set(top.tolist())) == k
        assert score[top] == pytest.approx(np.sort(score)[::-1][:k], abs=tol)
        if dtype == torch.float64:  # no ties possible: exactly the reference's choice
            assert top.tolist() == reference_topk(d, k).tolist()
        assert o.epochs == cat["epoch"][top].tolist()
        assert o.logp_diff == pytest.approx(d[top].tolist(), abs=tol)
        assert o.ratios == pytest.approx(np.exp(d[top]).tolist(), rel=1e-5)
        assert o.samples == sum(sizes) and o.nonfinite == 0
        assert o.logp_diff_mean == pytest.approx(score.mean(), rel=1e-6)
        assert o.logp_diff_max == pytest.approx(score.max(), rel=1e-6)
        if o.head == "joint":
            assert o.actions == [-1] * k  # several heads: see head_actions
            assert o.head_actions == {
                "direction": cat["adir"][top].tolist(),
                "force": cat["aforce"][top].tolist(),
            }
            for h in HEADS:
                assert o.head_logp_diff[h] == pytest.approx(cat[h][top].tolist(), abs=tol)
        else:
            assert o.actions == cat["adir" if o.head == "direction" else "aforce"][top].tolist()
            assert o.head_actions == {} and o.head_logp_diff == {}


def test_outliers_rank_nonfinite_worst_and_single_head_actions() -> None:
    diag = DebugDiagnostics({"w": nn.Parameter(torch.zeros(1))}, {"only": 5}, Thresholds(outlier_top_k=3))
    new = torch.tensor([0.0, 0.1, math.nan, -0.4, 0.2])
    old = torch.zeros(5)
    diag.observe_minibatch(new, old, actions=torch.tensor([4, 3, 2, 1, 0]))
    diag.observe_minibatch(torch.tensor([math.inf, 0.0]), torch.zeros(2), actions=torch.tensor([1, 1]))
    (o,) = report(diag).outliers
    assert o.head == "joint" and o.samples == 7 and o.nonfinite == 2
    assert sorted(o.minibatches[:2]) == [0, 1] and o.indices[2:] == [3]
    assert math.isnan(o.ratios[o.minibatches.index(0)]) and o.ratios[o.minibatches.index(1)] == math.inf
    assert o.actions[2] == 1 and o.logp_diff[2] == pytest.approx(-0.4)
    assert math.isnan(o.logp_diff_mean) and math.isnan(o.logp_diff_max)  # NaN travels as NaN
    assert o.head_actions == {} and o.epochs == [-1, -1, -1]


def test_outliers_without_actions_or_heads() -> None:
    diag = DebugDiagnostics({"w": nn.Parameter(torch.zeros(1))})
    diag.observe_minibatch(torch.tensor([0.5, -2.0, 0.1]), torch.zeros(3))
    (o,) = report(diag).outliers
    assert (
        o.indices == [1, 0, 2]
        and o.actions == []
        and o.ratios == pytest.approx(np.exp([-2.0, 0.5, 0.1]).tolist())
    )


# ---------------------------------------------------------------------------------------------
# Gradient conflict on a real actor-critic
# ---------------------------------------------------------------------------------------------
def float64_reference_cosines(model: nn.Module, batch: dict) -> dict[str, float]:
    """Separate backward passes of each term on a float64 copy; cosine on shared parameters."""
    m64 = copy.deepcopy(model).double()
    b64 = {
        k: (
            {h: t.double() if t.is_floating_point() else t for h, t in v.items()}
            if isinstance(v, dict)
            else v.double()
        )
        for k, v in batch.items()
    }
    b64["actions"] = batch["actions"]
    grads: dict[str, dict[str, torch.Tensor]] = {}
    t = loss_terms(m64, b64)
    terms = {"policy": t["policy"], "value": t["value"], **{f"head:{h}": v for h, v in t["heads"].items()}}
    for name, term in terms.items():
        m64.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        grads[name] = {n: p.grad.clone() for n, p in m64.named_parameters() if p.grad is not None}

    def cos(a: str, b: str) -> float:
        shared = sorted(set(grads[a]) & set(grads[b]))
        va = torch.cat([grads[a][n].reshape(-1) for n in shared])
        vb = torch.cat([grads[b][n].reshape(-1) for n in shared])
        return (va @ vb / (va.norm() * vb.norm())).item()

    out = {"policy|value": cos("policy", "value"), "direction|force": cos("head:direction", "head:force")}
    for h in HEADS:
        out[f"{h}|value"] = cos(f"head:{h}", "value")
    out["shared"] = len(set(grads["policy"]) & set(grads["value"]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_conflict_matches_float64_separate_backward(seed: int) -> None:
    torch.manual_seed(seed)
    model = ActorCritic()
    batch = make_batch(seed=seed, t=4 + seed, n=3 + seed)
    want = float64_reference_cosines(model, batch)
    diag = DebugDiagnostics(model, HEADS)
    t = loss_terms(model, batch)
    diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
    out = report(diag).conflict
    assert out is not None
    assert out.extra_backward_passes == 4  # policy + value + two head losses
    assert out.policy_value_cosine == pytest.approx(want["policy|value"], abs=2e-5)
    assert out.head_cosines["direction|force"] == pytest.approx(want["direction|force"], abs=2e-5)
    for h in HEADS:
        assert out.head_value_cosines[h] == pytest.approx(want[f"{h}|value"], abs=2e-5)
    # encoder (2) + LSTM (4) reach both; the heads and the critic do not
    assert out.shared_params == want["shared"] == 6
    assert out.shared_numel == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("encoder", "lstm"))
    )
    assert out.policy_norm > 0 and out.value_norm > 0


def test_gradient_conflict_leaves_grad_and_the_loops_backward_untouched() -> None:
    torch.manual_seed(5)
    model = ActorCritic()
    twin = copy.deepcopy(model)
    batch = make_batch(seed=5)
    stale = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # the loop accumulates into existing .grad
        p.grad = stale[n].clone()
    diag = DebugDiagnostics(model, HEADS)
    t = loss_terms(model, batch)
    diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, stale[n]), n  # nothing accumulated by the conflict computation
    (t["policy"] + 0.5 * t["value"]).backward()  # the loop's own backward still works (graph retained)
    for n, q in twin.named_parameters():
        q.grad = stale[n].clone()
    t2 = loss_terms(twin, batch)
    (t2["policy"] + 0.5 * t2["value"]).backward()  # the same step without the diagnostics
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # once per update: a second call of the same update costs nothing and is counted
    t3 = loss_terms(model, batch)
    diag.observe_loss_terms(t3["policy"], t3["value"], t3["heads"])
    out = report(diag).conflict
    assert out is not None and out.skipped_calls == 1 and out.extra_backward_passes == 4


def test_gradient_conflict_undefined_cases() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    u = nn.Parameter(torch.tensor([3.0]))
    diag = DebugDiagnostics({"w": w, "u": u}, {"a": 2, "b": 2})
    # value loss reaches w with a zero gradient; head b shares nothing with head a
    diag.observe_loss_terms((w * 2).sum(), (w * 0).sum(), {"a": (w**2).sum(), "b": (u * 3).sum()})
    out = report(diag).conflict
    assert out is not None
    assert out.policy_value_cosine is None and out.shared_params == 1  # zero gradient: no direction
    assert out.head_cosines == {"a|b": None} and out.head_value_cosines == {"a": None, "b": None}
    assert out.extra_backward_passes == 4


# ---------------------------------------------------------------------------------------------
# Host syncs: zero in observe + pending, exactly one in the transfer
# ---------------------------------------------------------------------------------------------
def run_update(
    model: nn.Module, diag: DebugDiagnostics, opt: torch.optim.Optimizer, on_step: Callable[[], None]
) -> None:
    for epoch in range(2):
        for mb in range(3):
            batch = make_batch(seed=10 * epoch + mb)
            t = loss_terms(model, batch)
            diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
            loss = t["policy"] + 0.5 * t["value"]
            opt.zero_grad()
            loss.backward()
            diag.observe_gradients(loss)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
            opt.step()
            idx = torch.randperm(30)
            diag.observe_minibatch(
                t["joint"].detach(),
                batch["old"],
                {h: v.detach() for h, v in t["head_lp"].items()},
                batch["old_head"],
                {h: batch["actions"][h] for h in HEADS},
                idx,
                epoch=epoch,
            )
            on_step()


def test_whole_update_has_zero_host_syncs_until_the_one_transfer() -> None:
    """Real training (2 epochs x 3 minibatches, clip, SGD) at DEBUG: observe + pending never sync."""
    torch.manual_seed(0)
    model = ActorCritic()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # SGD on CPU syncs nothing itself
    diag = DebugDiagnostics(model, HEADS)
    with SyncCounter() as counter:
        diag.reset(DEBUG)
        run_update(model, diag, opt, lambda: None)
        pending = diag.pending(DEBUG)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]  # the one materialisation of the update
    out = diag.build(host, DEBUG)
    assert out is not None
    assert len(out.numerical.pre_clip_norms) == 6 and all(r.calls == 6 for r in out.layers)
    assert out.conflict is not None and out.conflict.skipped_calls == 5  # computed once per update
    assert [o.samples for o in out.outliers] == [180, 180, 180]


def test_below_debug_observes_are_no_ops() -> None:
    torch.manual_seed(1)
    model = ActorCritic()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    diag = DebugDiagnostics(model, HEADS)
    diag.reset(TelemetryLevel.NORMAL)
    run_update(model, diag, opt, lambda: None)
    assert diag.pending(TelemetryLevel.NORMAL) == {} and diag.build({}, TelemetryLevel.NORMAL) is None
    out = report(diag)  # asked at DEBUG anyway: nothing was accumulated
    assert all(r.calls == 0 for r in out.layers) and out.outliers == [] and out.conflict is None


# ---------------------------------------------------------------------------------------------
# Levels, schema, bad input
# ---------------------------------------------------------------------------------------------
def test_below_debug_nothing_is_pending_or_built() -> None:
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    diag = DebugDiagnostics({"p": p})
    diag.reset("normal")
    diag.observe_gradients()
    diag.observe_minibatch(torch.zeros(3), torch.zeros(3))
    for level in (TelemetryLevel.OFF, TelemetryLevel.MINIMAL, TelemetryLevel.NORMAL):
        assert diag.pending(level) == {}
        assert diag.build({}, level) is None
    out = report(diag)  # DEBUG asked after a NORMAL update: weights only, nothing observed
    assert out.layers[0].calls == 0 and out.outliers == [] and out.conflict is None


def test_report_round_trips_through_the_wire_schema() -> None:
    torch.manual_seed(2)
    model = ActorCritic()
    diag = DebugDiagnostics(model, HEADS)
    batch = make_batch()
    t = loss_terms(model, batch)
    diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
    loss = t["policy"] + t["value"]
    loss.backward()
    next(model.parameters()).grad[0, 0] = math.nan
    diag.observe_gradients(loss)
    diag.observe_minibatch(t["joint"].detach(), batch["old"], actions=batch["actions"])
    out = report(diag)
    snap = Snapshot(step=1, wall_time=0.0, debug=out)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=Snapshot)
    assert back.debug is not None
    assert back.debug.numerical.nonfinite_grads == ["encoder.weight"]
    assert back.debug.outliers[0].head_actions == out.outliers[0].head_actions
    assert back.debug.conflict == out.conflict


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda d: d.observe_minibatch(torch.zeros(4), torch.zeros(5)), ValueError, "old_logprob"),
        (lambda d: d.observe_minibatch(torch.zeros(0), torch.zeros(0)), ValueError, "new_logprob is empty"),
        (
            lambda d: d.observe_minibatch(torch.zeros(3, dtype=torch.long), torch.zeros(3)),
            TypeError,
            "new_logprob",
        ),
        (lambda d: d.observe_minibatch(torch.zeros(3), [0.0, 0.0, 0.0]), TypeError, "old_logprob"),
        (
            lambda d: d.observe_minibatch(
                torch.zeros(3), torch.zeros(3), {"nope": torch.zeros(3)}, {"nope": torch.zeros(3)}
            ),
            ValueError,
            "head_new_logprobs names unknown heads",
        ),
        (
            lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), {"a": torch.zeros(3)}, None),
            ValueError,
            "head_old_logprobs",
        ),
        (
            lambda d: d.observe_minibatch(
                torch.zeros(3), torch.zeros(3), {"a": torch.zeros(3)}, {"b": torch.zeros(3)}
            ),
            ValueError,
            "head_new_logprobs has heads",
        ),
        (
            lambda d: d.observe_minibatch(
                torch.zeros(3), torch.zeros(3), {"a": torch.zeros(2)}, {"a": torch.zeros(2)}
            ),
            ValueError,
            r"head_new_logprobs\['a'\]",
        ),
        (
            lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), indices=torch.zeros(3)),
            TypeError,
            "indices",
        ),
        (
            lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), indices=torch.arange(4)),
            ValueError,
            "indices",
        ),
        (
            lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), actions=torch.zeros(3, 3)),
            ValueError,
            "actions",
        ),
        (
            lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), actions={"c": torch.zeros(3)}),
            ValueError,
            "actions",
        ),
        (
            lambda d: d.observe_minibatch(
                torch.zeros(3), torch.zeros(3), actions=torch.ones(3, 2, dtype=torch.bool)
            ),
            TypeError,
            "actions",
        ),
        (lambda d: d.observe_minibatch(torch.zeros(3), torch.zeros(3), epoch=1.5), TypeError, "epoch"),
        (lambda d: d.observe_gradients(loss=torch.tensor(1)), TypeError, "loss"),
        (lambda d: d.observe_gradients(loss="1.0"), TypeError, "loss"),
        (
            lambda d: d.observe_loss_terms(torch.tensor(1.0), torch.tensor(1.0)),
            ValueError,
            "policy_loss does not require grad",
        ),
        (
            lambda d: d.observe_loss_terms(torch.ones(2, requires_grad=True), None),
            ValueError,
            "policy_loss must be a scalar",
        ),
        (
            lambda d: d.observe_loss_terms(torch.ones((), requires_grad=True)),
            ValueError,
            "at least two loss terms",
        ),
        (
            lambda d: d.observe_loss_terms(None, None, {"zzz": torch.ones((), requires_grad=True)}),
            ValueError,
            "head_losses names unknown heads",
        ),
    ],
)
def test_bad_input_gives_clear_errors(call: Callable, exc: type[Exception], match: str) -> None:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    diag = DebugDiagnostics({"p": p}, {"a": 2, "b": 3})
    with pytest.raises(exc, match=match):
        call(diag)


def test_bad_construction_and_loss_terms_after_backward() -> None:
    with pytest.raises(ValueError, match="named_params is empty"):
        DebugDiagnostics({})
    with pytest.raises(TypeError, match="named_params"):
        DebugDiagnostics(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"named_params\['i'\]"):
        DebugDiagnostics({"i": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="max_grad_norm"):
        DebugDiagnostics({"p": nn.Parameter(torch.zeros(1))}, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="outlier_top_k"):
        DebugDiagnostics({"p": nn.Parameter(torch.zeros(1))}, thresholds=Thresholds(outlier_top_k=0))
    with pytest.raises(ValueError, match="heads"):
        DebugDiagnostics({"p": nn.Parameter(torch.zeros(1))}, ["joint"])
    model = ActorCritic()
    t = loss_terms(model, make_batch())
    (t["policy"] + t["value"]).backward()  # graph freed
    diag = DebugDiagnostics(model, HEADS)
    with pytest.raises(ValueError, match="before the loop's backward"):
        diag.observe_loss_terms(t["policy"], t["value"])
    with pytest.raises(RuntimeError, match="pending"):
        DebugDiagnostics(model, HEADS).build({}, DEBUG)


# ---------------------------------------------------------------------------------------------
# CUDA: the same update on the GPU, no sync allowed, same numbers as on the CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_update_without_syncs_matches_cpu(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    cpu_model = ActorCritic().to(dtype)
    gpu_model = copy.deepcopy(cpu_model)
    diags = {"cpu": DebugDiagnostics(cpu_model, HEADS), "cuda": DebugDiagnostics(gpu_model, HEADS)}
    gpu_model.cuda()  # moved after construction: the diagnostics follow at the next reset
    reports = []
    for model, dev in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        diag = diags[dev]
        diag.reset(DEBUG)
        batch = make_batch(dtype=dtype)
        batch = {
            k: ({h: t.to(dev) for h, t in v.items()} if isinstance(v, dict) else v.to(dev))
            for k, v in batch.items()
        }
        t = loss_terms(model, batch)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
            loss = t["policy"] + t["value"]
            loss.backward()
            diag.observe_gradients(loss)
            diag.observe_minibatch(
                t["joint"].detach(), batch["old"], {h: v.detach() for h, v in t["head_lp"].items()},
                batch["old_head"], batch["actions"], torch.arange(30, device=dev), epoch=0,
            )  # fmt: skip
            pending = diag.pending(DEBUG)
        finally:
            torch.cuda.set_sync_debug_mode(0) if dev == "cuda" else None
        reports.append(diag.build(transfer(pending), DEBUG))
    cpu, gpu = reports
    assert cpu is not None and gpu is not None
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(cpu.layers, gpu.layers):
        assert (a.name, a.calls, a.nan, a.inf) == (b.name, b.calls, b.nan, b.inf)
        assert b.norm == pytest.approx(a.norm, rel=tol, abs=1e-6)
    assert gpu.outliers[0].indices == cpu.outliers[0].indices or dtype != torch.float32
    assert gpu.conflict is not None and cpu.conflict is not None
    assert gpu.conflict.policy_value_cosine == pytest.approx(cpu.conflict.policy_value_cosine, abs=10 * tol)


# ---------------------------------------------------------------------------------------------
# The chunked table: many chunks, padding, NaN among one-signed values, schedules, float32
# ---------------------------------------------------------------------------------------------
def test_table_is_exact_across_chunks_padding_and_nan_among_one_signed_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tensors spanning several 1024-element chunks, none a multiple of it (padding in each last
    chunk), positive-only and negative-only values next to NaN/Inf (where a 0 standing in for the
    NaN would be a wrong min or max), an all-NaN chunk, a one-element tensor, against float64.
    MIXED_CHUNKS is cut to the 4 chunks that hold NaN/Inf among finite values, so neither repair
    (last chunks, mixed chunks) is covered by the other. Mutation check (by hand): leaving out the
    last chunks, or the mixed ones, each fail this test."""
    import telemetry_core.debug.layers as layers_module
    from telemetry_core.debug.layers import CHUNK

    monkeypatch.setattr(layers_module, "MIXED_CHUNKS", 4)

    gen = torch.Generator().manual_seed(17)
    shapes = {"pos": (3 * CHUNK + 5,), "neg": (2, CHUNK + 1), "mixed": (5 * CHUNK - 3,), "one": (1,)}
    params = {n: nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    diag = DebugDiagnostics(params, max_grad_norm=0.5, table_every=1)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for call in range(2):
        for name, p in params.items():
            g = torch.rand(p.shape, generator=gen) + 0.25  # strictly positive
            if name == "neg":
                g = -g
            flat = g.view(-1)
            if name in ("pos", "neg"):
                flat[[7, CHUNK + 3]] = math.nan  # NaN inside chunks whose finite values share a sign
                flat[CHUNK + 9] = math.inf if call else -math.inf
            if name == "mixed":
                flat[CHUNK : 2 * CHUNK] = math.nan  # a whole chunk
                flat[3 * CHUNK :] *= -1.0
                flat[0] = 0.0
                flat[1] = -0.0
            p.grad = g
            seen[name].append(g.clone())
        diag.observe_gradients()
    out = report(diag)
    th = Thresholds()
    for row in out.layers:
        check_row(row, reference_layer(seen[row.name], th.grad_small_rel * 0.5, th.grad_large_rel * 0.5))
    rows = {r.name: r for r in out.layers}
    assert rows["pos"].min > 0.25 - 1e-7 and rows["neg"].max < -0.25 + 1e-7  # never a stand-in 0
    assert out.layer_every == 1 and out.layer_backwards == 2


def test_comparisons_at_exactly_their_limits() -> None:
    """zero counts +0 and -0; small is 0 < |g| < small (strict); large is |g| > large (strict), +-inf
    excluded (counted as inf). Limits are powers of two, so each value is exactly representable.
    Mutation check (by hand): ``lt`` -> ``le`` for small, ``gt`` -> ``ge`` for large, and counting
    inf as large each fail this test."""
    th = Thresholds(grad_small_rel=2.0**-20, grad_large_rel=2.0)
    small, large = 2.0**-21, 1.0  # at max_grad_norm 0.5
    below_small = float(np.nextafter(np.float32(small), np.float32(0)))
    above_large = float(np.nextafter(np.float32(large), np.float32(2)))
    values = [0.0, -0.0, small, -small, below_small, large, -large, above_large, -above_large, math.inf]
    p = nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values)
    diag = DebugDiagnostics({"w": p}, thresholds=th, max_grad_norm=0.5)
    diag.observe_gradients()
    row = report(diag).layers[0]
    n = len(values)
    assert row.zero_frac == 2 / n
    assert row.small_frac == 1 / n  # below_small only
    assert row.large_frac == 2 / n  # +-above_large; the limit itself and inf are not large
    assert (row.nan, row.inf) == (0, 1)


def test_table_schedule_examines_every_nth_backward_of_the_run() -> None:
    """With table_every=3 the element statistics cover backwards 0, 3, 6, ... of the run (a counter
    that continues across updates); norms, calls and non-finite names come from every backward."""
    p = nn.Parameter(torch.zeros(4))
    diag = DebugDiagnostics({"w": p}, max_grad_norm=0.5, table_every=3)
    assert diag.table_every == 3
    grads = [torch.tensor([1.0, 2.0, 3.0, 4.0]) * (k + 1) for k in range(5)]
    diag.reset(DEBUG)
    for g in grads[:2]:  # run backwards 0, 1
        p.grad = g
        diag.observe_gradients()
    first = report(diag)
    assert (first.layer_every, first.layer_backwards) == (3, 1)
    assert first.layers[0].calls == 2
    row = first.layers[0]
    assert (row.mean, row.min, row.max) == (2.5, 1.0, 4.0)  # backward 0 only
    assert first.layers[0].norm == pytest.approx((30**0.5 + 2 * 30**0.5) / 2)
    diag.reset(DEBUG)
    for k, g in enumerate(grads[2:]):  # run backwards 2, 3, 4: only 3 is examined
        p.grad = g.clone()
        if k == 0:
            p.grad[0] = math.nan  # a NaN on a backward the table skips is still named
        diag.observe_gradients()
    second = report(diag)
    assert second.layer_backwards == 1 and second.layers[0].max == 16.0
    assert second.layers[0].nan == 0  # the examined backward had none
    assert second.numerical.nonfinite_grads == ["w"]
    diag.reset(DEBUG)
    p.grad = grads[0]
    diag.observe_gradients()  # run backward 5: not examined
    third = report(diag)
    assert third.layer_backwards == 0 and math.isnan(third.layers[0].mean) and third.layers[0].calls == 1
    assert DebugDiagnostics({"w": p}).table_every == 1  # "auto": small models, every backward
    with pytest.raises(ValueError, match="table_every"):
        DebugDiagnostics({"w": p}, table_every=0)


def test_conflict_schedule_runs_on_every_nth_debug_update() -> None:
    torch.manual_seed(9)
    model = ActorCritic()
    diag = DebugDiagnostics(model, HEADS, conflict_every=2)
    got = []
    for update in range(4):
        diag.reset(DEBUG)
        t = loss_terms(model, make_batch(seed=update))
        diag.observe_loss_terms(t["policy"], t["value"], t["heads"])
        (t["policy"] + t["value"]).backward()
        diag.observe_gradients()
        out = report(diag)
        got.append(out.conflict is not None)
        assert out.conflict_every == 2
        model.zero_grad(set_to_none=True)
    assert got == [True, False, True, False]
    with pytest.raises(ValueError, match="conflict_every"):
        DebugDiagnostics(model, HEADS, conflict_every="never")


def test_float32_accumulation_path_matches_the_float64_reference() -> None:
    """Devices without float64 (MPS) accumulate and transfer in float32: forced here on the CPU."""
    from telemetry_core.reductions.transfer import float64_disabled

    gen = torch.Generator().manual_seed(23)
    params = {f"p{i}": nn.Parameter(torch.zeros(s)) for i, s in enumerate([(40, 30), (30,), (7,)])}
    with float64_disabled():
        diag = DebugDiagnostics(params, max_grad_norm=0.5)
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in params}
        for call in range(3):
            for name, p in params.items():
                p.grad = random_grad(p.shape, gen, scale=1.0, extreme=call == 0).float()
                seen[name].append(p.grad.clone())
            diag.observe_gradients(torch.tensor(0.5))
        pending = diag.pending(DEBUG)
        assert all(t.dtype != torch.float64 for t in pending.values())
        out = diag.build(transfer(pending), DEBUG)
    assert out is not None
    th = Thresholds()
    for row in out.layers:
        check_row(
            row, reference_layer(seen[row.name], th.grad_small_rel * 0.5, th.grad_large_rel * 0.5), rtol=1e-4
        )


def test_a_whole_debug_update_without_float64_matches_the_float64_one() -> None:
    """The demo trainer under a real hub at DEBUG, every reducer accumulating and transferring in
    float32 (as on MPS, forced here on the CPU), against the same training in float64."""
    from telemetry_core.config import TelemetryConfig
    from telemetry_core.demo.ppo import DemoConfig, iter_train, make_agent, make_hub
    from telemetry_core.reductions.transfer import float64_disabled

    cfg = DemoConfig(seed=3, num_updates=1, num_envs=2, num_steps=16, update_epochs=1, num_minibatches=2)
    snaps = []
    for forced in (False, True):
        agent = make_agent(cfg)
        hub = make_hub(
            agent, cfg, bind=None, strict=True, config=TelemetryConfig(level="DEBUG", auto_escalate=False)
        )
        got = []
        original = hub.end_update

        def keep(*args, _orig=original, _got=got, **kwargs):  # type: ignore[no-untyped-def]
            snap = _orig(*args, **kwargs)
            _got.append(snap)
            return snap

        hub.end_update = keep  # type: ignore[method-assign]
        try:
            if forced:
                with float64_disabled():
                    list(iter_train(cfg, hub=hub, agent=agent))
            else:
                list(iter_train(cfg, hub=hub, agent=agent))
        finally:
            hub.close()
        snaps.append(got[-1])
    wide, narrow = snaps
    assert wide is not None and narrow is not None and narrow.debug is not None
    assert narrow.gradients.total_norm == pytest.approx(wide.gradients.total_norm, rel=1e-5)
    assert narrow.policy.kl_k3_mean == pytest.approx(wide.policy.kl_k3_mean, rel=1e-3, abs=1e-7)
    assert narrow.value.explained_variance == pytest.approx(wide.value.explained_variance, rel=1e-4, abs=1e-6)
    for a, b in zip(wide.debug.layers, narrow.debug.layers):
        assert b.norm == pytest.approx(a.norm, rel=1e-5) and b.std == pytest.approx(a.std, rel=1e-4)
