"""LSTM health at the end of an update (review L3): state statistics and gate saturation. NORMAL+.

State statistics, from the final ``(h, c)`` of shape ``(num_layers * directions, batch, hidden)``
(a 2-D ``(layers, hidden)`` state counts as one environment), in float64 on the device: L2 norm
over the whole tensor, RMS, max ``|x|``, the largest per-environment RMS (over layers and hidden
units — one runaway environment shows even when the mean is fine), ``c`` mean, NaN and Inf counts.

Gate saturation: the share of input, forget and output gate activations ``sigmoid(z)`` within
``Thresholds.lstm_gate_eps`` of 0 (``_low``) or of 1 (``_high``) — a saturated gate passes no
gradient. ``nn.LSTM`` never exposes its gates, so they are recomputed from the module's own weights
(``weight_ih_l{k}``, ``weight_hh_l{k}``, biases, ``weight_hr_l{k}`` with ``proj_size``, ``_reverse``
for bidirectional; every layer; ``batch_first`` honoured), for the inputs and initial state the
loop hands over, in the weights' dtype: :func:`replay_lstm` runs the fused LSTM kernel
(``torch.lstm``) once per layer and direction, which yields every step's ``h``, then computes every
step's gate pre-activations at once, gate-major, ``z = W_ih x_t + W_hh h_(t-1) + b`` as two matmuls
over all ``T x rows`` columns. Saturation is counted on the pre-activations, ``z < logit(eps)`` and
``z > logit(1 - eps)`` (so float32 rounding of ``sigmoid`` near 0 and 1 cannot blur the test), per
gate on its contiguous block of rows (whole-tensor ``count_nonzero``: reductions of bool tensors
over some dimensions only are many times slower on CPU). Dropout between layers is not applied (eval
semantics: the deterministic path is what saturates). At NORMAL it runs on
``Thresholds.lstm_gate_sample`` batch rows, evenly spaced over the batch; at DEBUG on all rows.

Cost: about twice the forward FLOPs of the replayed rows (the kernel's own pass, then the
recomputed pre-activations) and ~15 kernels per layer and direction however many steps (a
per-step replay from Python launched ~13 per step). Once per update, not per minibatch; the state
statistics of ``h`` and ``c`` together are ~20 kernels. ``benchmarks/bench_lstm_gates.py`` times it
against ``nn.LSTM`` forwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.advantage import acc_dtype, check_float_tensor, to_device
from telemetry_core.schema import LSTMStats

__all__ = ["LSTMReducer", "replay_lstm"]

GateCallback = Callable[[int, int, int, torch.Tensor], None]
# Gate order of nn.LSTM's stacked weights: input, forget, cell (g), output.
_GATES = {"input": 0, "forget": 1, "output": 3}
_STATE = ("norm", "rms", "max_abs", "env_rms_max", "mean", "nan", "inf")


def _directions(lstm: nn.LSTM) -> int:
    return 2 if lstm.bidirectional else 1


def _time_major(lstm: nn.LSTM, inputs: torch.Tensor) -> torch.Tensor:
    """(T, B, F) view of inputs given as (T, B, F), (B, T, F) with batch_first, or (B, F) one step."""
    x = check_float_tensor("inputs", inputs)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() == 3:
        x = x.transpose(0, 1) if lstm.batch_first else x
    else:
        raise ValueError(
            f"inputs must be (T, B, F), (B, T, F) with batch_first, or (B, F); got {tuple(x.shape)}"
        )
    if x.shape[-1] != lstm.input_size:
        raise ValueError(
            f"inputs has {x.shape[-1]} features but the LSTM expects input_size={lstm.input_size}"
        )
    weight = lstm.weight_ih_l0
    if x.device != weight.device:
        raise ValueError(f"inputs is on {x.device} but the LSTM's weights are on {weight.device}")
    return x.to(weight.dtype)


def _initial_state(
    lstm: nn.LSTM, state: tuple[torch.Tensor, torch.Tensor] | None, batch: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    layers = lstm.num_layers * _directions(lstm)
    out_size = lstm.proj_size or lstm.hidden_size
    if state is None:
        h0 = torch.zeros(layers, batch, out_size, dtype=x.dtype, device=x.device)
        c0 = torch.zeros(layers, batch, lstm.hidden_size, dtype=x.dtype, device=x.device)
        return h0, c0
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("input_state must be a pair (h0, c0)")
    h0 = check_float_tensor("input_state[0] (h0)", state[0])
    c0 = check_float_tensor("input_state[1] (c0)", state[1])
    want_h, want_c = (layers, batch, out_size), (layers, batch, lstm.hidden_size)
    if tuple(h0.shape) != want_h:
        raise ValueError(f"input_state h0 has shape {tuple(h0.shape)}, expected {want_h}")
    if tuple(c0.shape) != want_c:
        raise ValueError(f"input_state c0 has shape {tuple(c0.shape)}, expected {want_c}")
    if h0.device != x.device or c0.device != x.device:
        raise ValueError(f"input_state is on {h0.device}/{c0.device} but inputs are on {x.device}")
    return h0.to(x.dtype), c0.to(x.dtype)


def _layer_weights(lstm: nn.LSTM, sfx: str) -> list[torch.Tensor]:
    """One layer-direction's weights in the order ``torch.lstm`` takes them."""
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if lstm.bias else [])
    names += ["weight_hr"] if lstm.proj_size > 0 else []
    return [getattr(lstm, name + sfx) for name in names]


def _replay(
    lstm: nn.LSTM, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, gates: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Time-major replay; returns (output (T, B, D*P), h_n, c_n, gate pre-activations).

    The gate pre-activations are one gate-major ``(4H, T * B)`` tensor per layer and direction
    (layer-major order; column ``t * B + b`` is step t of row b, a reverse direction's steps counted
    over the reversed sequence as it runs them), or none when ``gates`` is False. Gate-major, so
    that each gate's block of rows is contiguous for counting.
    """
    dirs = _directions(lstm)
    steps, batch = x.shape[0], x.shape[1]
    layer_in = x
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    zs: list[torch.Tensor] = []
    # cuDNN wants its weights in one flat buffer (it would copy and warn on every call): the
    # native kernel, still one call per layer and direction, is what runs on CUDA here.
    cudnn_off = torch.backends.cudnn.flags(enabled=False) if x.is_cuda else contextlib.nullcontext()
    with cudnn_off:
        for layer in range(lstm.num_layers):
            outs = []
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                weights = _layer_weights(lstm, sfx)
                seq = layer_in.flip(0) if direction else layer_in
                k = layer * dirs + direction
                h_init, c_init = h0[k : k + 1], c0[k : k + 1]
                y, h, c = torch.lstm(seq, (h_init, c_init), weights, lstm.bias, 1, 0.0, False, False, False)
                if gates:  # z_t = W_ih x_t + W_hh h_(t-1) + b for all t, from the h the kernel fed back
                    h_prev = torch.cat((h_init, y[:-1])) if steps > 1 else h_init
                    w_ih, w_hh = weights[0], weights[1]
                    z = torch.mm(w_ih, seq.reshape(steps * batch, -1).t())
                    z.addmm_(w_hh, h_prev.reshape(steps * batch, -1).t())
                    if lstm.bias:
                        z += (weights[2] + weights[3]).unsqueeze(1)
                    zs.append(z)
                outs.append(y.flip(0) if direction else y)
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
    return layer_in, torch.cat(h_n), torch.cat(c_n), zs


def replay_lstm(
    lstm: nn.LSTM,
    inputs: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    on_gates: GateCallback | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``lstm`` layer by layer from its weights; returns ``(output, (h_n, c_n))`` as ``lstm`` would.

    ``inputs`` is ``(T, B, F)`` (``(B, T, F)`` with ``batch_first``) or ``(B, F)`` — one time step of
    ``B`` rows (unlike ``nn.LSTM``, which reads a 2-D input as one unbatched sequence); the output
    keeps the input's layout. ``on_gates(layer, direction, t, z)`` sees each step's gate
    pre-activations ``z`` of shape ``(B, 4 * hidden)`` in nn.LSTM's order (input, forget, cell, output),
    after the replay (a reverse direction's steps in the order it runs them, over the reversed
    sequence).
    """
    if not isinstance(lstm, nn.LSTM):
        raise TypeError(f"lstm must be a torch.nn.LSTM, got {type(lstm).__name__}")
    two_d = isinstance(inputs, torch.Tensor) and inputs.dim() == 2
    with torch.no_grad():
        x = _time_major(lstm, inputs)
        h0, c0 = _initial_state(lstm, state, x.shape[1], x)
        out, h_n, c_n, zs = _replay(lstm, x, h0, c0, on_gates is not None)
    if on_gates is not None:
        dirs = _directions(lstm)
        steps, batch = x.shape[0], x.shape[1]
        for k, z in enumerate(zs):
            per_step = z.view(z.shape[0], steps, batch)
            for t in range(steps):
                on_gates(k // dirs, k % dirs, t, per_step[:, t].t())
    if two_d:
        out = out[0]
    elif lstm.batch_first:
        out = out.transpose(0, 1)
    return out, (h_n, c_n)


def _state_stats(x: torch.Tensor) -> torch.Tensor:
    """(S, 7) rows [norm, rms, max_abs, env_rms_max, mean, nan, inf] of S (layers, batch, hidden)
    states stacked as (S, layers, batch, hidden): h and c together cost what one did."""
    dt = acc_dtype(x.device)
    x64 = x.to(dt)
    per_env = (x64 * x64).sum((1, 3))  # (S, batch)
    total = per_env.sum(1)
    numel = x[0].numel()
    per_row = x.shape[1] * x.shape[3]
    dims = (1, 2, 3)
    return torch.stack(
        (
            total.sqrt(),
            (total / numel).sqrt(),
            x64.abs().amax(dims),
            (per_env.amax(1) / per_row).sqrt(),
            x64.mean(dims),
            torch.isnan(x).sum(dims).to(dt),
            torch.isinf(x).sum(dims).to(dt),
        ),
        dim=1,
    )


class LSTMReducer:
    """LSTM state health and gate saturation, measured once at the end of an update (NORMAL+).

    ``lstm`` may be None: state statistics still work, gate saturation needs the module's weights.
    A later :meth:`observe` in the same update replaces the earlier one (it is the final state).
    """

    PREFIX = "lstm."

    def __init__(self, lstm: nn.LSTM | None, thresholds: Thresholds | None = None) -> None:
        if lstm is not None and not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm must be a torch.nn.LSTM or None, got {type(lstm).__name__}")
        self.lstm = lstm
        self.thresholds = thresholds or Thresholds()
        eps = self.thresholds.lstm_gate_eps
        if not 0 < eps < 0.5:
            raise ValueError(f"Thresholds.lstm_gate_eps must lie in (0, 0.5), got {eps}")
        if self.thresholds.lstm_gate_sample < 1:
            raise ValueError("Thresholds.lstm_gate_sample must be >= 1")
        self._logit_low = math.log(eps / (1 - eps))  # sigmoid(z) < eps  <=>  z < this
        self._logit_high = -self._logit_low  # sigmoid(z) > 1 - eps  <=>  z > this
        self._row_index: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self._state: torch.Tensor | None = None
        self._gates: torch.Tensor | None = None
        self._gate_rows = 0
        self._gate_steps = 0
        self._gate_total = 0

    def observe(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        input_state: tuple[torch.Tensor, torch.Tensor] | None = None,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """The final ``(h, c)``; with ``inputs`` (and optionally their ``input_state``) also gates."""
        h = self._check_state("h", h)
        c = self._check_state("c", c)
        if h.shape[:2] != c.shape[:2] or h.device != c.device:
            raise ValueError(
                f"h has shape {tuple(h.shape)} on {h.device} but c has {tuple(c.shape)} on {c.device}; "
                "they must share layers, batch and device"
            )
        if self.lstm is not None:
            layers = self.lstm.num_layers * _directions(self.lstm)
            want_h = (layers, h.shape[1], self.lstm.proj_size or self.lstm.hidden_size)
            want_c = (layers, h.shape[1], self.lstm.hidden_size)
            if tuple(h.shape) != want_h or tuple(c.shape) != want_c:
                raise ValueError(
                    f"h/c have shapes {tuple(h.shape)}/{tuple(c.shape)} but the LSTM's state is {want_h}/{want_c}"
                )
        if inputs is None and input_state is not None:
            raise ValueError("input_state was given without inputs")
        if inputs is not None and self.lstm is None:
            raise ValueError("inputs were given but the reducer has no nn.LSTM to recompute gates with")
        replay = None
        if inputs is not None:
            assert self.lstm is not None
            x = _time_major(self.lstm, inputs)
            replay = (x, *_initial_state(self.lstm, input_state, x.shape[1], x))
        if level < TelemetryLevel.NORMAL:
            return
        self.reset()
        with torch.no_grad():
            if h.shape == c.shape and h.dtype == c.dtype:
                self._state = _state_stats(torch.stack((h, c))).reshape(-1)
            else:  # proj_size: h is narrower than c
                rows = (_state_stats(h.unsqueeze(0)), _state_stats(c.unsqueeze(0)))
                self._state = torch.cat(rows).reshape(-1)
            if replay is not None:
                self._observe_gates(*replay, level)

    def pending(self, level: TelemetryLevel) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if level < TelemetryLevel.NORMAL or self._state is None:
            return out
        out["lstm.state"] = self._state
        if self._gates is not None:
            out["lstm.gates"] = self._gates.reshape(-1)
        return out

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> LSTMStats | None:
        """None below NORMAL or when no state was observed (a non-recurrent model)."""
        if level < TelemetryLevel.NORMAL or "lstm.state" not in host:
            return None
        s = host["lstm.state"]
        k = len(_STATE)
        h, c = dict(zip(_STATE, s[:k])), dict(zip(_STATE, s[k:]))
        stats = LSTMStats(
            h_norm=h["norm"],
            c_norm=c["norm"],
            h_rms=h["rms"],
            c_rms=c["rms"],
            h_max_abs=h["max_abs"],
            c_max_abs=c["max_abs"],
            h_env_rms_max=h["env_rms_max"],
            c_env_rms_max=c["env_rms_max"],
            c_mean=c["mean"],
            h_nan=int(h["nan"]),
            h_inf=int(h["inf"]),
            c_nan=int(c["nan"]),
            c_inf=int(c["inf"]),
        )
        if "lstm.gates" in host and self._gate_total > 0:
            g = host["lstm.gates"]  # (input, forget, output) x (low, high), flattened
            total = float(self._gate_total)
            for k, name in enumerate(_GATES):
                low, high = g[2 * k], g[2 * k + 1]
                stats.gate_saturation_low[name] = low / total
                stats.gate_saturation_high[name] = high / total
                stats.gate_saturation[name] = (low + high) / total
            stats.gate_rows = self._gate_rows
            stats.gate_steps = self._gate_steps
            stats.gate_total = self._gate_total
        return stats

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _check_state(name: str, x: object) -> torch.Tensor:
        t = check_float_tensor(name, x)
        if t.dim() == 2:
            t = t.unsqueeze(1)
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be (layers, batch, hidden) or (layers, hidden), got {tuple(t.shape)}"
            )
        return t

    def _observe_gates(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, level: TelemetryLevel
    ) -> None:
        lstm = self.lstm
        assert lstm is not None
        batch = x.shape[1]
        rows = batch if level >= TelemetryLevel.DEBUG else min(batch, self.thresholds.lstm_gate_sample)
        if rows < batch:
            key = (batch, rows, x.device)
            idx = self._row_index.get(key)
            if idx is None:  # evenly spaced rows, built once per batch size
                idx = self._row_index[key] = to_device(
                    torch.arange(rows, dtype=torch.int64) * batch // rows, x.device
                )
            x, h0, c0 = x.index_select(1, idx), h0.index_select(1, idx), c0.index_select(1, idx)
        hidden = lstm.hidden_size
        _, _, _, zs = _replay(lstm, x, h0, c0, True)
        counts = []
        for z in zs:  # per gate a contiguous (H, T * B) block: full-tensor counts, the fast path
            for j in _GATES.values():
                block = z[j * hidden : (j + 1) * hidden]
                counts += [
                    torch.count_nonzero(block < self._logit_low),
                    torch.count_nonzero(block > self._logit_high),
                ]
        self._gates = torch.stack(counts).view(len(zs), len(_GATES), 2).sum(0)  # (gate, low/high)
        self._gate_rows = rows
        self._gate_steps = x.shape[0]
        self._gate_total = x.shape[0] * rows * hidden * lstm.num_layers * _directions(lstm)
