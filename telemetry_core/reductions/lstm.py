"""LSTM health at the end of an update: state statistics and gate saturation. NORMAL+.

State statistics, from the final ``(h, c)`` of shape ``(num_layers * directions, batch, hidden)``
(a 2-D ``(layers, hidden)`` state counts as one environment), in float64 on the device: L2 norm
over the whole tensor, RMS, max ``|x|``, the largest per-environment RMS (over layers and hidden
units — one runaway environment shows even when the mean is fine), ``c`` mean, NaN and Inf counts.

Gate saturation: the share of input, forget and output gate activations ``sigmoid(z)`` within
``Thresholds.lstm_gate_eps`` of 0 (``_low``) or of 1 (``_high``) — a saturated gate passes no
gradient. ``nn.LSTM`` never exposes its gates, so they are recomputed from the module's own weights
(``weight_ih_l{k}``, ``weight_hh_l{k}``, biases, ``weight_hr_l{k}`` with ``proj_size``, ``_reverse``
for bidirectional; every layer; ``batch_first`` honoured), for the inputs and initial state the
loop hands over, in the weights' dtype. :func:`replay_lstm` first reproduces every step's ``h``,
then computes every step's gate pre-activations at once, gate-major,
``z = W_ih x_t + W_hh h_(t-1) + b`` as two matmuls over all ``T x rows`` columns. Saturation is
counted on the pre-activations, ``z < logit(eps)`` and ``z > logit(1 - eps)`` (so float32 rounding
of ``sigmoid`` near 0 and 1 cannot blur the test), per gate on its contiguous block of rows
(whole-tensor ``count_nonzero``: reductions of bool tensors over some dimensions only are many
times slower on CPU). Dropout between layers is not applied (eval semantics: the deterministic
path is what saturates). At NORMAL it runs on ``Thresholds.lstm_gate_sample`` batch rows, evenly
spaced over the batch; at DEBUG on all rows.

Episode resets: a recurrent PPO loop zeroes the state of an environment whose episode ended, in
the middle of the rollout. ``resets`` (``(T, B)``, ``(B, T)`` with ``batch_first``; bool, integer or
float, nonzero = reset) marks where: the state *entering* step ``t`` of row ``b`` is zeroed first,
in every layer — CleanRL's ``dones`` as its recurrent PPO stores them, TorchRL's ``is_init``. The
replay then zeroes the state there too, so the loop hands over its whole rollout as it is.

How ``h`` is reproduced: on the CPU without resets, by the fused LSTM kernel (``torch.lstm``) once
per layer and direction. With resets (the kernel cannot zero a state mid-sequence) and on every
other device, step by step with ``torch.lstm_cell`` (a projection's matmul after it), a few kernels
per step. Never through cuDNN: it wants each call's weights in the module's one flat buffer, which
a per-layer call cannot give (it would copy and warn on every call), and switching cuDNN off with
``torch.backends.cudnn.flags`` would change a process-wide setting under the training code, other
threads included. ``lstm_cell`` on CUDA is the fused non-cuDNN cell; nothing here reads a value
on the host, so the replay stays free of device syncs.

Cost: about twice the forward FLOPs of the replayed rows (the recurrence, then the recomputed
pre-activations); ~15 kernels per layer and direction on the fused path however many steps, a few
per step on the stepwise one. Once per update, not per minibatch; the state statistics of ``h``
and ``c`` together are ~20 kernels. ``benchmarks/bench_lstm_gates.py`` times it against
``nn.LSTM`` forwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.advantage import acc_dtype, check_float_tensor
from telemetry_core.reductions.transfer import to_device
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


def _reset_keep(
    lstm: nn.LSTM, resets: object, x: torch.Tensor, two_d: bool
) -> torch.Tensor:
    """``(T, B, 1)`` multiplier, 0 where the state entering a step is zeroed, 1 elsewhere, in ``x``'s
    dtype on its device (no host read: the mask's values are never looked at here)."""
    if lstm.bidirectional:
        raise ValueError(
            "resets were given for a bidirectional LSTM; a state reset mid-sequence is defined for a "
            "unidirectional LSTM stepped through episodes"
        )
    if not isinstance(resets, torch.Tensor):
        try:
            resets = torch.as_tensor(resets)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"resets must be a tensor or an array of flags, got {type(resets).__name__}"
            ) from None
        resets = to_device(resets, x.device)
    if resets.is_complex():
        raise TypeError(f"resets must hold bool, integer or float flags, got dtype {resets.dtype}")
    if resets.device != x.device:
        raise ValueError(f"resets is on {resets.device} but inputs are on {x.device}")
    steps, batch = x.shape[0], x.shape[1]
    m = resets.detach()
    if m.dim() >= 1 and m.shape[-1] == 1 and m.dim() == (2 if two_d else 3):
        m = m.squeeze(-1)  # a trailing singleton, as (T, B, 1) done buffers often are
    if two_d:
        want = (batch,)
    elif lstm.batch_first:
        want = (batch, steps)
    else:
        want = (steps, batch)
    if tuple(m.shape) != want:
        layout = "(B,) for one step" if two_d else "(B, T) with batch_first" if lstm.batch_first else "(T, B)"
        raise ValueError(f"resets has shape {tuple(resets.shape)}; expected {want}, {layout} like the inputs")
    if two_d:
        m = m.unsqueeze(0)
    elif lstm.batch_first:
        m = m.t()
    return (m == 0).to(x.dtype).unsqueeze(-1)


def _steps(
    seq: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    weights: list[torch.Tensor],
    bias: bool,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer-direction step by step from ``(B, P)``/``(B, H)`` states; returns (every step's
    output (T, B, P), h_n, c_n, every step's incoming h (T, B, P), after its reset)."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if bias else (None, None)
    w_hr = weights[-1] if len(weights) in (3, 5) else None  # a projection comes last
    outs: list[torch.Tensor] = []
    incoming: list[torch.Tensor] = []
    for t in range(seq.shape[0]):
        if keep is not None:
            h = h * keep[t]
            c = c * keep[t]
        incoming.append(h)
        if w_hr is None:
            h, c = torch.lstm_cell(seq[t], (h, c), w_ih, w_hh, b_ih, b_hh)
        else:  # lstm_cell has no projection: its h must be as wide as c
            z = torch.mm(seq[t], w_ih.t()).addmm_(h, w_hh.t())
            if b_ih is not None and b_hh is not None:
                z = z + b_ih + b_hh
            i, f, g, o = z.chunk(4, 1)
            c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
            h = torch.mm(o.sigmoid() * c.tanh(), w_hr.t())
        outs.append(h)
    return torch.stack(outs), h, c, torch.stack(incoming)


def _replay(
    lstm: nn.LSTM,
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    gates: bool,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Time-major replay; returns (output (T, B, D*P), h_n, c_n, gate pre-activations).

    ``keep`` (``(T, B, 1)``, 0 where a reset zeroes the state entering a step) selects the stepwise
    path, as any device but the CPU does. The gate pre-activations are one gate-major
    ``(4H, T * B)`` tensor per layer and direction (layer-major order; column ``t * B + b`` is step
    t of row b, a reverse direction's steps counted over the reversed sequence as it runs them), or
    none when ``gates`` is False. Gate-major, so that each gate's block of rows is contiguous for
    counting.
    """
    dirs = _directions(lstm)
    steps, batch = x.shape[0], x.shape[1]
    stepwise = keep is not None or x.device.type != "cpu"
    layer_in = x
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    zs: list[torch.Tensor] = []
    for layer in range(lstm.num_layers):
        outs = []
        for direction in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            weights = _layer_weights(lstm, sfx)
            seq = layer_in.flip(0) if direction else layer_in
            k = layer * dirs + direction
            if stepwise:
                y, h, c, h_prev = _steps(seq, h0[k], c0[k], weights, lstm.bias, keep)
                h, c = h.unsqueeze(0), c.unsqueeze(0)
            else:
                h_init, c_init = h0[k : k + 1], c0[k : k + 1]
                y, h, c = torch.lstm(seq, (h_init, c_init), weights, lstm.bias, 1, 0.0, False, False, False)
                h_prev = torch.cat((h_init, y[:-1])) if steps > 1 else h_init
            if gates:  # z_t = W_ih x_t + W_hh h_(t-1) + b for all t, from the h the recurrence fed back
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
    resets: torch.Tensor | None = None,
    on_gates: GateCallback | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``lstm`` layer by layer from its weights; returns ``(output, (h_n, c_n))`` as ``lstm`` would.

    ``inputs`` is ``(T, B, F)`` (``(B, T, F)`` with ``batch_first``) or ``(B, F)`` — one time step of
    ``B`` rows (unlike ``nn.LSTM``, which reads a 2-D input as one unbatched sequence); the output
    keeps the input's layout. ``resets`` (shaped like the inputs' leading dimensions: ``(T, B)``,
    ``(B, T)`` with ``batch_first``, ``(B,)`` for one step) zeroes the state entering each step where
    it is nonzero, as a recurrent PPO loop does at episode starts (module docstring); the output is
    then what that loop computed, not what ``lstm`` would. ``on_gates(layer, direction, t, z)``
    sees each step's gate pre-activations ``z`` of shape ``(B, 4 * hidden)`` in nn.LSTM's order
    (input, forget, cell, output), after the replay (a reverse direction's steps in the order it
    runs them, over the reversed sequence).
    """
    if not isinstance(lstm, nn.LSTM):
        raise TypeError(f"lstm must be a torch.nn.LSTM, got {type(lstm).__name__}")
    two_d = isinstance(inputs, torch.Tensor) and inputs.dim() == 2
    with torch.no_grad():
        x = _time_major(lstm, inputs)
        h0, c0 = _initial_state(lstm, state, x.shape[1], x)
        keep = None if resets is None else _reset_keep(lstm, resets, x, two_d)
        out, h_n, c_n, zs = _replay(lstm, x, h0, c0, on_gates is not None, keep)
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
    An update whose state comes without gate inputs says so (``LSTMStats.gates_fed`` False) and is
    counted over the run (``gates_not_fed``), so an empty gate panel is never silent.
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
        self._not_fed = 0  # over the run: updates whose state came without gate inputs (counted in build)
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
        resets: torch.Tensor | None = None,
        level: TelemetryLevel = TelemetryLevel.NORMAL,
    ) -> None:
        """The final ``(h, c)``; with ``inputs`` (and optionally their ``input_state`` and the
        ``resets`` mask of the episode starts inside them, see :func:`replay_lstm`) also gates."""
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
        if inputs is None and resets is not None:
            raise ValueError("resets were given without inputs")
        if inputs is not None and self.lstm is None:
            raise ValueError("inputs were given but the reducer has no nn.LSTM to recompute gates with")
        replay = None
        if inputs is not None:
            assert self.lstm is not None
            x = _time_major(self.lstm, inputs)
            keep = None if resets is None else _reset_keep(self.lstm, resets, x, inputs.dim() == 2)
            replay = (x, *_initial_state(self.lstm, input_state, x.shape[1], x), keep)
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
            out["lstm.gates"] = self._gates
        return out

    def build(self, host: Mapping[str, list[float]], level: TelemetryLevel) -> LSTMStats | None:
        """None below NORMAL or when no state was observed (a non-recurrent model)."""
        if level < TelemetryLevel.NORMAL or "lstm.state" not in host:
            return None
        s = host["lstm.state"]
        k = len(_STATE)
        h, c = dict(zip(_STATE, s[:k])), dict(zip(_STATE, s[k:]))
        fed = "lstm.gates" in host and self._gate_total > 0
        self._not_fed += not fed  # once per update (build is), however often the state was observed
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
            gates_fed=fed,
            gates_not_fed=self._not_fed,
        )
        if fed:
            g = host["lstm.gates"]  # (input, forget, output) x (low, high), flattened; resets replayed
            total = float(self._gate_total)
            for k, name in enumerate(_GATES):
                low, high = g[2 * k], g[2 * k + 1]
                stats.gate_saturation_low[name] = low / total
                stats.gate_saturation_high[name] = high / total
                stats.gate_saturation[name] = (low + high) / total
            stats.gate_rows = self._gate_rows
            stats.gate_steps = self._gate_steps
            stats.gate_total = self._gate_total
            stats.gate_resets = int(g[6])
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
        self,
        x: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        keep: torch.Tensor | None,
        level: TelemetryLevel,
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
            if keep is not None:
                keep = keep.index_select(1, idx)
        hidden = lstm.hidden_size
        _, _, _, zs = _replay(lstm, x, h0, c0, True, keep)
        counts = []
        for z in zs:  # per gate a contiguous (H, T * B) block: full-tensor counts, the fast path
            for j in _GATES.values():
                block = z[j * hidden : (j + 1) * hidden]
                counts += [
                    torch.count_nonzero(block < self._logit_low),
                    torch.count_nonzero(block > self._logit_high),
                ]
        gates = torch.stack(counts).view(len(zs), len(_GATES), 2).sum(0).reshape(-1)  # (gate, low/high)
        resets = torch.count_nonzero(keep == 0) if keep is not None else torch.zeros_like(gates[0])
        self._gates = torch.cat((gates, resets.reshape(1)))
        self._gate_rows = rows
        self._gate_steps = x.shape[0]
        self._gate_total = x.shape[0] * rows * hidden * lstm.num_layers * _directions(lstm)
