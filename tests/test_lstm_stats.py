"""LSTMReducer: state statistics and gate saturation against float64 numpy; the manual replay
reproduces nn.LSTM itself (layers, batch_first, proj_size, bidirectional, no bias), and, with a
reset mask, a loop that zeroes the state at episode starts (against float64 nn.LSTMCell stepped by
hand); bad input; zero host syncs before the transfer; cuDNN's process-wide switch never touched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.lstm import LSTMReducer, _replay, replay_lstm
from telemetry_core.reductions.transfer import transfer

NORMAL, DEBUG = TelemetryLevel.NORMAL, TelemetryLevel.DEBUG
# nn.LSTM itself warns that oneDNN has no projection kernel; that is torch's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
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


def run(reducer: LSTMReducer, level: TelemetryLevel = NORMAL):
    return reducer.build(transfer(reducer.pending(level)), level)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# ------------------------------------------------------------------------------------------------
# An independent float64 numpy LSTM: the reference for gates and outputs
# ------------------------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def numpy_lstm(lstm: torch.nn.LSTM, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, resets=None):
    """x time-major (T, B, F). Returns (gate pre-activations per (layer, dir) as (T, B, 4H), out, h_n, c_n).
    ``resets`` (T, B): the state entering step t of row b is zeroed where it is nonzero (unidirectional)."""
    dirs = 2 if lstm.bidirectional else 1
    w = {name: np64(p) for name, p in lstm.named_parameters()}
    gates, hn, cn = {}, [], []
    layer_in = x
    hidden = lstm.hidden_size
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            seq = layer_in[::-1] if d else layer_in
            h, c = h0[layer * dirs + d], c0[layer * dirs + d]
            zs, ys = [], []
            for t in range(seq.shape[0]):
                if resets is not None:
                    keep = (resets[t] == 0)[:, None]
                    h, c = h * keep, c * keep
                z = seq[t] @ w["weight_ih" + sfx].T + h @ w["weight_hh" + sfx].T
                if lstm.bias:
                    z = z + w["bias_ih" + sfx] + w["bias_hh" + sfx]
                zs.append(z)
                i, f = sigmoid(z[:, :hidden]), sigmoid(z[:, hidden : 2 * hidden])
                g, o = np.tanh(z[:, 2 * hidden : 3 * hidden]), sigmoid(z[:, 3 * hidden :])
                c = f * c + i * g
                h = o * np.tanh(c)
                if lstm.proj_size:
                    h = h @ w["weight_hr" + sfx].T
                ys.append(h)
            gates[(layer, d)] = np.stack(zs)
            y = np.stack(ys)
            outs.append(y[::-1] if d else y)
            hn.append(h)
            cn.append(c)
        layer_in = np.concatenate(outs, axis=2)
    return gates, layer_in, np.stack(hn), np.stack(cn)


def reference_saturation(gates: dict, hidden: int, eps: float) -> tuple[dict, dict, dict]:
    """(low counts, high counts, ambiguous counts) per gate, from float64 sigmoid of the pre-activations."""
    low, high, near = {}, {}, {}
    for name, j in (("input", 0), ("forget", 1), ("output", 3)):
        z = np.concatenate([g[..., j * hidden : (j + 1) * hidden].ravel() for g in gates.values()])
        s = sigmoid(z)
        low[name], high[name] = int((s < eps).sum()), int((s > 1 - eps).sum())
        lo_edge = math.log(eps / (1 - eps))
        near[name] = int((np.abs(np.abs(z) - abs(lo_edge)) < 1e-4).sum())  # float32 may fall either side
    return low, high, near


def make_lstm(seed: int, scale: float = 1.0, **kwargs) -> torch.nn.LSTM:
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(**kwargs)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(scale)
    return lstm


CONFIGS = [
    {"input_size": 5, "hidden_size": 8},
    {"input_size": 5, "hidden_size": 8, "num_layers": 2},
    {"input_size": 5, "hidden_size": 8, "num_layers": 2, "batch_first": True},
    {"input_size": 5, "hidden_size": 8, "proj_size": 3},
    {"input_size": 5, "hidden_size": 8, "num_layers": 2, "bidirectional": True},
    {
        "input_size": 5,
        "hidden_size": 8,
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 4,
        "batch_first": True,
    },
    {"input_size": 5, "hidden_size": 8, "bias": False},
]


def random_state(lstm: torch.nn.LSTM, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h0 = torch.randn(layers, batch, lstm.proj_size or lstm.hidden_size) * 0.5
    c0 = torch.randn(layers, batch, lstm.hidden_size)
    return h0, c0


# ------------------------------------------------------------------------------------------------
# The replay reproduces nn.LSTM; the gates match float64
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("with_state", [False, True])
def test_replay_reproduces_nn_lstm(config, with_state):
    lstm = make_lstm(0, **config)
    x = torch.randn(4, 6, 5)  # (T, B, F)
    if lstm.batch_first:
        x = x.transpose(0, 1)
    state = random_state(lstm, 6) if with_state else None
    with torch.no_grad():
        want, (want_h, want_c) = lstm(x, state)
    got, (h, c) = replay_lstm(lstm, x, state)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(c, want_c, atol=2e-6, rtol=1e-5)


def test_replay_of_one_step_batch():
    """(B, F) is one time step of B rows (nn.LSTM would read it as one unbatched sequence)."""
    lstm = make_lstm(1, input_size=5, hidden_size=8, num_layers=2)
    x = torch.randn(7, 5)
    state = random_state(lstm, 7)
    with torch.no_grad():
        want, (want_h, want_c) = lstm(x.unsqueeze(0), state)
    got, (h, c) = replay_lstm(lstm, x, state)
    torch.testing.assert_close(c, want_c, atol=2e-6, rtol=1e-5)
    assert got.shape == (7, 8)
    torch.testing.assert_close(got, want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_replayed_gates_and_outputs_match_float64(config):
    lstm = make_lstm(2, scale=4.0, **config)  # large weights: plenty of saturated gates
    x = torch.randn(5, 6, 5) * 2
    if lstm.batch_first:
        x = x.transpose(0, 1)
    h0, c0 = random_state(lstm, 6)
    seen: dict[tuple[int, int], list[torch.Tensor]] = {}
    out, (h, c) = replay_lstm(
        lstm, x, (h0, c0), on_gates=lambda layer, d, t, z: seen.setdefault((layer, d), []).append(z)
    )
    xt = np64(x.transpose(0, 1) if lstm.batch_first else x)
    gates, ref_out, ref_h, ref_c = numpy_lstm(lstm, xt, np64(h0), np64(c0))
    for key, zs in seen.items():
        got = np64(torch.stack(zs))  # the reverse direction: both step the reversed sequence
        np.testing.assert_allclose(got, gates[key], atol=5e-5, rtol=1e-5)
    ref_out_layout = ref_out.transpose(1, 0, 2) if lstm.batch_first else ref_out
    np.testing.assert_allclose(np64(out), ref_out_layout, atol=1e-5)
    np.testing.assert_allclose(np64(h), ref_h, atol=1e-5)
    np.testing.assert_allclose(np64(c), ref_c, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_gate_saturation_matches_float64_all_rows(config, eps):
    lstm = make_lstm(3, scale=3.0, **config)
    batch = 10
    x = torch.randn(6, batch, 5) * 2
    h0, c0 = random_state(lstm, batch)
    if lstm.batch_first:
        x = x.transpose(0, 1)
    with torch.no_grad():
        _, (h, c) = lstm(x, (h0, c0))
    reducer = LSTMReducer(lstm, Thresholds(lstm_gate_eps=eps))
    reducer.observe(h, c, inputs=x, input_state=(h0, c0), level=DEBUG)
    stats = run(reducer, DEBUG)
    xt = np64(x.transpose(0, 1) if lstm.batch_first else x)
    gates, *_ = numpy_lstm(lstm, xt, np64(h0), np64(c0))
    low, high, near = reference_saturation(gates, lstm.hidden_size, eps)
    dirs = 2 if lstm.bidirectional else 1
    total = 6 * batch * lstm.hidden_size * lstm.num_layers * dirs
    assert stats.gate_total == total and stats.gate_rows == batch and stats.gate_steps == 6
    for name in ("input", "forget", "output"):
        tol = near[name] / total
        assert abs(stats.gate_saturation_low[name] - low[name] / total) <= tol, name
        assert abs(stats.gate_saturation_high[name] - high[name] / total) <= tol, name
        assert stats.gate_saturation[name] == pytest.approx(
            stats.gate_saturation_low[name] + stats.gate_saturation_high[name]
        )
    assert sum(low.values()) + sum(high.values()) > 0  # the test exercised saturation


def test_normal_level_uses_an_evenly_spaced_sample_of_rows():
    lstm = make_lstm(4, scale=3.0, input_size=5, hidden_size=8)
    batch, sample = 50, 7
    x = torch.randn(3, batch, 5) * 2
    h0, c0 = random_state(lstm, batch)
    with torch.no_grad():
        _, (h, c) = lstm(x, (h0, c0))
    reducer = LSTMReducer(lstm, Thresholds(lstm_gate_sample=sample))
    reducer.observe(h, c, inputs=x, input_state=(h0, c0), level=NORMAL)
    stats = run(reducer)
    assert stats.gate_rows == sample and stats.gate_total == 3 * sample * 8
    rows = [i * batch // sample for i in range(sample)]
    gates, *_ = numpy_lstm(lstm, np64(x[:, rows]), np64(h0[:, rows]), np64(c0[:, rows]))
    low, high, near = reference_saturation(gates, 8, 0.01)
    for name in low:
        tol = near[name] / stats.gate_total
        assert abs(stats.gate_saturation_low[name] - low[name] / stats.gate_total) <= tol
        assert abs(stats.gate_saturation_high[name] - high[name] / stats.gate_total) <= tol
    # A batch no larger than the sample is used whole; no input state means zeros.
    reducer.observe(h[:, :5], c[:, :5], inputs=x[:, :5], level=NORMAL)
    assert run(reducer).gate_rows == 5


def test_saturated_lstm_reads_saturated_and_healthy_one_does_not():
    x = torch.randn(20, 16, 5)
    healthy = make_lstm(5, input_size=5, hidden_size=32)
    blown = make_lstm(5, scale=40.0, input_size=5, hidden_size=32)
    results = {}
    for name, lstm in (("healthy", healthy), ("blown", blown)):
        with torch.no_grad():
            _, (h, c) = lstm(x)
        reducer = LSTMReducer(lstm)
        reducer.observe(h, c, inputs=x, level=DEBUG)
        results[name] = run(reducer, DEBUG)
    assert max(results["healthy"].gate_saturation.values()) < 0.05
    assert min(results["blown"].gate_saturation.values()) > 0.5


# ------------------------------------------------------------------------------------------------
# State statistics
# ------------------------------------------------------------------------------------------------


def reference_state(x: np.ndarray) -> dict:
    sq = x**2
    return {
        "norm": math.sqrt(sq.sum()),
        "rms": math.sqrt(sq.mean()),
        "max_abs": np.abs(x).max(),
        "env_rms_max": math.sqrt(sq.mean(axis=(0, 2)).max()),
        "mean": x.mean(),
    }


@pytest.mark.parametrize("shape", [(1, 8, 16), (2, 3, 5), (3, 1, 4), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_state_statistics_match_float64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    h = (torch.randn(shape, generator=gen) * 3).to(dtype)
    c = (torch.randn(shape, generator=gen) * 10 + 1).to(dtype)
    reducer = LSTMReducer(None)
    reducer.observe(h, c)
    stats = run(reducer)
    for which, t in (("h", h), ("c", c)):
        arr = np64(t if t.dim() == 3 else t.unsqueeze(1))
        ref = reference_state(arr)
        assert getattr(stats, f"{which}_norm") == pytest.approx(ref["norm"], rel=1e-12)
        assert getattr(stats, f"{which}_rms") == pytest.approx(ref["rms"], rel=1e-12)
        assert getattr(stats, f"{which}_max_abs") == ref["max_abs"]
        assert getattr(stats, f"{which}_env_rms_max") == pytest.approx(ref["env_rms_max"], rel=1e-12)
    assert stats.c_mean == pytest.approx(np64(c).mean(), rel=1e-12)
    assert stats.h_nan == stats.c_inf == 0
    assert stats.gate_saturation == {} and stats.gate_rows == 0  # no LSTM: no gates


def test_one_runaway_environment_shows_in_env_rms_max():
    h = torch.full((2, 64, 16), 0.1)
    h[:, 17] = 10.0
    reducer = LSTMReducer(None)
    reducer.observe(h, h.clone())
    stats = run(reducer)
    assert stats.h_env_rms_max == pytest.approx(10.0)
    assert stats.h_rms < 1.5


def test_nan_inf_and_zero_states():
    h = torch.randn(1, 4, 8)
    c = torch.randn(1, 4, 8)
    h[0, 1, 2] = math.nan
    c[0, 0, 0] = math.inf
    c[0, 3, 1] = -math.inf
    reducer = LSTMReducer(None)
    reducer.observe(h, c)
    stats = run(reducer)
    assert (stats.h_nan, stats.h_inf, stats.c_nan, stats.c_inf) == (1, 0, 0, 2)
    assert math.isnan(stats.h_norm) and math.isnan(stats.h_max_abs) and math.isnan(stats.h_env_rms_max)
    assert stats.c_norm == math.inf and stats.c_max_abs == math.inf and math.isnan(stats.c_mean)

    reducer.observe(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    stats = run(reducer)
    assert (stats.h_norm, stats.h_rms, stats.h_max_abs, stats.c_mean) == (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# Levels, bad input, syncs, a real recurrent policy, CUDA
# ------------------------------------------------------------------------------------------------


def test_levels_and_no_state():
    lstm = make_lstm(6, input_size=5, hidden_size=8)
    h, c = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    reducer = LSTMReducer(lstm)
    assert run(reducer) is None  # nothing observed: a non-recurrent update
    reducer.observe(h, c, inputs=torch.randn(3, 4, 5), level=TelemetryLevel.MINIMAL)
    assert reducer.pending(TelemetryLevel.MINIMAL) == {}
    assert reducer.build({}, TelemetryLevel.MINIMAL) is None
    assert run(reducer) is None
    reducer.observe(h, c, level=NORMAL)
    stats = run(reducer)
    assert stats is not None and stats.gate_saturation == {}  # no inputs: no gates


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda r, lstm: r.observe(torch.ones(1, 4, 8, dtype=torch.long), torch.randn(1, 4, 8)), TypeError, "h must be a floating"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 5, 8)), ValueError, "c has"),
        (lambda r, lstm: r.observe(torch.randn(4, 8), torch.randn(1, 4, 8)), ValueError, "h has shape"),
        (lambda r, lstm: r.observe(torch.randn(1, 1, 4, 8), torch.randn(1, 4, 8)), ValueError, "h must be (layers, batch, hidden)"),
        (lambda r, lstm: r.observe(torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError, "the LSTM's state is (1, 4, 8)"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.randn(3, 4, 6)), ValueError, "inputs has 6 features"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.randn(4, 5)[None, None]), ValueError, "inputs must be"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.ones(3, 4, 5, dtype=torch.int32)), TypeError, "inputs must be a floating"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), input_state=(torch.zeros(1, 4, 8),) * 2), ValueError, "input_state was given without inputs"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.randn(3, 4, 5), input_state=(torch.zeros(1, 3, 8), torch.zeros(1, 4, 8))), ValueError, "input_state h0 has shape (1, 3, 8)"),
        (lambda r, lstm: r.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.randn(3, 4, 5), input_state=torch.zeros(1, 4, 8)), TypeError, "input_state must be a pair"),
        (lambda r, lstm: LSTMReducer(None).observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), inputs=torch.randn(3, 4, 5)), ValueError, "no nn.LSTM"),
        (lambda r, lstm: LSTMReducer(torch.nn.GRU(5, 8)), TypeError, "lstm must be a torch.nn.LSTM"),
        (lambda r, lstm: LSTMReducer(lstm, Thresholds(lstm_gate_eps=0.6)), ValueError, "lstm_gate_eps"),
        (lambda r, lstm: replay_lstm(torch.nn.GRU(5, 8), torch.randn(3, 4, 5)), TypeError, "lstm must be a torch.nn.LSTM"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(call, error, words):
    lstm = make_lstm(7, input_size=5, hidden_size=8)
    reducer = LSTMReducer(lstm)
    with pytest.raises(error) as info:
        call(reducer, lstm)
    assert words in str(info.value)
    assert reducer.pending(NORMAL) == {}


def test_observe_and_pending_never_sync():
    lstm = make_lstm(8, input_size=5, hidden_size=8, num_layers=2, proj_size=4)
    x = torch.randn(6, 100, 5)
    h0, c0 = random_state(lstm, 100)
    with torch.no_grad():
        _, (h, c) = lstm(x, (h0, c0))
    reducer = LSTMReducer(lstm)
    with SyncCounter() as counter:
        reducer.observe(h, c, inputs=x, input_state=(h0, c0), level=NORMAL)
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]
    assert reducer.build(host, NORMAL).gate_rows == Thresholds().lstm_gate_sample


def test_real_recurrent_policy_rollout():
    """A recurrent policy steps an LSTM through a rollout one step at a time, is trained on it, and
    hands over the final state with the rollout's inputs and initial state, as a PPO loop would."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 16)
    lstm = torch.nn.LSTM(16, 32)
    head = torch.nn.Linear(32, 2)
    envs, steps = 8, 16
    obs = torch.randn(steps, envs, 4)
    h0, c0 = torch.zeros(1, envs, 32), torch.zeros(1, envs, 32)
    state = (h0, c0)
    with torch.no_grad():
        for t in range(steps):
            _, state = lstm(encoder(obs[t]).unsqueeze(0), state)
    features = encoder(obs)
    out, _ = lstm(features, (h0, c0))
    loss = head(out).logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in [*encoder.parameters(), *lstm.parameters(), *head.parameters()]:
            p -= 0.1 * p.grad
    reducer = LSTMReducer(lstm)
    reducer.observe(*state, inputs=features.detach(), input_state=(h0, c0), level=DEBUG)
    stats = run(reducer, DEBUG)
    ref = reference_state(np64(state[0]))
    assert stats.h_norm == pytest.approx(ref["norm"], rel=1e-12)
    gates, *_ = numpy_lstm(lstm, np64(features), np64(h0), np64(c0))
    low, high, near = reference_saturation(gates, 32, 0.01)
    total = steps * envs * 32
    assert stats.gate_total == total
    for name in low:
        assert abs(stats.gate_saturation[name] - (low[name] + high[name]) / total) <= near[name] / total


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_sync_and_same_result():
    lstm = make_lstm(9, scale=3.0, input_size=5, hidden_size=8, num_layers=2)
    x = torch.randn(6, 100, 5)
    h0, c0 = random_state(lstm, 100)
    with torch.no_grad():
        _, (h, c) = lstm(x, (h0, c0))
    cpu = LSTMReducer(lstm)
    cpu.observe(h, c, inputs=x, input_state=(h0, c0), level=NORMAL)
    want = run(cpu)
    lstm.cuda()
    args = [t.cuda() for t in (h, c, x, h0, c0)]
    reducer = LSTMReducer(lstm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reducer.observe(args[0], args[1], inputs=args[2], input_state=(args[3], args[4]), level=NORMAL)
        pending = reducer.pending(NORMAL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = reducer.build(transfer(pending), NORMAL)
    assert got.h_norm == pytest.approx(want.h_norm, rel=1e-9)
    assert got.gate_rows == want.gate_rows
    for name, value in want.gate_saturation.items():
        assert got.gate_saturation[name] == pytest.approx(value, abs=0.01)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[4]])
def test_gate_replay_kernels_do_not_grow_with_the_steps(config):
    """The replay runs the fused kernel per layer and direction and recomputes every step's gate
    pre-activations at once: the number of dispatched operations does not depend on T."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    lstm = make_lstm(7, **config)
    counts = {}
    for steps in (2, 16):
        x = torch.randn(steps, 6, 5)
        h0, c0 = random_state(lstm, 6)
        with torch.no_grad():
            _, (h, c) = lstm(x, (h0, c0))
        reducer = LSTMReducer(lstm)
        with KernelCounter() as counter:
            reducer.observe(h, c, inputs=x, input_state=(h0, c0), level=DEBUG)
        counts[steps] = counter.count
        assert run(reducer, DEBUG).gate_steps == steps
    assert counts[2] == counts[16]


# ------------------------------------------------------------------------------------------------
# Episode resets: the state entering a step is zeroed where the mask says, per env and step
# ------------------------------------------------------------------------------------------------

UNIDIRECTIONAL = [c for c in CONFIGS if not c.get("bidirectional")]


def cell_reference(lstm: torch.nn.LSTM, x: torch.Tensor, h0, c0, resets: torch.Tensor):
    """Float64 nn.LSTMCell per layer, stepped by hand, zeroing every layer's state of row b before
    step t where ``resets[t, b]``. x time-major. Returns (gate pre-activations per (layer, 0) as
    (T, B, 4H), out (T, B, H), h_n, c_n)."""
    cells = []
    for layer in range(lstm.num_layers):
        cell = torch.nn.LSTMCell(
            lstm.input_size if layer == 0 else lstm.hidden_size, lstm.hidden_size, bias=lstm.bias,
            dtype=torch.float64,
        )
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if lstm.bias else ()):
                getattr(cell, name).copy_(getattr(lstm, f"{name}_l{layer}"))
        cells.append(cell)
    h = [h0[k].double() for k in range(lstm.num_layers)]
    c = [c0[k].double() for k in range(lstm.num_layers)]
    gates: dict = {(k, 0): [] for k in range(lstm.num_layers)}
    outs = []
    with torch.no_grad():
        for t in range(x.shape[0]):
            keep = (resets[t] == 0).double().unsqueeze(1)
            inp = x[t].double()
            for k, cell in enumerate(cells):
                h[k], c[k] = h[k] * keep, c[k] * keep
                z = inp @ cell.weight_ih.T + h[k] @ cell.weight_hh.T
                if lstm.bias:
                    z = z + cell.bias_ih + cell.bias_hh
                gates[(k, 0)].append(z.numpy())
                h[k], c[k] = cell(inp, (h[k], c[k]))
                inp = h[k]
            outs.append(inp)
    return (
        {key: np.stack(v) for key, v in gates.items()},
        torch.stack(outs).numpy(),
        torch.stack(h).numpy(),
        torch.stack(c).numpy(),
    )


def reset_mask(steps: int, batch: int, seed: int, p: float = 0.25) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(steps, batch, generator=g) < p
    mask[0, 0] = True  # a reset of the initial state itself
    mask[:, 1] = False  # a row that never resets
    mask[1:, 2] = True  # a row that resets at every step
    return mask


@pytest.mark.parametrize("config", [c for c in UNIDIRECTIONAL if not c.get("proj_size")])
def test_replay_across_resets_matches_float64_lstm_cells(config):
    lstm = make_lstm(11, scale=3.0, **config)
    steps, batch = 9, 6
    x = torch.randn(steps, batch, 5) * 2
    h0, c0 = random_state(lstm, batch)
    resets = reset_mask(steps, batch, 0)
    gates, ref_out, ref_h, ref_c = cell_reference(lstm, x, h0, c0, resets)
    x_in, r_in = (x.transpose(0, 1), resets.t()) if lstm.batch_first else (x, resets)
    seen: dict = {}
    out, (h, c) = replay_lstm(
        lstm, x_in, (h0, c0), resets=r_in.float(),  # CleanRL's dones are float
        on_gates=lambda layer, d, t, z: seen.setdefault((layer, d), []).append(z),
    )
    np.testing.assert_allclose(np64(out.transpose(0, 1) if lstm.batch_first else out), ref_out, atol=1e-5)
    np.testing.assert_allclose(np64(h), ref_h, atol=1e-5)
    np.testing.assert_allclose(np64(c), ref_c, atol=1e-5)
    for key, zs in seen.items():
        np.testing.assert_allclose(np64(torch.stack(zs)), gates[key], atol=5e-5, rtol=1e-5)
    # The reducer counts the same gates over the whole batch at DEBUG, and the resets it replayed.
    reducer = LSTMReducer(lstm)
    reducer.observe(h, c, inputs=x_in, input_state=(h0, c0), resets=r_in, level=DEBUG)
    stats = run(reducer, DEBUG)
    low, high, near = reference_saturation(gates, lstm.hidden_size, 0.01)
    total = steps * batch * lstm.hidden_size * lstm.num_layers
    assert stats.gate_total == total and stats.gates_fed and stats.gate_resets == int(resets.sum())
    for name in low:
        assert abs(stats.gate_saturation_low[name] - low[name] / total) <= near[name] / total
        assert abs(stats.gate_saturation_high[name] - high[name] / total) <= near[name] / total
    assert sum(low.values()) + sum(high.values()) > 0


def test_replay_across_resets_with_projection_matches_float64():
    lstm = make_lstm(12, scale=3.0, input_size=5, hidden_size=8, proj_size=3, num_layers=2)
    x = torch.randn(7, 5, 5)
    h0, c0 = random_state(lstm, 5)
    resets = reset_mask(7, 5, 1)
    gates, ref_out, ref_h, ref_c = numpy_lstm(lstm, np64(x), np64(h0), np64(c0), resets=resets.numpy())
    seen: dict = {}
    out, (h, c) = replay_lstm(
        lstm, x, (h0, c0), resets=resets,
        on_gates=lambda layer, d, t, z: seen.setdefault((layer, d), []).append(z),
    )
    np.testing.assert_allclose(np64(out), ref_out, atol=1e-5)
    np.testing.assert_allclose(np64(h), ref_h, atol=1e-5)
    np.testing.assert_allclose(np64(c), ref_c, atol=1e-5)
    for key, zs in seen.items():
        np.testing.assert_allclose(np64(torch.stack(zs)), gates[key], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_replay_with_resets_is_what_a_recurrent_loop_computed(batch_first):
    """CleanRL's recurrent PPO steps the LSTM one step at a time and multiplies the state by
    ``1 - done`` first; handing its whole rollout over with ``dones`` as the mask gives back every
    step's output and the final state it computed (no sequence cutting at resets)."""
    lstm = make_lstm(13, input_size=5, hidden_size=8, num_layers=2, batch_first=batch_first)
    steps, envs = 12, 4
    x = torch.randn(steps, envs, 5)
    dones = reset_mask(steps, envs, 2).float()
    h0, c0 = random_state(lstm, envs)
    state, outs = (h0, c0), []
    with torch.no_grad():
        for t in range(steps):
            keep = (1.0 - dones[t]).view(1, -1, 1)
            step_in = x[t].unsqueeze(1 if batch_first else 0)
            y, state = lstm(step_in, (keep * state[0], keep * state[1]))
            outs.append(y.squeeze(1 if batch_first else 0))
    want = torch.stack(outs)
    x_in, d_in = (x.transpose(0, 1), dones.t()) if batch_first else (x, dones)
    out, (h, c) = replay_lstm(lstm, x_in, (h0, c0), resets=d_in)
    torch.testing.assert_close(out.transpose(0, 1) if batch_first else out, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(h, state[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(c, state[1], atol=2e-6, rtol=1e-5)
    # One step of B rows: (B,) flags.
    one, _ = replay_lstm(lstm, x[0], (h0, c0), resets=dones[0] > 0)
    torch.testing.assert_close(one, outs[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_stepwise_replay_reproduces_nn_lstm(config):
    """The stepwise path (every device but the CPU takes it, and the CPU with resets) against nn.LSTM,
    bidirectional included: forced here on the CPU by an all-ones keep mask."""
    lstm = make_lstm(14, **config)
    x = torch.randn(5, 6, 5)
    h0, c0 = random_state(lstm, 6)
    with torch.no_grad():
        want, (want_h, want_c) = lstm(x.transpose(0, 1) if lstm.batch_first else x, (h0, c0))
        fused = _replay(lstm, x, h0, c0, True)
        got = _replay(lstm, x, h0, c0, True, torch.ones(5, 6, 1))
    torch.testing.assert_close(got[0], want.transpose(0, 1) if lstm.batch_first else want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want_h, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], want_c, atol=2e-6, rtol=1e-5)
    for z_fused, z_step in zip(fused[3], got[3], strict=True):
        torch.testing.assert_close(z_step, z_fused, atol=1e-5, rtol=1e-5)


def test_resets_on_the_sampled_rows_and_gates_not_fed_are_counted():
    lstm = make_lstm(15, scale=3.0, input_size=5, hidden_size=8)
    batch, sample, steps = 40, 6, 5
    x = torch.randn(steps, batch, 5)
    h0, c0 = random_state(lstm, batch)
    resets = reset_mask(steps, batch, 3)
    with torch.no_grad():
        _, (h, c) = replay_lstm(lstm, x, (h0, c0), resets=resets)
    reducer = LSTMReducer(lstm, Thresholds(lstm_gate_sample=sample))
    reducer.observe(h, c, level=NORMAL)
    stats = run(reducer)
    assert not stats.gates_fed and stats.gates_not_fed == 1 and stats.gate_total == 0
    reducer.reset()  # a new update: the run's count of unfed updates stays
    reducer.observe(h, c, level=NORMAL)
    assert run(reducer).gates_not_fed == 2
    reducer.reset()
    reducer.observe(h, c, inputs=x, input_state=(h0, c0), resets=resets, level=NORMAL)
    stats = run(reducer)
    rows = [i * batch // sample for i in range(sample)]
    assert stats.gates_fed and stats.gates_not_fed == 2
    assert stats.gate_rows == sample and stats.gate_resets == int(resets[:, rows].sum())
    gates, *_ = numpy_lstm(lstm, np64(x[:, rows]), np64(h0[:, rows]), np64(c0[:, rows]), resets[:, rows].numpy())
    low, high, near = reference_saturation(gates, 8, 0.01)
    for name in low:
        tol = near[name] / stats.gate_total
        assert abs(stats.gate_saturation_low[name] - low[name] / stats.gate_total) <= tol
        assert abs(stats.gate_saturation_high[name] - high[name] / stats.gate_total) <= tol
    # Without resets the count is zero, not missing.
    reducer.reset()
    reducer.observe(h, c, inputs=x, level=NORMAL)
    assert run(reducer).gate_resets == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"resets": torch.zeros(3, 4)}, ValueError, "resets were given without inputs"),
        ({"inputs": torch.randn(3, 4, 5), "resets": torch.zeros(4, 3)}, ValueError, "expected (3, 4), (T, B)"),
        ({"inputs": torch.randn(3, 4, 5), "resets": torch.zeros(3, 4, 2)}, ValueError, "resets has shape (3, 4, 2)"),
        ({"inputs": torch.randn(4, 5), "resets": torch.zeros(3, 4)}, ValueError, "(B,) for one step"),
        ({"inputs": torch.randn(3, 4, 5), "resets": torch.zeros(3, 4, dtype=torch.complex64)}, TypeError, "bool, integer or float"),
        ({"inputs": torch.randn(3, 4, 5), "resets": object()}, TypeError, "resets must be a tensor"),
    ],
)  # fmt: skip
def test_bad_resets_name_the_argument(kwargs, error, words):
    lstm = make_lstm(16, input_size=5, hidden_size=8)
    reducer = LSTMReducer(lstm)
    with pytest.raises(error) as info:
        reducer.observe(torch.randn(1, 4, 8), torch.randn(1, 4, 8), level=NORMAL, **kwargs)
    assert words in str(info.value)
    bidir = make_lstm(16, input_size=5, hidden_size=8, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        replay_lstm(bidir, torch.randn(3, 4, 5), resets=torch.zeros(3, 4))


def test_resets_accept_a_trailing_singleton_and_numpy_flags():
    lstm = make_lstm(17, input_size=5, hidden_size=8)
    x = torch.randn(6, 3, 5)
    resets = reset_mask(6, 3, 4)
    want, _ = replay_lstm(lstm, x, resets=resets)
    got_col, _ = replay_lstm(lstm, x, resets=resets.float().unsqueeze(-1))
    got_np, _ = replay_lstm(lstm, x, resets=resets.numpy())
    torch.testing.assert_close(got_col, want)
    torch.testing.assert_close(got_np, want)


def test_replay_with_resets_never_syncs_and_never_touches_cudnn(monkeypatch):
    """No host read before the transfer, and cuDNN's process-wide switch is never flipped (another
    thread training through cuDNN must not see it change under it)."""
    flips: list[bool] = []
    original = torch._C._set_cudnn_enabled
    monkeypatch.setattr(torch._C, "_set_cudnn_enabled", lambda v: (flips.append(v), original(v))[1])
    lstm = make_lstm(18, input_size=5, hidden_size=8, num_layers=2, proj_size=4)
    x = torch.randn(6, 100, 5)
    h0, c0 = random_state(lstm, 100)
    resets = reset_mask(6, 100, 5)
    with torch.no_grad():
        _, (h, c) = replay_lstm(lstm, x, (h0, c0), resets=resets)
    reducer = LSTMReducer(lstm)
    with SyncCounter() as counter:
        reducer.observe(h, c, inputs=x, input_state=(h0, c0), resets=resets, level=NORMAL)
        pending = reducer.pending(NORMAL)
    assert counter.calls == []
    with SyncCounter() as counter:
        host = transfer(pending)
    assert counter.calls == ["tolist"]
    assert reducer.build(host, NORMAL).gates_fed
    assert flips == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_replay_with_resets_no_sync_no_cudnn_switch_same_result(monkeypatch):
    """On CUDA the replay is stepwise (no cuDNN): same statistics as the CPU's, with resets, under
    sync debug mode "error", and cuDNN's global switch untouched."""
    lstm = make_lstm(19, scale=3.0, input_size=5, hidden_size=8, num_layers=2)
    x = torch.randn(6, 100, 5)
    h0, c0 = random_state(lstm, 100)
    resets = reset_mask(6, 100, 6)
    with torch.no_grad():
        _, (h, c) = replay_lstm(lstm, x, (h0, c0), resets=resets)
    cpu = LSTMReducer(lstm)
    cpu.observe(h, c, inputs=x, input_state=(h0, c0), resets=resets, level=DEBUG)
    want = run(cpu, DEBUG)
    lstm.cuda()
    args = [t.cuda() for t in (h, c, x, h0, c0, resets)]
    reducer = LSTMReducer(lstm)
    flips: list[bool] = []
    original = torch._C._set_cudnn_enabled
    monkeypatch.setattr(torch._C, "_set_cudnn_enabled", lambda v: (flips.append(v), original(v))[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reducer.observe(
            args[0], args[1], inputs=args[2], input_state=(args[3], args[4]), resets=args[5], level=DEBUG
        )
        pending = reducer.pending(DEBUG)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = reducer.build(transfer(pending), DEBUG)
    assert flips == []
    assert got.gate_resets == want.gate_resets == int(resets.sum())
    for name, value in want.gate_saturation.items():
        assert got.gate_saturation[name] == pytest.approx(value, abs=0.01)
