"""Gate-saturation replay cost vs nn.LSTM forward, measured side by side (interleaved, medians)."""

import time, statistics, torch
from telemetry_core.reductions.lstm import LSTMReducer
from telemetry_core.config import TelemetryLevel as L, Thresholds

torch.set_num_threads(1)


def timeit(fns, reps=7):
    res = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            s = time.perf_counter()
            f()
            res[i].append(time.perf_counter() - s)
    return [statistics.median(r) for r in res]


for F, H, layers, T, B in [
    (32, 64, 1, 64, 256),
    (64, 128, 1, 32, 512),
    (64, 128, 2, 16, 256),
    (64, 128, 1, 1, 512),
]:
    lstm = torch.nn.LSTM(F, H, num_layers=layers)
    x = torch.randn(T, B, F)
    h0 = torch.zeros(layers, B, H)
    c0 = torch.zeros(layers, B, H)
    k = 64
    xs = x[:, :k].contiguous()
    hs = h0[:, :k].contiguous()
    cs = c0[:, :k].contiguous()
    with torch.no_grad():
        h, c = lstm(x, (h0, c0))[1]
    red = LSTMReducer(lstm, Thresholds())

    def fwd():
        with torch.no_grad():
            lstm(x, (h0, c0))

    def fwd_k():
        with torch.no_grad():
            lstm(xs, (hs, cs))

    nrm = lambda: red.observe(h, c, inputs=x, input_state=(h0, c0), level=L.NORMAL)
    dbg = lambda: red.observe(h, c, inputs=x, input_state=(h0, c0), level=L.DEBUG)
    st = lambda: red.observe(h, c, level=L.NORMAL)
    a, b, n, d, s = timeit([fwd, fwd_k, nrm, dbg, st])
    print(
        f"LSTM {F}->{H} x{layers}, T={T}, B={B}: forward {a * 1e3:.2f} ms; NORMAL replay of 64 rows {n * 1e3:.2f} ms "
        f"= {n / a:.2f}x the full forward ({n / b:.2f}x a forward of those 64 rows); DEBUG replay of all rows {d * 1e3:.2f} ms = {d / a:.2f}x; state stats only {s * 1e3:.3f} ms"
    )
