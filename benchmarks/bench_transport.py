"""Transport benchmark: what streaming costs the training thread, and how fast it arrives.

Run: ``python benchmarks/bench_transport.py [--quick]``. Measures, side by side in one run:

1. publish cost on the calling thread (``Publisher.publish_snapshot``), p50 / p99, for a realistic
   full NORMAL snapshot (~100 parameters, 3 heads, every statistics Struct filled) and a DEBUG one
   (plus the per-layer table and ratio outliers); the bare msgspec encode for comparison;
2. loopback latency from publish to decoded (envelope + body) by a subscriber in another process,
   p50 / p99, at 100 and 1,000 snapshots/s;
3. sustained throughput: publishing as fast as the calling thread can, what the thread sent and a
   subscriber decoded;
4. publish cost and a simulated training step (numpy work + publish) with 0 vs 10 stalled
   subscribers (another process that subscribes and never reads), as ratios.

Side-by-side comparisons (stream on vs ``bind=None``, 0 vs 10 stalled subscribers) alternate in
blocks of 100 calls so that noise from other processes on a shared machine hits both sides. Calls
are paced (0.5 ms sleep or ~1 ms of numpy work between them), as in training, so caches are as cold
as they will be there; the back-to-back encode is the warm lower bound.

Also the place where :func:`full_snapshot` lives (the fuzzer and the tests use it).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The simulated training step is single-threaded numpy: BLAS thread pools on a small shared machine
# measure the scheduler, not the transport.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from telemetry_core import protocol  # noqa: E402
from telemetry_core.config import ANOMALY_KINDS, Thresholds  # noqa: E402
from telemetry_core.schema import (  # noqa: E402
    AdvantageStats,
    Anomaly,
    Counters,
    DebugReport,
    EpisodeStats,
    GradientConflict,
    GradientStats,
    LayerRow,
    LevelInfo,
    LSTMStats,
    Moments,
    NumericalReport,
    PolicyStats,
    RatioOutliers,
    ReturnStats,
    RunInfo,
    Snapshot,
    ValueStats,
)

__all__ = ["full_snapshot"]


def full_snapshot(
    step: int = 100,
    *,
    n_params: int = 100,
    heads: dict[str, int] | None = None,
    debug: bool = False,
    seed: int = 0,
) -> Snapshot:
    """A realistic snapshot with every statistics Struct filled (DEBUG diagnostics if ``debug``)."""
    rng = random.Random(seed + step)
    heads = heads or {"direction": 4, "force": 3, "target": 8}
    names = [f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n_params)]
    numels = [rng.randint(16, 65536) for _ in names]
    u = rng.random
    per_head = {h: u() for h in heads}

    def moments() -> Moments:
        return Moments(
            count=4096,
            mean=u(),
            std=u() + 0.1,
            min=-u() * 3,
            max=u() * 3,
            skew=u(),
            kurtosis=u(),
            frac_positive=u(),
        )

    grads = GradientStats(
        calls=32,
        max_grad_norm=0.5,
        total_norm=u(),
        total_norm_max=u() * 2,
        total_norm_last=u(),
        clip_rate=u(),
        max_abs=u(),
        nan_count=0,
        inf_count=0,
        zero_fraction=u() * 0.01,
        hist_counts=[rng.randint(0, 10**6) for _ in range(10)],
        param_norms=[u() for _ in names],
        group_norms={"actor": u(), "critic": u(), "lstm": u()},
        group_norms_normalized={"actor": u(), "critic": u(), "lstm": u()},
        group_ratios={"actor": u(), "critic": u(), "lstm": u()},
        vanishing_count=1,
        exploding_count=0,
        ema_total_norm=u(),
        ema_drift=u(),
    )
    policy = PolicyStats(
        minibatches=32,
        epochs=4,
        clip_range=0.2,
        policy_loss=-u(),
        ratio_mean=1.0 + u() * 0.01,
        ratio_std=u() * 0.1,
        ratio_max=1.0 + u(),
        ratio_min=1.0 - u() * 0.5,
        kl_k3_mean=u() * 0.02,
        kl_k3_max=u() * 0.05,
        kl_k1_mean=u() * 0.02,
        kl_k1_max=u() * 0.05,
        kl_k3_per_epoch=[u() * 0.02 for _ in range(4)],
        clip_fraction=u() * 0.3,
        clip_fraction_high=u() * 0.15,
        clip_fraction_low=u() * 0.15,
        ess=u(),
        head_clip_fraction=dict(per_head),
        head_clip_high=dict(per_head),
        head_clip_low=dict(per_head),
        head_ratio_max={h: 1 + u() for h in heads},
        head_ratio_min={h: 1 - u() * 0.5 for h in heads},
        head_kl_k3={h: u() * 0.02 for h in heads},
        entropy={h: u() * math.log(n) for h, n in heads.items()},
        entropy_normalized=dict(per_head),
    )
    value = ValueStats(
        value_loss=u(),
        value_loss_max=u() * 2,
        explained_variance=u(),
        value_mean=u(),
        value_std=u(),
        value_min=-u(),
        value_max=u(),
        error_mean=u(),
        error_std=u(),
        error_p5=-u(),
        error_p50=u() * 0.1,
        error_p95=u(),
    )
    advantage = AdvantageStats(
        raw=moments(),
        normalized=moments(),
        returns=ReturnStats(count=4096, mean=u(), std=u(), min=-u(), max=u(), p10=-u(), p50=u(), p90=u()),
    )
    gates = {"input": u(), "forget": u(), "output": u()}
    lstm = LSTMStats(
        h_norm=u() * 10,
        c_norm=u() * 20,
        h_rms=u(),
        c_rms=u(),
        h_max_abs=u(),
        c_max_abs=u() * 5,
        h_env_rms_max=u(),
        c_env_rms_max=u(),
        c_mean=u(),
        gate_saturation=dict(gates),
        gate_saturation_low=dict(gates),
        gate_saturation_high=dict(gates),
        gate_rows=256,
    )
    debug_report = None
    if debug:
        debug_report = DebugReport(
            layers=[
                LayerRow(
                    name=name,
                    numel=numel,
                    norm=u(),
                    mean=u() * 1e-3,
                    std=u() * 1e-2,
                    min=-u(),
                    max=u(),
                    zero_frac=u() * 0.01,
                    small_frac=u() * 0.1,
                    large_frac=u() * 0.01,
                    nan=0,
                    inf=0,
                )
                for name, numel in zip(names, numels)
            ],
            numerical=NumericalReport(
                max_abs_weight=u() * 3,
                max_abs_weight_param=names[0],
                max_abs_grad=u(),
                max_abs_grad_param=names[1],
                loss_finite=True,
                pre_clip_norms=[u() for _ in range(32)],
            ),
            outliers=[
                RatioOutliers(
                    head=h,
                    indices=[rng.randint(0, 511) for _ in range(8)],
                    ratios=[1 + u() for _ in range(8)],
                    actions=[rng.randint(0, n - 1) for _ in range(8)],
                    logp_diff=[u() for _ in range(8)],
                    logp_diff_mean=u(),
                    logp_diff_max=u(),
                )
                for h, n in [("joint", 1), *heads.items()]
            ],
            conflict=GradientConflict(
                policy_value_cosine=u() - 0.5, shared_params=40, head_cosines={"direction|force": u()}
            ),
        )
    return Snapshot(
        step=step,
        wall_time=time.time(),
        phase="mid",
        update_seconds=0.25,
        level=LevelInfo(level="DEBUG" if debug else "NORMAL", reason="configured"),
        gradients=grads,
        policy=policy,
        value=value,
        advantage=advantage,
        lstm=lstm,
        episodes=EpisodeStats(
            count=12, return_mean=u() * 100, return_min=0.0, return_max=200.0, length_mean=150.0
        ),
        debug=debug_report,
        anomalies=[
            Anomaly(
                kind=ANOMALY_KINDS[1],
                severity="warning",
                step=step,
                message="k3 KL 0.07 above 0.05",
                action="lower the learning rate",
                value=0.07,
                threshold=0.05,
            ),
            Anomaly(
                kind=ANOMALY_KINDS[0],
                severity="critical",
                step=step,
                message="entropy of head force collapsed",
                action="raise the entropy coefficient",
                value=0.02,
                threshold=0.1,
                head="force",
            ),
        ],
        thresholds=Thresholds(),
        run=RunInfo(
            name="bench",
            heads=dict(heads),
            param_names=names,
            param_numels=numels,
            groups={"actor": 100000, "critic": 90000, "lstm": 200000},
            planned_updates=1000,
            device="cuda:0",
            max_grad_norm=0.5,
        ),
        counters=Counters(snapshots_published=step),
    )


# ------------------------------------------------------------------------------------------------
# Helpers running in other processes (spawned: no inherited sockets or threads)
# ------------------------------------------------------------------------------------------------


def _subscriber(info, ready, conn, expect: int, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Decode snapshots (envelope + body) and report latency = receive time - publish wall time."""
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    protocol.client_curve(sub, info)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_SNAPSHOT)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_HEARTBEAT)
    sub.setsockopt(zmq.RCVHWM, 100000)
    sub.connect(info.pub)
    while not sub.poll(5000):  # the first heartbeat proves the subscription is in place
        pass
    sub.recv_multipart()
    ready.set()
    latencies: list[float] = []
    seqs: list[int] = []
    deadline = time.time() + timeout
    while len(latencies) < expect and time.time() < deadline:
        if not sub.poll(200):
            continue
        topic, frame = sub.recv_multipart()
        if topic != protocol.TOPIC_SNAPSHOT:
            continue
        env = protocol.decode_envelope(frame)
        snap = protocol.decode_body(env)
        latencies.append(time.time() - snap.wall_time)
        seqs.append(env.seq)
    conn.send((latencies, seqs))
    sub.close(linger=0)
    ctx.term()


def _stalled_subscribers(info, n: int, ready, stop) -> None:  # type: ignore[no-untyped-def]
    """``n`` subscribers that connect, subscribe and never read."""
    import zmq

    ctx = zmq.Context()
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 4096)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        protocol.client_curve(s, info)
        s.connect(info.pub)
        socks.append(s)
    time.sleep(0.5)
    ready.set()
    stop.wait(120)
    for s in socks:
        s.close(linger=0)
    ctx.term()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt_us(values: list[float]) -> str:
    return f"p50 {_pct(values, 0.5) * 1e6:7.1f} µs   p99 {_pct(values, 0.99) * 1e6:7.1f} µs"


def _new_publisher(**kw):  # type: ignore[no-untyped-def]
    from telemetry_core.transport import Publisher

    return Publisher("tcp://127.0.0.1:0", connection_file=False, heartbeat_interval=0.2, **kw).start()


def bench_publish_cost(n: int) -> dict[str, list[float]]:
    """Calling-thread cost of publish_snapshot, paced at ~2 kHz so the queue never overflows.

    The stream-on and bind=None publishers run in alternating blocks so machine noise hits both.
    """
    from telemetry_core.transport import Publisher

    results: dict[str, list[float]] = {}
    snaps = {"normal": full_snapshot(), "debug": full_snapshot(debug=True)}
    for name, snap in snaps.items():
        encode = []
        for i in range(n):
            t0 = time.perf_counter()
            protocol.encode_envelope("snapshot", snap, session="s", seq=i, step=i, wall_time=snap.wall_time)
            encode.append(time.perf_counter() - t0)
        results[f"encode only ({name}, back to back)"] = encode
        pubs = {
            "stream on": Publisher("tcp://127.0.0.1:0", connection_file=False).start(),
            "bind=None": Publisher(None).start(),
        }
        costs: dict[str, list[float]] = {label: [] for label in pubs}
        for _block in range(n // 100):
            for label, pub in pubs.items():
                for _ in range(100):
                    t0 = time.perf_counter()
                    pub.publish_snapshot(snap)
                    costs[label].append(time.perf_counter() - t0)
                    time.sleep(0.0005)
        for label, pub in pubs.items():
            pub.close()
            results[f"publish_snapshot ({name}, {label})"] = costs[label]
    return results


def bench_latency(rate: float, seconds: float) -> tuple[list[float], int, int]:
    """Publish at ``rate``/s to a subscriber process; return latencies, sent, received."""
    ctx = mp.get_context("spawn")
    pub = _new_publisher(pub_hwm=100000, queue_size=100000)
    snap = full_snapshot()
    n = int(rate * seconds)
    ready = ctx.Event()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_subscriber, args=(pub.connection_info, ready, child, n, seconds + 10))
    proc.start()
    ready.wait(30)
    period = 1.0 / rate
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # sleeping (not spinning) releases the GIL, as a training step does
        snap.wall_time = time.time()
        pub.publish_snapshot(snap)
    latencies, _seqs = parent.recv() if parent.poll(seconds + 15) else ([], [])
    proc.join(5)
    pub.close()
    return latencies, n, len(latencies)


def bench_throughput(seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    pub = _new_publisher(pub_hwm=1000)
    snap = full_snapshot()
    ready = ctx.Event()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_subscriber, args=(pub.connection_info, ready, child, 10**9, seconds + 1.0))
    proc.start()
    ready.wait(30)
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < seconds:
        snap.wall_time = time.time()
        pub.publish_snapshot(snap)
        calls += 1
    elapsed = time.perf_counter() - start
    time.sleep(0.5)
    counters = pub.counters
    latencies, seqs = parent.recv() if parent.poll(seconds + 15) else ([], [])
    proc.join(5)
    pub.close()
    return {
        "calls/s": calls / elapsed,
        "sent/s": counters.published / elapsed,
        "received/s": len(latencies) / elapsed,
        "queue drops": counters.dropped,
        "gaps seen by subscriber": (max(seqs) - min(seqs) + 1 - len(seqs)) if seqs else 0,
        "frame bytes": len(protocol.encode_envelope("snapshot", snap, session="s", seq=0, step=0)),
    }


def _work(matrix, reps: int):  # type: ignore[no-untyped-def]
    import numpy as np

    out = matrix
    for _ in range(reps):
        out = np.tanh(out @ matrix)
    return out


def bench_stalled(n: int, stalled: int = 10) -> dict[str, dict[str, list[float]]]:
    """Publish cost and a simulated step (numpy work + publish): no subscriber vs ``stalled``.

    Two publishers, one with ``stalled`` subscribers (another process that never reads), used in
    alternating blocks of 100 steps so that machine noise hits both sides alike.
    """
    import numpy as np

    ctx = mp.get_context("spawn")
    pubs = {"0 stalled": _new_publisher(), f"{stalled} stalled": _new_publisher()}
    snap = full_snapshot(debug=True)  # the largest frame: the stalled queues fill fastest
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=_stalled_subscribers, args=(pubs[f"{stalled} stalled"].connection_info, stalled, ready, stop)
    )
    proc.start()
    ready.wait(30)
    matrix = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32) * 0.1
    out: dict[str, dict[str, list[float]]] = {label: {"publish": [], "step": []} for label in pubs}
    for _block in range(max(1, n // 100)):
        for label, pub in pubs.items():
            for _ in range(100):
                t0 = time.perf_counter()
                _work(matrix, 10)
                t1 = time.perf_counter()
                pub.publish_snapshot(snap)
                t2 = time.perf_counter()
                out[label]["publish"].append(t2 - t1)
                out[label]["step"].append(t2 - t0)
    stop.set()
    proc.join(10)
    for pub in pubs.values():
        pub.close()
    return out


def _spin(n: int) -> int:
    """CPU-bound pure Python (holds the GIL, as a training loop's Python does between calls)."""
    x = 0
    for i in range(n):
        x += i * i % 7
    return x


def _iqr(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def bench_hub_publish(updates: int, spin: int) -> dict[str, object]:
    """Publishing inside a real TelemetryHub, a subscriber process attached, CPU-bound Python between.

    Two hubs on the same small model (stream on with a CURVE subscriber attached, and ``bind=None``)
    take turns update by update, in adjacent pairs whose order alternates, so machine load hits
    both alike. Per update: ``spin`` iterations of pure Python (timed: what the publisher thread's
    share of the GIL costs the training thread between calls), one backward, ``observe_gradients``
    and ``end_update`` (whose publish step, ``hub._publish``, is timed: wall and thread CPU). The
    publisher thread's own CPU time (it encodes the snapshots now) is read from its thread clock.
    """
    import torch

    from telemetry_core import TelemetryHub

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    hubs = {
        "stream on": TelemetryHub(model, heads={"a": 4}, max_grad_norm=0.5, bind="tcp://127.0.0.1:0"),
        "bind=None": TelemetryHub(model, heads={"a": 4}, max_grad_norm=0.5, bind=None),
    }
    publish: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in hubs}
    work: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in hubs}
    for label, hub in hubs.items():
        inner = hub._publish

        def timed(snapshot, inner=inner, out=publish[label]):  # type: ignore[no-untyped-def]
            w, c = time.perf_counter(), time.thread_time()
            inner(snapshot)
            out["cpu"].append(time.thread_time() - c)
            out["wall"].append(time.perf_counter() - w)

        hub._publish = timed  # type: ignore[method-assign]
    call: dict[str, list[float]] = {"wall": [], "cpu": []}  # Publisher.hand_off_snapshot alone
    pub_obj = hubs["stream on"].publisher
    assert pub_obj is not None and pub_obj._thread is not None
    inner_call = pub_obj.hand_off_snapshot

    def timed_call(snapshot, on_frame=None):  # type: ignore[no-untyped-def]
        w, c = time.perf_counter(), time.thread_time()
        out = inner_call(snapshot, on_frame)
        call["cpu"].append(time.thread_time() - c)
        call["wall"].append(time.perf_counter() - w)
        return out

    pub_obj.hand_off_snapshot = timed_call  # type: ignore[method-assign]
    sender_clock = time.pthread_getcpuclockid(pub_obj._thread.ident)  # type: ignore[arg-type]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    _parent, child = ctx.Pipe()
    info = hubs["stream on"].publisher.connection_info
    proc = ctx.Process(target=_subscriber, args=(info, ready, child, 10**9, 600.0))
    proc.start()
    ready.wait(60)
    x = torch.randn(256, 64)
    labels = list(hubs)
    sender_start = time.clock_gettime(sender_clock)
    for step in range(updates):
        order = labels if step % 2 == 0 else labels[::-1]
        for label in order:
            hub = hubs[label]
            w, c = time.perf_counter(), time.thread_time()
            _spin(spin)
            work[label]["cpu"].append(time.thread_time() - c)
            work[label]["wall"].append(time.perf_counter() - w)
            model.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            hub.observe_gradients(loss)
            hub.end_update(step)
    time.sleep(0.1)  # the last hand-off is sent
    sender_cpu = time.clock_gettime(sender_clock) - sender_start
    subscriber_saw = pub_obj.counters.published
    for hub in hubs.values():
        hub.close()
    proc.terminate()
    proc.join(5)
    on, off = publish["stream on"], publish["bind=None"]
    ratios = {
        kind: [a / b for a, b in zip(work["stream on"][kind], work["bind=None"][kind])]
        for kind in ("wall", "cpu")
    }
    publish["stream on: Publisher.hand_off_snapshot"] = call
    return {
        "sender_cpu_per_update": sender_cpu / updates,
        "publish": publish,
        "work": work,
        "ratios": ratios,
        "published": subscriber_saw,
        "on": on,
        "off": off,
    }


def report_hub_publish(updates: int, spin: int) -> None:
    from _timing import describe

    res = bench_hub_publish(updates, spin)
    print(describe())
    print(
        "measured: wall (perf_counter) and thread CPU (thread_time) of hub._publish on the training thread; "
        f"{updates} updates per hub (stream on with a CURVE subscriber process / bind=None), adjacent "
        f"pairs in alternating order; {spin:,} iterations of pure Python between updates"
    )
    for label, times in res["publish"].items():  # type: ignore[union-attr]
        print(
            f"{'hub._publish (' + label + ')':40s} wall p50 {_pct(times['wall'], 0.5) * 1e6:7.1f} µs  p99 "
            f"{_pct(times['wall'], 0.99) * 1e6:7.1f} µs | CPU p50 {_pct(times['cpu'], 0.5) * 1e6:7.1f} µs  "
            f"p99 {_pct(times['cpu'], 0.99) * 1e6:7.1f} µs"
        )
    for kind, ratios in res["ratios"].items():  # type: ignore[union-attr]
        lo, hi = _iqr(ratios)
        print(
            f"Python work between updates, stream on / bind=None ({kind}): median {statistics.median(ratios):.3f}"
            f" (IQR {lo:.3f}-{hi:.3f})"
        )
    print(f"snapshots published to the subscriber: {res['published']}")
    print(
        "publisher thread CPU per update (encode, send, heartbeats, polling; off the training thread): "
        f"{res['sender_cpu_per_update'] * 1e6:.1f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--hub-only", action="store_true", help="only section 5: publishing inside a real hub"
    )
    args = parser.parse_args()
    os.environ.setdefault("SIMIC_RUNTIME_DIR", tempfile.mkdtemp(prefix="simic-bench-"))
    n = 500 if args.quick else 3000
    seconds = 1.0 if args.quick else 3.0
    print(f"# transport benchmark (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    for name, snap in (("normal", full_snapshot()), ("debug", full_snapshot(debug=True))):
        frame = protocol.encode_envelope("snapshot", snap, session="s", seq=0, step=0)
        print(f"snapshot frame ({name}): {len(frame)} bytes")

    t_start = time.perf_counter()
    print("\n## 5. publishing inside a real hub, a subscriber attached, CPU-bound Python between calls")
    report_hub_publish(200 if args.quick else 1000, 200_000)
    if args.hub_only:
        return
    print("\n## 1. publish cost on the calling thread")
    for label, values in bench_publish_cost(n).items():
        print(f"{label:44s} {_fmt_us(values)}")

    print("\n## 2. loopback latency, publish -> decoded by a subscriber process")
    for rate in (100.0, 1000.0):
        lat, sent, got = bench_latency(rate, seconds if rate > 100 else max(seconds, 2.0))
        if lat:
            print(
                f"{rate:6.0f} snapshots/s: p50 {_pct(lat, 0.5) * 1e3:6.3f} ms   p99 {_pct(lat, 0.99) * 1e3:6.3f} ms"
                f"   max {max(lat) * 1e3:6.2f} ms   received {got}/{sent}"
            )
        else:
            print(f"{rate:6.0f} snapshots/s: subscriber received nothing")

    print("\n## 3. sustained throughput (publishing as fast as possible, one subscriber process)")
    for key, value in bench_throughput(seconds).items():
        print(f"{key:26s} {value:12.0f}")

    print("\n## 4. 0 vs 10 stalled subscribers (DEBUG snapshot, numpy work + publish per step)")
    stalled = bench_stalled(n)
    base, stall = stalled["0 stalled"], stalled["10 stalled"]
    for key in ("publish", "step"):
        b50, s50 = statistics.median(base[key]), statistics.median(stall[key])
        b99, s99 = _pct(base[key], 0.99), _pct(stall[key], 0.99)
        print(
            f"{key:8s} 0 stalled: p50 {b50 * 1e6:8.1f} µs p99 {b99 * 1e6:8.1f} µs | 10 stalled: p50 "
            f"{s50 * 1e6:8.1f} µs p99 {s99 * 1e6:8.1f} µs | ratio p50 {s50 / b50:5.2f} p99 {s99 / b99:5.2f}"
        )
    print(f"\n(benchmark took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
