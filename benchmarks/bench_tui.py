"""Dashboard benchmark: ingest rate, publish→store latency, redraw cost, memory, cold start.

    python benchmarks/bench_tui.py            # everything (about a minute)
    python benchmarks/bench_tui.py --quick    # smaller counts
    python benchmarks/bench_tui.py --sweep-only   # only the sweep: 16 trainers at 10 updates/s

Everything is the real path: frames are encoded by telemetry_core.protocol exactly as the trainer
publishes them; latency and cold start go through a real Publisher and real loopback sockets; the
redraw and memory numbers come from the real app running headless. Targets from the issue are
printed beside each number. Numbers from a shared, loaded machine are preliminary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from build_recording import Run  # noqa: E402

from simic_tui.store import TelemetryStore  # noqa: E402
from telemetry_core.protocol import decode_body, decode_envelope, encode_envelope  # noqa: E402


def frames(n_unique: int = 120) -> list[bytes]:
    """Realistic frames: one PPO run's updates (NORMAL ones and DEBUG ones with full reports)."""
    run = Run()
    return [
        encode_envelope("snapshot", run.snapshot(k, k + 1), session="bench", seq=k + 1, step=k)
        for k in range(n_unique)
    ]


def ingest_path(store: TelemetryStore, frame: bytes, seq: int) -> None:
    """What the client does per snapshot frame: check and decode the envelope, decode, ingest."""
    env = decode_envelope(frame)
    env.seq = seq
    store.ingest(env, decode_body(env))


# ---------------------------------------------------------------------------------------------
# 1. ingest throughput
# ---------------------------------------------------------------------------------------------


def bench_ingest(total: int) -> dict[str, float]:
    pool = frames()
    debug = [f for f in pool if decode_body(decode_envelope(f)).debug is not None]
    normal = [f for f in pool if f not in debug]
    out: dict[str, float] = {}
    for name, sample in (("normal", normal), ("debug", debug)):
        store = TelemetryStore()
        for i in range(200):  # warm-up: columns created
            ingest_path(store, sample[i % len(sample)], i + 1)
        t0 = time.perf_counter()
        for i in range(total):
            ingest_path(store, sample[i % len(sample)], 1000 + i)
        dt = time.perf_counter() - t0
        out[name] = total / dt
        out[f"{name}_bytes"] = statistics.mean(len(f) for f in sample)
    return out


# ---------------------------------------------------------------------------------------------
# 2. publish -> in-store latency over real sockets
# ---------------------------------------------------------------------------------------------


def _publisher_proc(port: int, rate: float, seconds: float, ready: mp.Event) -> None:  # type: ignore[valid-type]
    from telemetry_core.transport import Publisher

    run = Run()
    snaps = [run.snapshot(k, k + 1) for k in range(120)]
    with Publisher(f"tcp://127.0.0.1:{port}", run_name="bench", pub_hwm=10_000) as pub:  # its file: CURVE keys
        ready.set()
        time.sleep(1.0)  # let the subscriber connect
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(due - now, 0.002))
            snap = snaps[i % len(snaps)]
            snap.wall_time = time.time()
            pub.publish_snapshot(snap)
        time.sleep(0.5)


class LatencyStore(TelemetryStore):
    """Records, for each ingested snapshot, now minus the wall time the trainer stamped it with."""

    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []

    def ingest(self, env, snap, *, quiet=False, backfill=False):  # type: ignore[no-untyped-def,override]
        self.latencies.append(time.time() - env.wall_time)
        return super().ingest(env, snap, quiet=quiet, backfill=backfill)


def bench_latency(rate: float, seconds: float) -> dict[str, float]:
    from simic_tui.client import TelemetryClient
    from simic_tui.demo import free_port_pair
    from simic_tui.target import resolve_target

    port = free_port_pair()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_publisher_proc, args=(port, rate, seconds, ready), daemon=True)
    proc.start()
    ready.wait(30)
    store = LatencyStore()
    client = TelemetryClient(resolve_target(f"127.0.0.1:{port}"), store)  # the trainer's file, found by port

    async def run() -> None:
        task = asyncio.create_task(client.run())
        deadline = time.monotonic() + seconds + 15
        while proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        client.stop()
        await task

    asyncio.run(run())
    proc.join(5)
    lat = sorted(store.latencies[10:])  # the first frames wait for the connection
    q = statistics.quantiles(lat, n=100)
    return {
        "received": len(store.latencies),
        "sent": int(rate * seconds),
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
    }


# ---------------------------------------------------------------------------------------------
# 3. redraw cost per tick, 4. memory after 100,000 snapshots (real app, headless, fresh process)
# ---------------------------------------------------------------------------------------------

APP_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    sys.path[:0] = [{root!r}, {fixtures!r}]
    from build_recording import Run
    from simic_tui.app import SimicApp
    from simic_tui.client import LinkState, LinkStatus
    from simic_tui.store import TelemetryStore
    from telemetry_core.protocol import decode_body, decode_envelope, encode_envelope

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    run = Run()
    pool = [encode_envelope("snapshot", run.snapshot(k, k + 1), session="b", seq=k + 1, step=k) for k in range(120)]
    seq = [0]

    def feed(store, n):
        for _ in range(n):
            seq[0] += 1
            env = decode_envelope(pool[seq[0] % len(pool)])
            env.seq = seq[0]
            store.ingest(env, decode_body(env))

    async def main(width, height, total, ticks):
        store = TelemetryStore()
        app = SimicApp(store, status=LinkStatus(LinkState.LIVE, "tcp://127.0.0.1:5555"))
        out = {{"rss_start_mb": rss_mb()}}
        async with app.run_test(size=(width, height)) as pilot:
            feed(store, 10_000)  # a full ring: sparklines and charts over the whole width
            await pilot.pause()
            # redraw cost: one new snapshot per tick, every panel rebuilt, compared with a frozen display
            costs = {{}}
            for paused in (True, False):
                app.display_paused = paused
                c0 = time.process_time()
                for _ in range(ticks):
                    feed(store, 1)
                    app.tick()
                    await pilot.pause()  # let Textual compose and render the frame
                costs[paused] = (time.process_time() - c0) / ticks
            t0 = time.perf_counter()
            for _ in range(ticks):
                feed(store, 1)
                app.dashboard.show_panels(app.current_view())
            out["panel_build_ms"] = (time.perf_counter() - t0) / ticks * 1e3
            out["tick_cpu_ms"] = costs[False] * 1e3
            out["tick_cpu_paused_ms"] = costs[True] * 1e3
            marks = {{}}
            done = 10_000 + 3 * ticks
            for target in (10_000, 50_000, total):
                while done < target:
                    feed(store, 1000)
                    done += 1000
                    app.tick()
                    await pilot.pause(0)
                marks[target] = rss_mb()
            out["rss_mb"] = marks
            out["anomalies_held"] = len(store.anomalies)
            out["ring_rows"] = store.size
        print(json.dumps(out))

    asyncio.run(main(*map(int, sys.argv[1:5])))
    """
)


def bench_app(width: int, height: int, total: int, ticks: int) -> dict:
    code = APP_PROBE.format(root=str(ROOT), fixtures=str(ROOT / "tests" / "fixtures"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(width), str(height), str(total), str(ticks)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 5. cold start: `attach` process start -> first frame in the store
# ---------------------------------------------------------------------------------------------

COLD = textwrap.dedent(
    """
    import sys, time
    from simic_tui.app import SimicApp
    from simic_tui.client import TelemetryClient
    from simic_tui.store import TelemetryStore
    from simic_tui.target import resolve_target

    class FirstFrame(TelemetryStore):
        def ingest(self, env, snap, **kw):
            ok = super().ingest(env, snap, **kw)
            if self.count == 1:
                print(f"FIRST {{time.time():.6f}}", flush=True)
                app.exit()
            return ok

    store = FirstFrame()
    app = SimicApp(store, client=TelemetryClient(resolve_target({address!r}), store))
    app.run(headless=True, size=(120, 40))
    """
)


def bench_cold_start(repeats: int) -> dict[str, float]:
    from telemetry_core.transport import Publisher

    run = Run()
    samples = []
    with Publisher("tcp://127.0.0.1:0", run_name="bench", heartbeat_interval=1.0) as pub:
        for k in range(200):  # a trainer 200 updates in: the first frame can come from history
            pub.publish_snapshot(run.snapshot(k % 120, k + 1))
        assert pub.endpoints is not None
        address = pub.endpoints.pub.replace("tcp://", "")
        code = COLD.format(address=address)
        for _ in range(repeats):
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST")), None)
            if line is None:
                raise RuntimeError(proc.stderr[-2000:])
            samples.append(float(line.split()[1]) - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "runs": repeats,
    }


# ---------------------------------------------------------------------------------------------
# 6. a sweep: 16 trainers at 10 updates/s each -> the sweep table's CPU and RSS
# ---------------------------------------------------------------------------------------------


def _sweep_publishers(n: int, rate: float, seconds: float, runtime: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    """``n`` real Publishers in this process (each its own sockets, thread and connection file),
    publishing valid snapshots of a recorded PPO run round-robin at ``rate`` updates/s each."""
    os.environ["SIMIC_RUNTIME_DIR"] = runtime
    from telemetry_core.transport import Publisher

    run = Run()
    snaps = [run.snapshot(k, k + 1) for k in range(120)]
    pubs = [Publisher("tcp://127.0.0.1:0", run_name=f"sweep-{os.getpid()}-{i}").start() for i in range(n)]
    q.put([p.endpoints.pub.replace("tcp://", "") for p in pubs])  # type: ignore[union-attr]
    time.sleep(2.0)  # let the dashboard connect
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.005))
        for p in pubs:
            snap = snaps[i % len(snaps)]
            snap.step = i
            snap.wall_time = time.time()
            p.publish_snapshot(snap)
            p.poll_commands()
    for p in pubs:
        p.close()


SWEEP_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    sys.path[:0] = [{root!r}]
    from simic_tui.screens.sweep import SweepApp
    from simic_tui.sweep import PANEL_INTERVAL, make_run
    from simic_tui.target import resolve_target

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024

    addresses = sys.argv[1].split(",")
    warmup, window, windows = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

    async def main():
        app = SweepApp([make_run(resolve_target(a), a) for a in addresses])
        app.panel_interval = PANEL_INTERVAL  # as the CLI sets it
        out = {{"rss_start_mb": status("VmRSS"), "windows": {{}}}}
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(warmup)
            def received():
                return sum(r.store.counters.snapshots for r in app.runs)
            async def measure():
                c0, w0, n0 = time.process_time(), time.perf_counter(), received()
                await pilot.pause(window)
                c1, w1, n1 = time.process_time(), time.perf_counter(), received()
                return [(c1 - c0) / (w1 - w0), (n1 - n0) / (w1 - w0), os.getloadavg()[0]]

            out["windows"]["table"] = [await measure() for _ in range(windows)]
            await pilot.press("enter")
            await pilot.pause(1.0)
            # drilled in: windows with the panels' redraw interval (as shipped) and without it (a
            # redraw per new snapshot) as adjacent pairs in alternating order, so a load change
            # from the machine's other jobs hits both alike
            capped, every = [], []
            for k in range(windows):
                for interval in ((PANEL_INTERVAL, 0.0) if k % 2 == 0 else (0.0, PANEL_INTERVAL)):
                    app.panel_interval = interval
                    await pilot.pause(0.5)
                    (capped if interval else every).append(await measure())
            app.panel_interval = PANEL_INTERVAL
            out["windows"]["dashboard"] = capped
            out["windows"]["dashboard, every snapshot redrawn"] = every
            out["interval"] = PANEL_INTERVAL
            out["rss_mb"] = status("VmRSS")
            out["rss_peak_mb"] = status("VmHWM")
            out["live"] = sum(1 for r in app.runs if r.client.status.state.value == "live")
            out["missed"] = sum(r.store.counters.missed for r in app.runs)
            out["bad"] = sum(r.store.counters.bad_frames for r in app.runs)
            out["rows_per_run"] = max(r.store.size for r in app.runs)
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def bench_sweep(trainers: int, rate: float, warmup: float, window: float, windows: int) -> dict:
    """The real SweepApp (headless, 160x48) attached to ``trainers`` real publishers over loopback.

    CPU is the dashboard process's CPU time (every thread: Textual, the clients, libzmq's I/O)
    over wall time, per window; publishers run in other processes and are not counted.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runtime = Path(tmp) / "runtime"
        runtime.mkdir(mode=0o700)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs_n = 4
        seconds = warmup + 3 * windows * (window + 0.5) + 20
        procs = [
            ctx.Process(
                target=_sweep_publishers,
                args=(trainers // procs_n, rate, seconds, str(runtime), q),
                daemon=True,
            )
            for _ in range(procs_n)
        ]
        for p in procs:
            p.start()
        addresses = [a for _ in procs for a in q.get(timeout=120)]
        code = SWEEP_PROBE.format(root=str(ROOT))
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code, ",".join(addresses), str(warmup), str(window), str(windows)],
                capture_output=True,
                text=True,
                timeout=seconds + 120,
                env={**os.environ, "SIMIC_RUNTIME_DIR": str(runtime)},
            )
        finally:
            for p in procs:
                p.terminate()
                p.join(10)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    """UTC time, CPU model and count, RAM and the load average (the machine may be shared)."""
    cpu, mem = platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {cpu}, {os.cpu_count()} CPUs{mem} | "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | python {platform.python_version()}"
    )


def report_sweep(res: dict, trainers: int, rate: float) -> None:
    print(
        f"\n6. a sweep: {trainers} real publishers at {rate:g} updates/s each -> SweepApp (headless, 160x48)"
    )
    print(f"   {machine()}")
    print(
        "   method: the dashboard process's CPU time (all its threads, time.process_time) over wall time, "
        "per window; median and IQR (25th-75th percentile) of the windows; publishers in other processes; "
        "the load average (1 min) at the end of each window beside it"
    )
    for view, rows in res["windows"].items():
        cpu = [r[0] * 100 for r in rows]
        rx = [r[1] for r in rows]
        loads = [r[2] for r in rows]
        q1, med, q3 = statistics.quantiles(cpu, n=4) if len(cpu) > 1 else [cpu[0]] * 3
        what = {
            "table": "the sweep table",
            "dashboard": f"drilled in, panels <= {1 / res.get('interval', 1):.0f}/s",
        }.get(view, f"drilled in, {view.split(', ')[-1]}")
        print(
            f"   {what:34s}: CPU median {med:.1f}% of one core (IQR {q1:.1f}-{q3:.1f}%, {len(cpu)} windows), "
            f"received {statistics.median(rx):.0f} snapshots/s of {trainers * rate:.0f}, "
            f"load {min(loads):.1f}-{max(loads):.1f}"
            + ("   target < 25%" if view in ("table", "dashboard") else "")
        )
        print(f"   {'':34s}  windows in order: {', '.join(f'{c:.1f}%' for c in cpu)}")
    windows = res["windows"]
    pairs = list(zip(windows.get("dashboard", []), windows.get("dashboard, every snapshot redrawn", [])))
    if pairs:
        ratios = [c[0] / e[0] for c, e in pairs if e[0] > 0]
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"   drilled-in CPU, capped / every snapshot redrawn: median {med:.2f}x of the adjacent "
            f"window (IQR {q1:.2f}-{q3:.2f}x, {len(ratios)} pairs in alternating order)"
        )
    print(
        f"   RSS {res['rss_start_mb']:.0f} MB at start, {res['rss_mb']:.0f} MB at the end, peak "
        f"{res['rss_peak_mb']:.0f} MB   target < 300 MB; {res['live']}/{trainers} links live, "
        f"{res.get('missed', '?')} snapshots missed, {res.get('bad', '?')} bad frames; "
        f"{res['rows_per_run']} rows of history per run (capped at 2,000)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only section 6 (16 trainers)")
    args = parser.parse_args()
    quick = args.quick
    print(f"simic-tui dashboard benchmark ({os.cpu_count()} CPUs visible, load {os.getloadavg()[0]:.1f})")
    if args.sweep_only:
        res = bench_sweep(16, 10.0, warmup=5.0, window=5.0, windows=3 if quick else 5)
        report_sweep(res, 16, 10.0)
        return

    ing = bench_ingest(5_000 if quick else 30_000)
    print("\n1. ingest into the store (decode envelope + body, flatten, ring write), sustained")
    for name in ("normal", "debug"):
        print(
            f"   {name:6s} snapshots ({ing[name + '_bytes'] / 1024:.1f} KiB): {ing[name]:8.0f} snapshots/s  "
            f"({1e6 / ing[name]:.0f} µs each)   target >= 2,000/s"
        )

    print("\n2. publish -> in-store latency, real Publisher process -> real client, loopback")
    for rate in (100.0, 1000.0):
        lat = bench_latency(rate, 5.0 if quick else 10.0)
        target = "   target p99 <= 50 ms" if rate == 100 else ""
        print(
            f"   {rate:6.0f} snapshots/s: p50 {lat['p50_ms']:.2f} ms  p99 {lat['p99_ms']:.2f} ms  "
            f"(received {lat['received']}/{lat['sent']}){target}"
        )

    print("\n3. redraw cost per tick (real app, headless; a new snapshot every tick, 10,000 rows of history)")
    total = 20_000 if quick else 100_000
    for size in ((80, 24), (160, 48), (200, 60)):
        res = bench_app(*size, total=total if size == (160, 48) else 12_000, ticks=30 if quick else 60)
        print(
            f"   {size[0]}x{size[1]}: panel rebuild {res['panel_build_ms']:.1f} ms; tick CPU incl. Textual render "
            f"{res['tick_cpu_ms']:.1f} ms (display paused: {res['tick_cpu_paused_ms']:.1f} ms)"
            f" = {res['tick_cpu_ms']:.0f}% of one core at 10 Hz"
        )
        if size == (160, 48):
            mem = res

    print(f"\n4. memory of the dashboard process (real app at 160x48) while ingesting {total:,} snapshots")
    marks = ", ".join(f"{int(k):,}: {v:.0f} MB" for k, v in mem["rss_mb"].items())
    print(f"   RSS at start {mem['rss_start_mb']:.0f} MB; after {marks}   target <= 200 MB, bounded")
    print(f"   held: {mem['ring_rows']:,} rows of history, {mem['anomalies_held']:,} anomalies (both capped)")

    cold = bench_cold_start(3 if quick else 5)
    print(
        "\n5. cold start: `attach` process spawn -> first frame in the store (incl. interpreter, imports, app)"
    )
    print(
        f"   median {cold['median_s']:.2f} s (min {cold['min_s']:.2f}, max {cold['max_s']:.2f}, {cold['runs']} runs)"
        "   target <= 1 s"
    )

    res = bench_sweep(16, 10.0, warmup=5.0, window=5.0, windows=3 if quick else 5)
    report_sweep(res, 16, 10.0)


if __name__ == "__main__":
    main()
