"""Hostile peers against the trainer's ports, over real sockets: short versions of each attack.

A peer without the connection file must never complete a handshake (so none of its bytes are
buffered by the trainer), and what a peer holding the file can cost is capped: message sizes on
both ports, the number of connections, and the CPU the publisher thread spends on what it reads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from telemetry_core import protocol
from telemetry_core.transport import Publisher

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE"),
]


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


@pytest.fixture(name="make")
def make_fixture() -> Any:
    made: list[Publisher] = []

    def factory(**kw: Any) -> Publisher:
        pub = Publisher("tcp://127.0.0.1:0", heartbeat_interval=0.05, **kw).start()
        made.append(pub)
        assert pub.network
        return pub

    yield factory
    for pub in made:
        pub.close()


@pytest.fixture(name="ctx")
def ctx_fixture() -> Any:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def authenticated(ctx: zmq.Context, kind: int, info: protocol.ConnectionInfo) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    protocol.client_curve(sock, info)
    return sock


def heard(sock: zmq.Socket, timeout: float = 3.0) -> bool:
    """The socket received a frame (a heartbeat comes every 50 ms)."""
    return bool(sock.poll(int(timeout * 1000)))


def thread_cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


ATTACK = """
import os, sys, time, zmq
pub, cmd, server, topic_mb, parts, keyed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ctx = zmq.Context()
def curve(sock):
    if keyed != "-":  # the connection file's keys (an authenticated peer)
        client_public, client_secret = keyed.split(",")
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server.encode(), client_public.encode(), client_secret.encode()
    elif server != "-":  # CURVE with keys of its own: knows the server key, not on the allow-list
        sock.curve_serverkey = server.encode()
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
socks = []
for kind in ("plain", "curve"):
    sub = ctx.socket(zmq.SUB)
    if kind == "curve":
        curve(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"t" * (topic_mb * 2**20))
    sub.connect(pub)
    socks.append(sub)
    dealer = ctx.socket(zmq.DEALER)
    if kind == "curve":
        curve(dealer)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.connect(cmd)
    try:  # a refused handshake tears the pipe down: then sending fails at once, which is fine
        dealer.send_multipart([b"x" * 1024] * parts, flags=zmq.NOBLOCK)
        for _ in range(2000):
            dealer.send_multipart([b"", b"junk"], flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    socks.append(dealer)
time.sleep(2.0)
print(sum(bool(s.poll(200)) for s in socks if s.socket_type == zmq.SUB), flush=True)
os._exit(0)  # megabytes still queued: skip the context's teardown
"""


def attack(info: protocol.ConnectionInfo, *, topic_mb: int, parts: int, keyed: bool) -> int:
    """Run the attacker in its own process (its queues are its memory); returns SUBs that heard."""
    keys = f"{info.curve_client_public},{info.curve_client_secret}" if keyed else "-"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            ATTACK,
            info.pub,
            info.cmd,
            info.curve_server_public or "-",
            str(topic_mb),
            str(parts),
            keys,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_a_peer_without_the_file_never_completes_a_handshake_on_either_port(make: Any, ctx: Any) -> None:
    """10 MB subscriptions, a 20,000 x 1 KB command and 2,000 unsigned commands, plaintext and with
    a CURVE key of its own: nothing is read, nothing is buffered, the real dashboard still gets in."""
    pub = make()
    info = pub.connection_info
    before = rss_bytes()
    assert attack(info, topic_mb=10, parts=20_000, keyed=False) == 0
    assert wait_for(lambda: pub.counters.handshake_failures >= 4)
    counters = pub.counters
    assert counters.commands_rejected == 0 and counters.commands_accepted == 0, "nothing was read"
    assert rss_bytes() - before < 16 * 2**20, "the trainer buffered the attacker's bytes"
    sub = authenticated(ctx, zmq.SUB, info)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(info.pub)
    assert heard(sub)


def test_an_authenticated_peer_cannot_make_the_trainer_hold_a_huge_subscription(make: Any, ctx: Any) -> None:
    """MAXMSGSIZE on the PUB socket: a 10 MB subscription gets its peer disconnected, not stored."""
    pub = make()
    info = pub.connection_info
    before = rss_bytes()
    assert attack(info, topic_mb=10, parts=10, keyed=True) == 0
    assert rss_bytes() - before < 16 * 2**20
    fine = authenticated(ctx, zmq.SUB, info)
    fine.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_HEARTBEAT)
    fine.connect(info.pub)
    assert heard(fine)


def test_authenticated_connections_beyond_max_peers_are_refused_and_counted(make: Any, ctx: Any) -> None:
    pub = make(max_peers=4)
    info = pub.connection_info
    subs = []
    for _ in range(7):
        sub = authenticated(ctx, zmq.SUB, info)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(info.pub)
        subs.append(sub)
    served = sum(heard(s, 1.5) for s in subs)
    assert served == 4, served
    # At least once each (libzmq sometimes reconnects a refused peer, which is refused again).
    assert pub.counters.connections_refused.get("too many connections", 0) >= 3
    assert pub.counters.peers == 4
    # The count follows peers that leave: their places are free again.
    for sub in subs:
        sub.close(linger=0)
    assert wait_for(lambda: pub.counters.peers == 0), pub.counters.peers
    late = authenticated(ctx, zmq.SUB, info)
    late.setsockopt(zmq.SUBSCRIBE, b"")
    late.connect(info.pub)
    assert heard(late)
    assert wait_for(lambda: pub.counters.peers == 1)


def test_connections_that_never_authenticate_do_not_use_up_the_peer_cap(make: Any, ctx: Any) -> None:
    """Idle TCP connections (a slow handshake) and plaintext peers hold no place: a dashboard with
    the file still gets in while dozens of them are open."""
    pub = make(max_peers=2)
    info = pub.connection_info
    host, port = info.pub.removeprefix("tcp://").rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]
    plain = []
    for _ in range(20):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(info.cmd)
        plain.append(dealer)
    assert wait_for(lambda: pub.counters.handshake_failures >= 20)
    sub = authenticated(ctx, zmq.SUB, info)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(info.pub)
    assert heard(sub)
    assert pub.counters.peers == 1 and "too many connections" not in pub.counters.connections_refused
    for conn in idle:
        conn.close()


def test_handshakes_beyond_the_rate_are_refused_at_once_and_counted(make: Any, ctx: Any) -> None:
    pub = make(handshake_rate=1.0, handshake_burst=3)
    info = pub.connection_info
    t0 = time.monotonic()
    subs = []
    for _ in range(8):
        sub = authenticated(ctx, zmq.SUB, info)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(info.pub)
        subs.append(sub)
    assert wait_for(lambda: pub.counters.connections_refused.get("handshake rate", 0) >= 3)
    # 3 at once, then one a second (a refused peer is sometimes reconnected by libzmq, and then
    # granted once the bucket holds a token again).
    assert wait_for(lambda: pub.counters.peers >= 3)  # their success events may come a little later
    assert pub.counters.peers <= 3 + (time.monotonic() - t0) + 1
    assert "too many connections" not in pub.counters.connections_refused


KEYED_FLOOD = """
import os, sys, time, zmq
cmd, server, public, secret, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ctx = zmq.Context()
socks = []
for _ in range(n):  # identities of a peer that holds the connection file
    d = ctx.socket(zmq.DEALER)
    d.curve_serverkey, d.curve_publickey, d.curve_secretkey = server.encode(), public.encode(), secret.encode()
    d.setsockopt(zmq.SNDHWM, 0)
    d.connect(cmd)
    socks.append(d)
deadline = time.monotonic() + 2.5
while time.monotonic() < deadline:  # unsigned commands from every identity that got in
    for d in socks:
        try:
            d.send_multipart([b"", os.urandom(200)], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
    time.sleep(0.005)
print("done", flush=True)
os._exit(0)
"""


def test_a_key_holder_flooding_from_many_identities_is_capped_and_leaves_little(make: Any) -> None:
    """300 identities with the file's keys: beyond the cap and the handshake rate each is refused at
    once (libzmq does not retry a refused handshake), nothing waits holding buffers, and the peer
    count and memory come back when the attacker leaves."""
    pub = make(max_peers=8)
    info = pub.connection_info
    thread = pub._thread
    assert thread is not None
    before = rss_bytes()
    cpu0, t0 = thread_cpu(thread), time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            KEYED_FLOOD,
            info.cmd,
            info.curve_server_public or "",
            info.curve_client_public or "",
            info.curve_client_secret or "",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    spent, elapsed = thread_cpu(thread) - cpu0, time.monotonic() - t0
    counters = pub.counters
    refused = counters.connections_refused
    assert refused.get("too many connections", 0) + refused.get("handshake rate", 0) >= 250, refused
    assert counters.commands_rejected > 0  # the admitted identities were read, and refused
    # the departed peers' backlog is read within the budget before libzmq sees them go: generous
    assert wait_for(lambda: pub.counters.peers == 0, 45.0), pub.counters.peers
    assert rss_bytes() - before < 16 * 2**20
    # Handshakes, monitor events and the refused commands all count against the 2 % budget; the
    # thread's own cadence (heartbeats twenty a second here) comes on top. Generous: 15 %.
    assert spent <= 0.15 * elapsed + 0.05, (spent, elapsed)


def test_a_signed_in_flood_costs_the_publisher_thread_at_most_its_cpu_budget(make: Any, ctx: Any) -> None:
    share = 0.02  # the default
    # At full priority, so the budget is what stops the thread (at its default lower priority the
    # flooding test thread can leave it less CPU than the budget, and nothing would be shown).
    pub = make(
        command_cpu_share=share,
        read_rate=1e9,
        read_burst=10**9,
        command_rate=1e9,
        command_burst=10**9,
        thread_nice=0,
    )
    info = pub.connection_info
    flooder = authenticated(ctx, zmq.DEALER, info)
    flooder.setsockopt(zmq.SNDHWM, 0)
    flooder.connect(info.cmd)
    live = authenticated(ctx, zmq.SUB, info)
    live.setsockopt(zmq.SUBSCRIBE, b"")
    live.connect(info.pub)
    assert heard(live)
    thread = pub._thread
    assert thread is not None
    cpu0, t0 = thread_cpu(thread), time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 2.0:
        for _ in range(500):
            flooder.send_multipart([b"", os.urandom(200)], flags=zmq.NOBLOCK)  # unsigned, for an answer
            sent += 1
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    spent = thread_cpu(thread) - cpu0
    refused = pub.counters.rejected.get("unsigned", 0)
    assert refused < sent, "the flood was read in full"
    # The budget and its burst, plus only what is the thread's own work: heartbeats (twenty a
    # second here) and the turns the clock wakes it for (0.5-1 % of a core measured). Polling,
    # reading, refusing and answering the flood are all charged to the budget.
    assert spent <= share * elapsed + 2.5 * share + 0.03 * elapsed, (spent, elapsed, refused)
    assert pub.counters.read_pauses >= 1
    live.recv_multipart()  # the stream kept flowing meanwhile
    assert heard(live)


def _nice(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[16])  # field 19 of stat: nice


def _zmq_threads() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as fh:
            if fh.read().startswith("ZMQbg"):
                out.add(int(tid))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_publisher_and_its_libzmq_threads_run_below_the_training_thread(make: Any) -> None:
    before = _zmq_threads()
    pub = make()
    ours = _zmq_threads() - before  # the I/O and reaper threads of the publisher's context
    assert pub._thread is not None and pub._thread.native_id is not None
    base = _nice(threading.get_native_id())
    assert _nice(pub._thread.native_id) == min(19, base + 10)
    assert ours and all(_nice(tid) == min(19, base + 10) for tid in ours), {t: _nice(t) for t in ours}
    assert _nice(threading.get_native_id()) == base  # the caller's own priority is untouched
    plain = make(thread_nice=0)
    assert plain._thread is not None and _nice(plain._thread.native_id) == base  # type: ignore[arg-type]


def test_every_refusal_code_is_documented_and_command_limits_equal_the_hubs(make: Any) -> None:
    from telemetry_core.transport import REJECT_CODES

    pub = make()
    # Every code either side can answer with is documented.
    for code in ("bad_value", "no_lease", "busy", "bad_argument", "rate_limited", "wrong_session"):
        assert code in REJECT_CODES
    assert protocol.MAX_LEASE_UPDATES == 100_000 and protocol.MAX_PROFILE_UPDATES == 100
    assert pub.counters.peers == 0


def test_wrong_session_names_the_session_that_does_not_match(make: Any, ctx: Any) -> None:
    pub = make()
    info = pub.connection_info
    dealer = authenticated(ctx, zmq.DEALER, info)
    dealer.connect(info.cmd)
    command = protocol.new_command("release", session=pub.session)  # right inside, wrong outside
    env = protocol.encode_envelope("command", command, session="0ther5e55ion", seq=0, step=0)
    dealer.send_multipart([protocol.sign(info.key_bytes, env), env])
    assert dealer.poll(5000)
    mac, frame = dealer.recv_multipart()
    assert protocol.verify(info.key_bytes, mac, frame)
    nack = protocol.decode_body(protocol.decode_envelope(frame))
    assert nack.code == "wrong_session" and "0ther5e55ion" in nack.reason
    assert nack.reason.count(pub.session) == 1, nack.reason
