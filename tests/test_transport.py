"""The publisher over real ZeroMQ sockets on loopback, talking to a real SUB + DEALER dashboard.

The ``Dashboard`` here speaks only :mod:`telemetry_core.protocol` (what ``simic_tui/client.py``
does), so these tests pin the wire contract from the outside. Fault cases live in
``test_transport_faults.py``; fuzzing in ``test_fuzz_frames.py``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_transport import full_snapshot  # noqa: E402

from telemetry_core import protocol  # noqa: E402
from telemetry_core.schema import (  # noqa: E402
    Ack,
    Command,
    Counters,
    Envelope,
    Heartbeat,
    History,
    Nack,
    Snapshot,
)
from telemetry_core.transport import (  # noqa: E402
    Endpoints,
    Publisher,
    PublisherCounters,
    TokenBucket,
    is_loopback,
)

FAST = {"heartbeat_interval": 0.05}  # subscriptions are proven by the first heartbeat


class Dashboard:
    """A real SUB + DEALER client built on protocol.py only."""

    def __init__(
        self,
        info: protocol.ConnectionInfo,
        *,
        curve: tuple[bytes, bytes] | bool | None = None,
        connect_sub: bool = True,
        rcvhwm: int = 100000,
    ) -> None:
        self.ctx = zmq.Context()
        self.key = info.key_bytes
        self.session = info.session
        self.info = info
        self.sub = self.ctx.socket(zmq.SUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        if curve is None:  # what a dashboard does: the connection file's keys when it has them
            curve = bool(info.curve_server_public)
        for sock in (self.sub, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                public, secret = (
                    curve
                    if isinstance(curve, tuple)
                    else (info.curve_client_public.encode(), info.curve_client_secret.encode())  # type: ignore[union-attr]
                )
                sock.setsockopt(zmq.CURVE_SERVERKEY, info.curve_server_public.encode())  # type: ignore[union-attr]
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        self.dealer.setsockopt(zmq.SNDTIMEO, 3000)  # a refused connection fails the test, never hangs it
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        if connect_sub:
            self.sub.connect(info.pub)
        self.dealer.connect(info.cmd)

    # -- stream ------------------------------------------------------------------------------
    def recv(self, timeout: float = 2.0) -> tuple[bytes, Envelope, Any] | None:
        if not self.sub.poll(int(timeout * 1000)):
            return None
        topic, frame = self.sub.recv_multipart()
        env = protocol.decode_envelope(frame)
        return topic, env, protocol.decode_body(env)

    def wait_heartbeat(self, timeout: float = 5.0) -> tuple[Envelope, Heartbeat]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(0.2)
            if got is not None and got[0] == protocol.TOPIC_HEARTBEAT:
                return got[1], got[2]
        raise AssertionError("no heartbeat arrived")

    def snapshots(self, n: int, timeout: float = 5.0) -> list[tuple[Envelope, Snapshot, bytes]]:
        out: list[tuple[Envelope, Snapshot, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            if not self.sub.poll(100):
                continue
            topic, frame = self.sub.recv_multipart()
            if topic == protocol.TOPIC_SNAPSHOT:
                env = protocol.decode_envelope(frame)
                out.append((env, protocol.decode_body(env), frame))
        return out

    def drain_until_seq(self, seq: int, timeout: float = 5.0) -> list[int]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(0.1)
            if got is not None and got[0] == protocol.TOPIC_SNAPSHOT:
                seen.append(got[1].seq)
                if got[1].seq >= seq:
                    break
        return seen

    # -- commands ------------------------------------------------------------------------------
    def envelope(self, command: Command, *, session: str | None = None) -> bytes:
        return protocol.encode_envelope("command", command, session=session or self.session, seq=0, step=0)

    def send(self, command: Command, *, key: bytes | None = None, session: str | None = None) -> bytes:
        env = self.envelope(command, session=session)
        self.dealer.send_multipart([protocol.sign(key or self.key, env), env])
        return env

    def command(self, action: str, **fields: Any) -> Command:
        return protocol.new_command(action, session=self.session, client="test", **fields)

    def reply(self, timeout: float = 2.0) -> tuple[bytes, Envelope, Any] | None:
        if not self.dealer.poll(int(timeout * 1000)):
            return None
        mac, frame = self.dealer.recv_multipart()
        env = protocol.decode_envelope(frame)
        return mac, env, protocol.decode_body(env)

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)
        self.ctx.term()


def verified_reply(dash: Dashboard, timeout: float = 2.0) -> tuple[Envelope, Any]:
    """The next reply, checked to be signed with the connection file's key."""
    assert dash.dealer.poll(int(timeout * 1000)), "no reply"
    mac, frame = dash.dealer.recv_multipart()
    assert protocol.verify(dash.key, mac, frame), "reply not signed with the session key"
    env = protocol.decode_envelope(frame)
    return env, protocol.decode_body(env)


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


def finishes(fn: Any, timeout: float = 60.0) -> bool:
    """Run ``fn`` in a thread; True if it returned within ``timeout`` (a blocked call never does).

    The bound is generous on purpose: tests assert that a call does not block, never how fast it
    is, so a loaded machine cannot fail them.
    """
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def wire(struct: msgspec.Struct) -> bytes:
    """Equality through the encoding (NaN-safe)."""
    return msgspec.msgpack.encode(struct)


@pytest.fixture(autouse=True, name="runtime_dir")
def runtime_dir_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(name="make")
def make_fixture() -> Any:
    """Publisher factory on ephemeral loopback ports; everything is closed at teardown."""
    made: list[Any] = []

    def factory(bind: str | None = "tcp://127.0.0.1:0", **kw: Any) -> Publisher:
        pub = Publisher(bind, **{**FAST, **kw})
        made.append(pub)
        return pub.start()

    yield factory
    for obj in made:
        obj.close()


@pytest.fixture(name="dashboards")
def dashboards_fixture() -> Any:
    made: list[Dashboard] = []

    def factory(info: protocol.ConnectionInfo, **kw: Any) -> Dashboard:
        dash = Dashboard(info, **kw)
        made.append(dash)
        return dash

    yield factory
    for dash in made:
        dash.close()


# ------------------------------------------------------------------------------------------------
# Snapshots and heartbeats
# ------------------------------------------------------------------------------------------------


def test_snapshots_arrive_in_order_exactly_as_encoded(make: Any, dashboards: Any) -> None:
    pub = make(run_name="order")
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    sent = []
    for step in range(20):
        snap = full_snapshot(step, debug=step % 5 == 0)
        sent.append((snap, pub.publish_snapshot(snap)))
    got = dash.snapshots(20)
    assert [env.seq for env, _, _ in got] == list(range(1, 21))
    for (env, snap, frame), (orig, returned) in zip(got, sent):
        assert env.session == pub.session
        assert env.step == orig.step
        assert frame == returned  # the hub hands exactly these bytes to the recorder
        assert wire(snap) == wire(orig)
    assert wait_for(lambda: pub.counters.published == 20)  # counted just after the send
    assert pub.counters.dropped == 0


def test_hand_off_encodes_on_the_publisher_thread_and_feeds_on_frame_in_order(
    make: Any, dashboards: Any
) -> None:
    pub = make(run_name="hand-off")
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    recorded: list[tuple[bytes, str]] = []
    snaps = [full_snapshot(step, debug=step % 4 == 0) for step in range(12)]
    seqs = [
        pub.hand_off_snapshot(s, lambda f: recorded.append((f, threading.current_thread().name)))
        for s in snaps
    ]
    assert seqs == list(range(1, 13)) and pub.seq == 12
    got = dash.snapshots(12)
    assert [env.seq for env, _, _ in got] == seqs
    assert wait_for(lambda: len(recorded) == 12)
    assert {name for _, name in recorded} == {"simic-publisher"}  # the encode left the caller
    for (env, snap, frame), orig, (rec, _) in zip(got, snaps, recorded):
        assert rec == frame  # the recorder gets exactly the bytes that went out
        assert env.step == orig.step and env.wall_time == orig.wall_time
        assert wire(snap) == wire(orig)
    # the old path, publish_snapshot, encodes on the caller and its frame is the same encoding
    frame = pub.publish_snapshot(snaps[0])
    env = protocol.decode_envelope(frame)
    assert env.seq == 13 and wire(protocol.decode_body(env)) == wire(snaps[0])


def test_hand_off_keeps_every_frame_for_on_frame_when_the_stream_loses_it(make: Any) -> None:
    """Stream off, queue overflow and close: the stream drops (counted), on_frame still gets every frame."""
    off = make(None)
    got: list[bytes] = []
    assert off.hand_off_snapshot(full_snapshot(1), got.append) == 1
    assert len(got) == 1 and protocol.decode_envelope(got[0]).seq == 1 and off.counters.unsent == 1

    pub = make(queue_size=3, wake_interval=5.0, heartbeat_interval=5.0)  # the thread does not look meanwhile
    got = []
    for step in range(8):
        pub.hand_off_snapshot(full_snapshot(step), got.append)
    assert pub.queued == 3 and pub.counters.dropped == 5
    assert [protocol.decode_envelope(f).seq for f in got] == [1, 2, 3, 4, 5]  # the dropped ones, encoded here
    pub.close()  # drains what is queued before it stops
    assert sorted(protocol.decode_envelope(f).seq for f in got) == list(range(1, 9))
    assert pub.counters.published + pub.counters.dropped == 8
    after: list[bytes] = []
    pub.hand_off_snapshot(full_snapshot(9), after.append)  # closed: encoded here, counted unsent
    assert protocol.decode_envelope(after[0]).seq == 9 and pub.counters.unsent == 1


def test_fill_counters_matches_to_schema(make: Any, dashboards: Any) -> None:
    pub = make()
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    for step in range(3):
        pub.hand_off_snapshot(full_snapshot(step))
    dash.dealer.send_multipart([b"", b"junk"])  # an unsigned refusal, counted by the gate
    assert wait_for(lambda: pub.counters.published == 3 and pub.counters.commands_rejected == 1)
    base = Counters(records_written=4)
    expected = pub.counters.to_schema(base)
    assert pub.fill_counters(base) is base
    assert wire(base) == wire(expected) and base.snapshots_published == 3 and base.records_written == 4


def test_heartbeat_reports_status_and_last_seq(make: Any, dashboards: Any) -> None:
    pub = make(run_name="hb-run")
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    for step in range(3):
        pub.publish_snapshot(full_snapshot(step))
    assert len(dash.snapshots(3)) == 3
    pub.set_status(41, "DEBUG", Counters(records_written=7, telemetry_errors=2))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        env, hb = dash.wait_heartbeat()
        if hb.step == 41:
            break
    assert env.kind == "heartbeat" and env.seq == 3 and env.step == 41
    assert hb.level == "DEBUG" and hb.run_name == "hb-run" and hb.uptime > 0
    assert hb.counters.records_written == 7 and hb.counters.telemetry_errors == 2
    assert hb.counters.snapshots_published == 3
    pub.set_status(42, "NORMAL")  # without counters: the hub's last counters are kept
    while hb.step != 42:
        _, hb = dash.wait_heartbeat()
    assert hb.level == "NORMAL" and hb.counters.records_written == 7


def test_heartbeats_flow_without_snapshots(make: Any, dashboards: Any) -> None:
    pub = make(heartbeat_interval=0.05)
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    for _ in range(5):  # each wait fails the test if no heartbeat comes
        dash.wait_heartbeat()
    assert pub.counters.heartbeats >= 5 and pub.counters.published == 0


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "fields"),
    [
        ("lease_debug", {"updates": 50, "lease_seconds": 30.0}),
        ("renew", {"updates": 50}),
        ("release", {}),
        ("set_level", {"level": "minimal"}),
        ("profile", {"profile_updates": 3}),
    ],
)
def test_signed_command_reaches_the_hub_and_ack_comes_back_signed(
    make: Any, dashboards: Any, action: str, fields: dict[str, Any]
) -> None:
    pub = make()
    dash = dashboards(pub.connection_info)
    cmd = dash.command(action, **fields)
    dash.send(cmd)
    assert wait_for(lambda: pub.counters.commands_accepted == 1)
    (peer, got), *rest = pub.poll_commands()
    assert not rest
    assert wire(got) == wire(cmd)
    pub.reply(peer, Ack(command_id=cmd.id, action=action, effective_step=12, message="ok"))
    env, ack = verified_reply(dash)
    assert env.kind == "ack" and env.session == pub.session
    assert isinstance(ack, Ack) and ack.command_id == cmd.id and ack.effective_step == 12
    pub.reply(peer, Nack(command_id=cmd.id, reason="not now", code="hub_refused"))
    env, nack = verified_reply(dash)
    assert isinstance(nack, Nack) and nack.code == "hub_refused"
    assert pub.poll_commands() == []


def test_commands_from_two_dashboards_are_answered_to_the_right_one(make: Any, dashboards: Any) -> None:
    pub = make()
    a, b = dashboards(pub.connection_info), dashboards(pub.connection_info)
    ca, cb = a.command("release"), b.command("release")
    a.send(ca)
    b.send(cb)
    assert wait_for(lambda: pub.counters.commands_accepted == 2)
    for peer, cmd in pub.poll_commands():
        pub.reply(peer, Ack(command_id=cmd.id, action=cmd.action))
    assert verified_reply(a)[1].command_id == ca.id
    assert verified_reply(b)[1].command_id == cb.id


def test_extra_fields_in_a_command_are_ignored(make: Any, dashboards: Any) -> None:
    """A newer dashboard may add fields (schema minor): they are ignored, not refused."""
    pub = make()
    dash = dashboards(pub.connection_info)
    cmd = msgspec.structs.asdict(dash.command("release"))
    body = msgspec.msgpack.encode({**cmd, "colour": "blue", "priority": 3})
    env = msgspec.msgpack.encode(
        {
            "magic": "SIMIC",
            "major": 1,
            "minor": 9,
            "session": pub.session,
            "seq": 0,
            "step": 0,
            "wall_time": time.time(),
            "kind": "command",
            "body": msgspec.Raw(body),
            "future_field": [1, 2],
        }
    )
    dash.dealer.send_multipart([protocol.sign(dash.key, env), env])
    assert wait_for(lambda: pub.counters.commands_accepted == 1)
    assert pub.poll_commands()[0][1].id == cmd["id"]


# ------------------------------------------------------------------------------------------------
# History backfill
# ------------------------------------------------------------------------------------------------


def _history(dash: Dashboard, **fields: Any) -> list[History]:
    cmd = dash.command("history", **fields)
    dash.send(cmd)
    chunks: list[History] = []
    while True:
        env, body = verified_reply(dash)
        assert env.kind == "history" and isinstance(body, History), body
        assert body.command_id == cmd.id
        chunks.append(body)
        if body.chunk == body.chunks - 1:
            return chunks


def test_history_backfills_a_late_joiner_without_gaps(make: Any, dashboards: Any) -> None:
    """Clone pattern: subscribe first, then ask for history, drop what is older."""
    pub = make()
    for step in range(30):  # nobody is listening yet
        pub.publish_snapshot(full_snapshot(step))
    assert wait_for(lambda: pub.counters.published == 30)
    dash = dashboards(pub.connection_info)
    dash.wait_heartbeat()
    stop = threading.Event()

    def training() -> None:
        step = 30
        while not stop.is_set():
            pub.publish_snapshot(full_snapshot(step))
            step += 1
            time.sleep(0.002)

    trainer = threading.Thread(target=training)
    trainer.start()
    try:
        time.sleep(0.05)
        chunks = _history(dash)
        time.sleep(0.05)
    finally:
        stop.set()
        trainer.join()
    live = dash.drain_until_seq(pub.seq)
    history_seqs = [protocol.decode_envelope(f).seq for c in chunks for f in c.frames]
    merged = sorted(set(history_seqs) | set(live))
    assert merged == list(range(1, pub.seq + 1)), "backfill + live stream must leave no gap"
    assert history_seqs[:30] == list(range(1, 31))
    assert chunks[-1].latest_seq == history_seqs[-1]


def test_history_since_seq_limit_and_chunks(make: Any, dashboards: Any) -> None:
    pub = make(history=25, history_chunk_bytes=16 * 1024)
    for step in range(40):
        pub.publish_snapshot(full_snapshot(step))
    assert wait_for(lambda: pub.counters.published == 40)
    dash = dashboards(pub.connection_info)
    chunks = _history(dash)
    frames = [f for c in chunks for f in c.frames]
    assert [protocol.decode_envelope(f).seq for f in frames] == list(range(16, 41))
    assert len(chunks) > 5 and [c.chunk for c in chunks] == list(range(len(chunks)))
    assert all(sum(map(len, c.frames)) <= 16 * 1024 + 8192 for c in chunks)
    assert chunks[0].oldest_seq == 16 and chunks[-1].newest_seq == 40
    time.sleep(0.6)  # a history reply costs 10 tokens of the peer's bucket
    recent = _history(dash, since_seq=37)
    assert [protocol.decode_envelope(f).seq for c in recent for f in c.frames] == [38, 39, 40]
    time.sleep(0.6)
    none = _history(dash, since_seq=40)
    assert len(none) == 1 and none[0].frames == [] and none[0].latest_seq == 40
    assert wait_for(lambda: pub.counters.history_frames == 25 + 3)


def test_history_respects_its_byte_cap(make: Any, dashboards: Any) -> None:
    frame_len = len(protocol.encode_envelope("snapshot", full_snapshot(0), session="x" * 16, seq=1, step=0))
    pub = make(history=1000, history_bytes=10 * frame_len)
    for step in range(30):
        pub.publish_snapshot(full_snapshot(step))
    assert wait_for(lambda: pub.counters.published == 30)
    frames = [f for c in _history(dashboards(pub.connection_info)) for f in c.frames]
    assert 8 <= len(frames) <= 10
    assert protocol.decode_envelope(frames[-1]).seq == 30


# ------------------------------------------------------------------------------------------------
# Connection files, endpoints, lifecycle
# ------------------------------------------------------------------------------------------------


def test_connection_file_is_private_complete_and_removed_on_close(make: Any, runtime_dir: Path) -> None:
    pub = make(run_name="conn")
    path = pub.connection_path
    assert path == protocol.connection_path(pub.endpoints.pub)
    assert path.parent.parent == runtime_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = protocol.read_connection_file(path)
    assert (info.pub, info.cmd) == tuple(pub.endpoints)
    assert info.session == pub.session and info.run_name == "conn" and info.pid == os.getpid()
    assert len(info.key_bytes) == 32 and info.curve_server_public and info.curve_client_secret
    port = int(pub.endpoints.pub.rsplit(":", 1)[1])
    assert protocol.find_connection_file("localhost", port) == path
    pub.close()
    assert not path.exists()


def test_connection_file_options(make: Any, tmp_path: Path, runtime_dir: Path) -> None:
    custom = tmp_path / "copied.json"
    pub = make(connection_file=custom)
    assert pub.connection_path == custom and custom.exists()
    assert protocol.read_connection_file(custom).session == pub.session
    pub.close()
    assert not custom.exists()
    quiet = make(connection_file=False)
    assert quiet.connection_path is None and quiet.connection_info is not None
    assert list((runtime_dir / "simic-tui").glob("*.json")) == []


def test_close_leaves_a_newer_trainers_connection_file_alone(make: Any) -> None:
    pub = make()
    path = pub.connection_path
    data = json.loads(path.read_text())
    data["session"] = "someone-else"
    path.write_text(json.dumps(data))
    pub.close()
    assert path.exists()


def test_bind_none_encodes_and_counts_but_never_opens_a_socket(make: Any) -> None:
    pub = make(None)
    snap = full_snapshot(3)
    frame = pub.publish_snapshot(snap)
    env = protocol.decode_envelope(frame)
    assert env.seq == 1 and env.session == pub.session
    assert wire(protocol.decode_body(env)) == wire(snap)
    assert pub.endpoints is None and pub.connection_info is None and not pub.network
    assert pub.counters.unsent == 1 and pub.counters.published == 0
    assert pub.poll_commands() == []
    assert pub._thread is None


def test_default_command_port_is_pub_port_plus_one(make: Any) -> None:
    import socket

    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        pub = make(f"tcp://127.0.0.1:{port}")
        if pub.network:
            assert pub.endpoints == Endpoints(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}")
            return
    pytest.skip("no free pair of adjacent ports")


def test_explicit_command_endpoint(make: Any) -> None:
    pub = make("tcp://127.0.0.1:0", cmd_bind="tcp://127.0.0.1:0")
    assert pub.endpoints.pub != pub.endpoints.cmd


def test_context_manager_and_idempotent_close() -> None:
    with Publisher("tcp://127.0.0.1:0", **FAST) as pub:
        assert pub.network
        path = pub.connection_path
    assert not pub.network and not path.exists()
    pub.close()
    pub.start()  # closed stays closed
    assert not pub.network
    assert pub.publish_snapshot(full_snapshot(1))  # still encodes (for a recorder), counted
    assert pub.counters.unsent == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bind": "127.0.0.1:5555"}, "tcp://"),
        ({"bind": "ipc:///tmp/x"}, "tcp://"),
        ({"bind": "tcp://127.0.0.1:http"}, "not a number"),
        ({"bind": "tcp://127.0.0.1:70000"}, "0-65535"),
        ({"bind": "tcp://:5555"}, "host"),
        ({"bind": "tcp://127.0.0.1:65535"}, "cmd_bind"),
        ({"queue_size": 0}, "queue_size"),
        ({"history": -1}, "history"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"command_rate": float("nan")}, "command_rate"),
        ({"curve": False, "curve_allow": [b"x" * 40]}, "curve_allow"),
        ({"curve": True, "curve_allow": [b"short"]}, "z85"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    bind = kwargs.pop("bind", "tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match=message):
        Publisher(bind, **kwargs)


def test_reply_needs_an_ack_or_nack(make: Any) -> None:
    pub = make()
    with pytest.raises(TypeError, match="Ack or a Nack"):
        pub.reply(b"peer", "ok")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("*", False),
        ("192.168.1.4", False),
        ("example.org", False),
        ("eth0", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) and not bucket.take(0.1)
    assert bucket.take(100.0, cost=3.0) and not bucket.take(100.0)
    assert not bucket.take(100.0, cost=4.0)


def test_counters_to_schema_keeps_the_hubs_fields() -> None:
    counters = PublisherCounters(
        published=5, dropped=2, commands_accepted=3, rejected={"unsigned": 2, "expired": 1, "malformed": 4}
    )
    assert counters.commands_rejected == 7 and counters.bad_frames == 6
    base = Counters(records_written=11, inputs_skipped=1, snapshots_published=99)
    out = counters.to_schema(base)
    assert (out.snapshots_published, out.snapshots_dropped, out.commands_accepted, out.commands_rejected) == (
        5,
        2,
        3,
        7,
    )
    assert out.records_written == 11 and out.inputs_skipped == 1
    assert base.snapshots_published == 99  # not mutated
