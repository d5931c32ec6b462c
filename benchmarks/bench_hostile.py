"""What each hostile peer costs a real trainer: its RSS and its update time, next to the baseline.

Run: ``python benchmarks/bench_hostile.py [--window 4]``. Starts the demo trainer
(``python -m telemetry_core.demo``, NORMAL, one torch thread) and, one after the other, runs each
attack of the hostile-peer table against its two ports from this process, in a thread:

* without the connection file: a 10 MB subscription, one command of 300,000 x 1 KB parts,
  500 identities x 10 x 8 KB frames, 50,000 unsigned commands from one identity;
* with the connection file (an authenticated peer): a 10 MB subscription, 50,000 unsigned
  commands from one identity and 50,000 from 500 identities (signed commands are read, refused
  and answered: the publisher thread's CPU budget is what bounds them).

For each: ``pairs`` adjacent pairs of windows of ``window`` updates, one without and one with
the attacker (a process of its own, given one update to get going before its window starts), in
alternating order from one pair to the next so that load from other jobs hits both alike. Per
window: the median of the trainer's update times (printed by the trainer itself, wall clock) and
its training thread's CPU time per update (``/proc/PID/task/PID/stat``), and what its other
threads (the publisher thread, libzmq's I/O threads) spent, as a share of a core. Printed: the
median and IQR of the per-pair ratios (with / without), and the trainer's RSS
(``/proc/PID/status``) before the first pair and 3 s after the last attacker left. The machine,
the method and the numbers are printed together.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from telemetry_core import protocol  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import describe, quartiles  # noqa: E402

_UPDATE = re.compile(r"^update +(\d+)/\d+ .* (\d+\.\d+) s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Trainer:
    """The demo trainer in a child process; its per-update times are read from its output."""

    def __init__(self, updates: int, port: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "telemetry_core.demo", "--updates", str(updates), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.times: list[tuple[float, float]] = []  # (arrival, update seconds)
        self.cpu: list[float] = []  # the training thread's CPU clock at each update line
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            m = _UPDATE.match(line.strip())
            if m:
                self.cpu.append(thread_cpu(self.proc.pid).get(self.proc.pid, ("", math.nan))[1])
                self.times.append((time.monotonic(), float(m.group(2))))

    def wait_updates(self, n: int) -> list[float]:
        """The update times of the next ``n`` updates."""
        return self.window(n)[0]

    def window(self, n: int) -> tuple[list[float], float, float, float]:
        """The next ``n`` updates: their times, the training thread's CPU per update, and the CPU
        the trainer's other threads spent meanwhile, all and libzmq's alone (shares of one core)."""
        start = len(self.times)
        cpu0 = self.cpu[-1] if self.cpu else 0.0
        pid = self.proc.pid
        others0, zmq0, t0 = _others(thread_cpu(pid), pid), _libzmq(thread_cpu(pid)), time.monotonic()
        while len(self.times) < start + n:
            if self.proc.poll() is not None:
                raise RuntimeError("the trainer exited:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.02)
        threads, elapsed = thread_cpu(pid), time.monotonic() - t0
        others = (_others(threads, pid) - others0) / elapsed
        libzmq = (_libzmq(threads) - zmq0) / elapsed
        times = [t for _, t in self.times[start : start + n]]
        return times, (self.cpu[start + n - 1] - cpu0) / n, others, libzmq

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of ``pid``: its name and CPU seconds (user + system)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                name, rest = fh.read().split(" (", 1)[1].rsplit(") ", 1)
            fields = rest.split()
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _libzmq(threads: dict[int, tuple[str, float]]) -> float:
    """CPU seconds of libzmq's own threads (I/O and reaper: handshakes, CURVE, TCP)."""
    return sum(cpu for name, cpu in threads.values() if name.startswith("ZMQbg"))


def _others(threads: dict[int, tuple[str, float]], main: int) -> float:
    return sum(cpu for tid, (_, cpu) in threads.items() if tid != main)


def _sock(ctx: zmq.Context, kind: int, info: protocol.ConnectionInfo | None, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    if info is not None:
        protocol.client_curve(sock, info)
    sock.connect(endpoint)
    return sock


def _send_all(sock: zmq.Socket, frames: list[bytes], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            time.sleep(0.001)


def attacks(info: protocol.ConnectionInfo) -> dict[str, Callable[[zmq.Context, threading.Event], None]]:
    def subscription(keyed: bool) -> Callable[[zmq.Context, threading.Event], None]:
        def run(ctx: zmq.Context, stop: threading.Event) -> None:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if keyed:
                protocol.client_curve(sub, info)
            sub.setsockopt(zmq.SUBSCRIBE, b"t" * (10 * 2**20))
            sub.connect(info.pub)
            stop.wait()
            sub.close(linger=0)

        return run

    def parts(ctx: zmq.Context, stop: threading.Event) -> None:
        dealer = _sock(ctx, zmq.DEALER, None, info.cmd)
        _send_all(dealer, [b"x" * 1024] * 300_000, stop)
        stop.wait()
        dealer.close(linger=0)

    def identities(ctx: zmq.Context, stop: threading.Event) -> None:
        socks = [_sock(ctx, zmq.DEALER, None, info.cmd) for _ in range(500)]
        for sock in socks:
            for _ in range(10):
                _send_all(sock, [b"y" * 8192], stop)
        stop.wait()
        for sock in socks:
            sock.close(linger=0)

    def unsigned(keyed: bool, peers: int) -> Callable[[zmq.Context, threading.Event], None]:
        def run(ctx: zmq.Context, stop: threading.Event) -> None:
            socks = [_sock(ctx, zmq.DEALER, info if keyed else None, info.cmd) for _ in range(peers)]
            cmd = protocol.new_command("release", session=info.session)
            env = protocol.encode_envelope("command", cmd, session=info.session, seq=0, step=0)
            i = 0
            while i < 50_000 and not stop.is_set():
                for sock in socks:  # an identity the trainer refused (or not yet admitted) is skipped
                    try:
                        sock.send_multipart([b"", env], flags=zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    i += 1
                    if i % 1000 == 999:
                        time.sleep(0.02)  # ~2,500 commands/s, the rate of the measured attack
                if i == 0:
                    time.sleep(0.01)
            stop.wait()
            for sock in socks:
                sock.close(linger=0)

        return run

    return {
        "no file: 10 MB subscription": subscription(False),
        "no file: one command of 300,000 x 1 KB parts": parts,
        "no file: 500 identities x 10 x 8 KB frames": identities,
        "no file: 50k unsigned commands, one identity": unsigned(False, 1),
        "key holder: 10 MB subscription": subscription(True),
        "key holder: 50k unsigned commands, one identity": unsigned(True, 1),
        "key holder: 50k unsigned commands, 500 identities": unsigned(True, 500),
    }


def dashboard(frames: int) -> None:
    """The dashboard under hostile content: the real app, fed by a fake trainer's PUB socket.

    ``frames`` hostile snapshots (huge ints, NaN, markup, escape sequences, 2 MB strings, 20,000 new
    keys) interleaved with a flood of valid DEBUG snapshots as fast as this process can publish
    them; prints the app's RSS, what it counted and whether it stayed up.
    """
    import asyncio
    import random

    import msgspec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_transport import full_snapshot
    from fuzz_frames import hostile_snapshot

    from simic_tui.app import SimicApp
    from simic_tui.client import TelemetryClient
    from simic_tui.store import TelemetryStore
    from simic_tui.target import resolve_target

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:0")
    address = pub.getsockopt_string(zmq.LAST_ENDPOINT).removeprefix("tcp://")
    base = msgspec.to_builtins(full_snapshot(debug=True))
    debug = full_snapshot(debug=True)
    rng = random.Random(0)
    store = TelemetryStore()
    app = SimicApp(store, client=TelemetryClient(resolve_target(address), store))

    async def run() -> None:
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(0.5)
            rss0 = rss_mb(os.getpid())
            seq = 0
            t0 = time.monotonic()
            for i in range(frames):
                seq += 1
                pub.send_multipart([protocol.TOPIC_SNAPSHOT, hostile_snapshot(rng, seq, base, session="s")])
                for _ in range(10):  # the DEBUG flood
                    seq += 1
                    frame = protocol.encode_envelope("snapshot", debug, session="s", seq=seq, step=seq)
                    pub.send_multipart([protocol.TOPIC_SNAPSHOT, frame])
                if i % 20 == 19:
                    await pilot.press(("d", "t", "r", "question_mark")[i // 20 % 4])
                    await pilot.pause(0.05)
                    await pilot.press("escape")
            await pilot.pause(2.0)
            peak = rss_mb(os.getpid())
            c = store.counters
            print(
                f"dashboard: {frames} hostile + {10 * frames} DEBUG frames in {time.monotonic() - t0:.1f} s; "
                f"RSS {rss0:.0f} -> {peak:.0f} MB; ingested {c.snapshots}, bad frames {c.bad_frames} "
                f"({dict(c.bad_by_code)}), missed {c.missed}, columns {len(store.columns)} "
                f"(dropped values {c.columns_dropped}); app running: {app.is_running}; worker failures "
                f"{app.client.status.worker_failures if app.client else 0}"
            )

    asyncio.run(run())
    pub.close(linger=0)
    ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=3, help="updates per measuring window (3)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of windows per attack (4)")
    parser.add_argument("--only", default="", help="only the attacks whose name contains this")
    parser.add_argument(
        "--dashboard", type=int, metavar="N", help="instead: N hostile frames into the real dashboard"
    )
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # the attacker child
    parser.add_argument("--connection-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dashboard:
        os.environ.setdefault("SIMIC_RUNTIME_DIR", tempfile.mkdtemp(prefix="simic-hostile-"))
        dashboard(args.dashboard)
        return
    if args.attack:
        info = protocol.read_connection_file(args.connection_file)
        attacks(info)[args.attack](zmq.Context(), threading.Event())
        return
    os.environ.setdefault("SIMIC_RUNTIME_DIR", tempfile.mkdtemp(prefix="simic-hostile-"))
    from simic_tui.demo import free_port_pair

    port = free_port_pair()
    n_attacks = 7
    trainer = Trainer(updates=20 + n_attacks * args.pairs * (2 * args.window + 4), port=port)
    try:
        path = None
        deadline = time.monotonic() + 120
        while path is None and time.monotonic() < deadline:
            path = protocol.find_connection_file("127.0.0.1", port)
            time.sleep(0.2)
        assert path is not None, "the trainer wrote no connection file:\n" + "\n".join(trainer.lines)
        info = protocol.read_connection_file(path)
        trainer.wait_updates(4)  # warm-up
        pid = trainer.proc.pid
        rss_start = rss_mb(pid)
        print(f"# hostile peers vs the demo trainer (NORMAL, one torch thread)\n{describe()}")
        print(
            f"measured: the trainer's own update time (wall) and its training thread's CPU time per update "
            f"(/proc), {args.pairs} pairs per attack of {args.window} updates without / with the attacker "
            "(a process of its own, one update to get going first); other threads: the trainer's "
            "publisher and libzmq threads, share of a core (libzmq's I/O and reaper threads alone in "
            "brackets); RSS from /proc 3 s after the attacker left"
        )
        print(
            "| attack | update without → with (wall, medians) | ratio wall, median (IQR) | ratio training-thread "
            "CPU, median (IQR) | other threads (libzmq's) without → with | RSS change 3 s after |"
        )
        print("|---|---|---|---|---|---|")
        for name in [n for n in attacks(info) if args.only in n]:
            rss0 = rss_mb(pid)
            walls: list[tuple[float, float]] = []
            cpus: list[tuple[float, float]] = []
            others: list[tuple[float, float]] = []
            libzmq: list[tuple[float, float]] = []
            for pair in range(args.pairs):
                got: dict[bool, tuple[list[float], float, float, float]] = {}
                for attacked in (False, True) if pair % 2 == 0 else (True, False):
                    if not attacked:
                        got[False] = trainer.window(args.window)
                        continue
                    # The attacker is a process of its own (its queues are its memory, and libzmq may
                    # crash tearing down a refused 10 MB subscription); killed when its window ends.
                    attacker = subprocess.Popen(
                        [sys.executable, __file__, "--attack", name, "--connection-file", str(path)], cwd=ROOT
                    )
                    trainer.wait_updates(1)
                    got[True] = trainer.window(args.window)
                    attacker.kill()
                    attacker.wait()
                    time.sleep(1.0)
                (t0, c0, o0, z0), (t1, c1, o1, z1) = got[False], got[True]
                walls.append((statistics.median(t0), statistics.median(t1)))
                cpus.append((c0, c1))
                others.append((o0, o1))
                libzmq.append((z0, z1))
            time.sleep(2.0)
            rss2 = rss_mb(pid)
            wall_q = quartiles([b / a for a, b in walls])
            cpu_q = quartiles([b / a for a, b in cpus if a > 0])
            print(
                f"| {name} | {statistics.median(a for a, _ in walls):.3f} → "
                f"{statistics.median(b for _, b in walls):.3f} s | {wall_q[1]:.2f}× ({wall_q[0]:.2f}–{wall_q[2]:.2f}) "
                f"| {cpu_q[1]:.2f}× ({cpu_q[0]:.2f}–{cpu_q[2]:.2f}) | "
                f"{100 * statistics.median(a for a, _ in others):.1f} ({100 * statistics.median(a for a, _ in libzmq):.1f}) → "
                f"{100 * statistics.median(b for _, b in others):.1f} ({100 * statistics.median(b for _, b in libzmq):.1f}) % "
                f"| {rss2 - rss0:+.0f} MB |",
                flush=True,
            )
        print(f"trainer RSS {rss_start:.0f} MB at the start, {rss_mb(pid):.0f} MB at the end")
    finally:
        trainer.stop()


if __name__ == "__main__":
    main()
