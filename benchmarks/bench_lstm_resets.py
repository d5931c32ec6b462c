"""Gate replay across episode resets: what the reset mask costs against the fused replay.

One end-of-update gate measurement (``LSTMReducer.observe`` + ``pending``) at NORMAL, on the
sampled rows, three ways: without resets (the CPU's fused ``torch.lstm`` path), with a reset mask
(the stepwise ``torch.lstm_cell`` path every other device also takes), and a plain ``nn.LSTM``
forward over the same rows as the unit. Method: thread CPU time (``time.thread_time``) with wall
time beside it, ``torch.set_num_threads(1)``, adjacent pairs in alternating order so machine load
cancels; it prints the method, the machine and the median and IQR of the paired ratios.

    python benchmarks/bench_lstm_resets.py            # T=128, rows 64, F=64, H=128, 1 and 2 layers
    python benchmarks/bench_lstm_resets.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from telemetry_core.config import TelemetryLevel, Thresholds
from telemetry_core.reductions.lstm import LSTMReducer


def paired(a: Callable[[], object], b: Callable[[], object], pairs: int) -> dict[str, list[float]]:
    """Ratios b/a of adjacent calls, alternating which runs first; CPU and wall clocks."""
    a(), b()
    cpu: list[float] = []
    wall: list[float] = []
    for i in range(pairs):
        times = {}
        for name, fn in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            times[name] = (time.thread_time() - c0, time.perf_counter() - w0)
        cpu.append(times["b"][0] / times["a"][0])
        wall.append(times["b"][1] / times["a"][1])
    return {"cpu": cpu, "wall": wall}


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):6.2f}x (IQR {q[0]:.2f}-{q[2]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--envs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--features", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = 10 if args.quick else 30
    print(
        "method: thread CPU time (wall beside it), torch.set_num_threads(1), adjacent pairs in alternating"
        f" order, {pairs} pairs; median and IQR of the paired ratios"
    )
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    sample = Thresholds().lstm_gate_sample
    for layers in (1, 2):
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(args.features, args.hidden, num_layers=layers)
        x = torch.randn(args.steps, args.envs, args.features)
        h0 = torch.zeros(layers, args.envs, args.hidden)
        c0 = torch.zeros(layers, args.envs, args.hidden)
        resets = torch.rand(args.steps, args.envs) < 0.02
        with torch.no_grad():
            _, (h, c) = lstm(x, (h0, c0))
        reducer = LSTMReducer(lstm)
        idx = torch.arange(min(sample, args.envs)) * args.envs // min(sample, args.envs)  # the rows it replays
        rows = x[:, idx].contiguous()
        state = (h0[:, idx].contiguous(), c0[:, idx].contiguous())

        def fused(reducer: LSTMReducer = reducer, h=h, c=c, x=x, s=(h0, c0)) -> object:
            reducer.observe(h, c, inputs=x, input_state=s, level=TelemetryLevel.NORMAL)
            return reducer.pending(TelemetryLevel.NORMAL)

        def stepwise(reducer: LSTMReducer = reducer, h=h, c=c, x=x, s=(h0, c0), r=resets) -> object:
            reducer.observe(h, c, inputs=x, input_state=s, resets=r, level=TelemetryLevel.NORMAL)
            return reducer.pending(TelemetryLevel.NORMAL)

        def forward(lstm: torch.nn.LSTM = lstm, rows=rows, state=state) -> object:
            with torch.no_grad():
                return lstm(rows, state)

        label = (
            f"T={args.steps} rows={min(sample, args.envs)} of {args.envs} F={args.features} H={args.hidden}"
            f" layers={layers}"
        )
        for name, (a, b) in {
            "with resets / without (fused)": (fused, stepwise),
            "without resets / nn.LSTM forward": (forward, fused),
            "with resets / nn.LSTM forward": (forward, stepwise),
        }.items():
            r = paired(a, b, pairs)
            print(f"{label}  {name:34s} cpu {summary(r['cpu'])}  wall {summary(r['wall'])}")
        c0_ = time.thread_time()
        for _ in range(5):
            stepwise()
        print(f"{label}  with resets: {(time.thread_time() - c0_) / 5 * 1e3:.1f} ms CPU per update")


if __name__ == "__main__":
    main()
