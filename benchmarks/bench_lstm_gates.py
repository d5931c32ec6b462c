"""LSTM telemetry cost: gate-saturation replay and state statistics next to the ``nn.LSTM`` forward.

For several LSTM shapes (input -> hidden, layers, time steps T, batch B) it times each case paired
with the full-batch forward, by the method of ``_timing.py`` (printed in the header: adjacent pairs
in alternating order, thread CPU time with the wall clock beside it, median and IQR of the paired
ratios):

* ``forward``      ``nn.LSTM`` over the whole batch (no grad): the reference
* ``fwd 64``       ``nn.LSTM`` over the 64 rows the NORMAL level samples
* ``NORMAL``       ``LSTMReducer.observe`` with inputs at NORMAL: state statistics and the gate replay
                   of ``Thresholds.lstm_gate_sample`` (64) evenly spaced rows
* ``DEBUG``        the same over every row
* ``state``        state statistics alone (no inputs: what a loop without gate replay pays)

and prints each as thread CPU milliseconds and as a paired ratio to the full-batch forward. The replay runs the
fused LSTM kernel once per layer and direction and recomputes every step's gate pre-activations
with two matmuls, so it costs about one forward of the replayed rows plus a few small kernels.

    python benchmarks/bench_lstm_gates.py            # about a minute on a 2-core CPU
    python benchmarks/bench_lstm_gates.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import PairStats, describe, paired

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.lstm import LSTMReducer

# (input size, hidden size, layers, time steps, batch)
SHAPES = [
    (64, 64, 1, 8, 8),
    (32, 64, 1, 64, 256),
    (64, 128, 1, 32, 512),
    (64, 128, 2, 16, 256),
    (64, 128, 1, 1, 512),
]
QUICK_SHAPES = [(64, 64, 1, 8, 8), (64, 128, 2, 16, 256)]


def run_shape(shape: tuple[int, int, int, int, int], pairs: int) -> dict[str, PairStats]:
    features, hidden, layers, steps, batch = shape
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(features, hidden, num_layers=layers)
    x = torch.randn(steps, batch, features)
    h0 = torch.zeros(layers, batch, hidden)
    c0 = torch.zeros(layers, batch, hidden)
    k = min(batch, Thresholds().lstm_gate_sample)
    xs, hs, cs = x[:, :k].contiguous(), h0[:, :k].contiguous(), c0[:, :k].contiguous()
    with torch.no_grad():
        h, c = lstm(x, (h0, c0))[1]
    reducer = LSTMReducer(lstm, Thresholds())

    def forward() -> None:
        with torch.no_grad():
            lstm(x, (h0, c0))

    def forward_sample() -> None:
        with torch.no_grad():
            lstm(xs, (hs, cs))

    def observe(level: TelemetryLevel, inputs: bool = True) -> Callable[[], None]:
        def go() -> None:
            if inputs:
                reducer.observe(h, c, inputs=x, input_state=(h0, c0), level=level)
            else:
                reducer.observe(h, c, level=level)
            reducer.pending(level)

        return go

    return paired(
        {
            "forward": forward,
            "fwd 64": forward_sample,
            "NORMAL": observe(TelemetryLevel.NORMAL),
            "DEBUG": observe(TelemetryLevel.DEBUG),
            "state": observe(TelemetryLevel.NORMAL, inputs=False),
        },
        "forward",
        pairs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, few pairs (seconds)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per case (default 31, quick 7)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = args.pairs or (7 if args.quick else 31)
    print(describe())
    print(f"thread CPU ms (median) and the paired ratio to the full-batch forward, {pairs} pairs")
    cols = ("fwd 64", "NORMAL", "DEBUG", "state")
    print(f"{'LSTM F->H x layers, T, B':28s}{'forward ms':>11s}" + "".join(f"{c + ' ms':>11s}" for c in cols))
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        t = run_shape(shape, pairs)
        features, hidden, layers, steps, batch = shape
        label = f"{features}->{hidden} x{layers}, T={steps}, B={batch}"
        base = t["NORMAL"].base_seconds
        print(f"{label:28s}{base * 1e3:11.3f}" + "".join(f"{t[c].seconds * 1e3:11.3f}" for c in cols))
        for c in ("NORMAL", "DEBUG", "state"):
            q1, med, q3 = t[c].ratio
            print(
                f"{'':28s}  {c} / forward: {med:.2f}x (IQR {q1:.2f}-{q3:.2f}), wall {t[c].wall_ratio[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
