"""The dashboard's network client against real ZeroMQ sockets on loopback.

The trainer side is the real :class:`telemetry_core.transport.Publisher` where the test needs a
well-behaved trainer, and a raw PUB socket (speaking the real protocol functions) where the test
needs a misbehaving one: garbage frames, another schema version. Nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import zmq

from simic_tui.cli import never_reached
from simic_tui.client import LeasePhase, LinkState, TelemetryClient
from simic_tui.store import TelemetryStore
from simic_tui.target import AttachTarget, resolve_target
from telemetry_core.protocol import TOPIC_HEARTBEAT, TOPIC_SNAPSHOT, encode_envelope
from telemetry_core.schema import MAGIC, SCHEMA_MAJOR, Ack, Envelope, Heartbeat, Nack
from telemetry_core.transport import Publisher

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from build_recording import Run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection files go to a private directory, not the user's."""
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Running:
    """A client running on this event loop, stopped and awaited on exit."""

    def __init__(self, client: TelemetryClient) -> None:
        self.client = client
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TelemetryClient:
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        self.client.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5.0)


def publisher(port: int = 0, **kw: object) -> Publisher:
    return Publisher(f"tcp://127.0.0.1:{port}", run_name="cartpole-lstm-demo", **kw).start()  # type: ignore[arg-type]


def target_of(pub: Publisher) -> AttachTarget:
    assert pub.endpoints is not None
    return resolve_target(pub.endpoints.pub.replace("tcp://", ""))


async def test_backfills_history_then_goes_live_without_duplicates() -> None:
    run = Run()
    with publisher() as pub:
        for k in range(30):  # published before the dashboard attaches
            pub.publish_snapshot(run.snapshot(k, published=k + 1))
        await asyncio.sleep(0.2)
        store = TelemetryStore()
        target = target_of(pub)
        assert target.can_command, target.note
        async with Running(TelemetryClient(target, store)) as client:
            await wait_until(lambda: client.status.state == LinkState.LIVE, what="live")
            for k in range(30, 45):
                pub.publish_snapshot(run.snapshot(k, published=k + 1))
                await asyncio.sleep(0.01)
            await wait_until(lambda: store.count == 45, what="45 snapshots")
            expected = [run.snapshot(k).step for k in range(45)]
            assert list(store.steps()) == expected, "history and live frames in order, once each"
            assert store.counters.backfilled >= 30
            assert store.counters.missed == 0
            assert store.counters.bad_frames == 0
            assert store.session == pub.session


async def test_garbage_frames_for_seconds_are_counted_and_the_client_keeps_running() -> None:
    """Random bytes, wrong magic, truncation, pickles, wrong frame counts, unknown topics: counted."""
    port = free_port()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    run = Run()
    rng = random.Random(4)
    store = TelemetryStore()
    target = AttachTarget(host="127.0.0.1", port=port, pub=f"tcp://127.0.0.1:{port}")
    good = 0
    sent_bad = 0
    try:
        async with Running(TelemetryClient(target, store)) as client:
            await asyncio.sleep(0.3)  # let the SUB connect (slow joiner)
            valid = encode_envelope("snapshot", run.snapshot(0, 1), session="s1", seq=1, step=0)
            deadline = time.monotonic() + 3.0
            seq = 1
            while time.monotonic() < deadline:
                kind = rng.randrange(7)
                if kind == 0:
                    pub.send_multipart([TOPIC_SNAPSHOT, rng.randbytes(rng.randrange(1, 300))])
                elif kind == 1:
                    pub.send_multipart([TOPIC_SNAPSHOT, valid[: rng.randrange(1, len(valid))]])
                elif kind == 2:
                    pub.send_multipart([TOPIC_SNAPSHOT, pickle.dumps({"a": 1})])
                elif kind == 3:
                    pub.send_multipart([TOPIC_SNAPSHOT, valid, b"extra"])
                elif kind == 4:
                    env = msgspec.msgpack.encode(
                        Envelope(
                            magic="NOPE",
                            major=SCHEMA_MAJOR,
                            minor=0,
                            session="s1",
                            seq=9,
                            step=0,
                            wall_time=0.0,
                            kind="snapshot",
                        )
                    )
                    pub.send_multipart([TOPIC_SNAPSHOT, env])
                elif kind == 5:
                    pub.send_multipart([TOPIC_HEARTBEAT, rng.randbytes(40)])
                else:
                    seq += 1
                    frame = encode_envelope(
                        "snapshot", run.snapshot(seq % 120, seq), session="s1", seq=seq, step=seq
                    )
                    pub.send_multipart([TOPIC_SNAPSHOT, frame])
                    good += 1
                    sent_bad -= 1
                sent_bad += 1
                await asyncio.sleep(0.002)
            await wait_until(lambda: store.counters.snapshots >= good // 2, what="valid snapshots")
            await wait_until(lambda: store.counters.bad_frames >= sent_bad // 2, what="bad frames counted")
            assert client.status.state == LinkState.LIVE
            codes = set(store.counters.bad_by_code)
            assert {"malformed", "frame_count", "bad_magic"} <= codes, codes
            assert store.counters.bad_frames == sum(store.counters.bad_by_code.values())
    finally:
        pub.close(0)


async def test_incompatible_major_version_shows_both_versions_and_disables_commands() -> None:
    port = free_port()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    store = TelemetryStore()
    target = AttachTarget(
        host="127.0.0.1", port=port, pub=f"tcp://127.0.0.1:{port}", cmd="tcp://127.0.0.1:1", key=b"k" * 32
    )
    try:
        async with Running(TelemetryClient(target, store)) as client:
            frame = msgspec.msgpack.encode(
                Envelope(
                    magic=MAGIC,
                    major=SCHEMA_MAJOR + 1,
                    minor=3,
                    session="future",
                    seq=1,
                    step=0,
                    wall_time=time.time(),
                    kind="snapshot",
                )
            )
            deadline = time.monotonic() + 10
            while client.status.state != LinkState.INCOMPATIBLE:  # resend until the slow joiner hears it
                assert time.monotonic() < deadline, "no incompatible state"
                pub.send_multipart([TOPIC_SNAPSHOT, frame])
                await asyncio.sleep(0.05)
            banner = client.status.banner
            assert f"{SCHEMA_MAJOR + 1}.3" in banner and f"{SCHEMA_MAJOR}." in banner
            assert client.status.their_version == (SCHEMA_MAJOR + 1, 3)
            reason = client.request_debug()
            assert "schema" in reason and "disabled" in reason
            assert store.count == 0
    finally:
        pub.close(0)


async def test_a_newer_minor_trainer_with_extra_fields_is_shown() -> None:
    """Schema minor versions only add fields: a snapshot from a newer minor, with fields this side
    does not know at the envelope, snapshot and nested levels, is decoded, stored and counted as good."""
    port = free_port()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    store = TelemetryStore()
    target = AttachTarget(host="127.0.0.1", port=port, pub=f"tcp://127.0.0.1:{port}")
    snap = msgspec.to_builtins(Run().snapshot(0))
    snap["future_section"] = {"x": [1.0, 2.0]}
    snap["policy"]["kl_k5_mean"] = 0.25
    body = msgspec.msgpack.encode(snap)
    frame = msgspec.msgpack.encode(
        {
            "magic": MAGIC,
            "major": SCHEMA_MAJOR,
            "minor": 99,
            "session": "newer",
            "seq": 1,
            "step": snap["step"],
            "wall_time": time.time(),
            "kind": "snapshot",
            "body": msgspec.Raw(body),
            "compression": None,
        }
    )
    try:
        async with Running(TelemetryClient(target, store)) as client:
            deadline = time.monotonic() + 10
            while store.count == 0:  # resend until the slow joiner hears it
                assert time.monotonic() < deadline, f"not stored: {client.status.state}"
                pub.send_multipart([TOPIC_SNAPSHOT, frame])
                await asyncio.sleep(0.05)
            assert store.latest is not None and store.latest.step == snap["step"]
            assert store.latest.policy is not None
            assert store.latest.policy.kl_k3_mean == snap["policy"]["kl_k3_mean"]
            assert client.status.state != LinkState.INCOMPATIBLE and store.counters.bad_frames == 0
    finally:
        pub.close(0)


async def test_unreachable_trainer_stays_connecting_and_keeps_retrying() -> None:
    port = free_port()  # nothing listens here
    store = TelemetryStore()
    target = AttachTarget(host="127.0.0.1", port=port, pub=f"tcp://127.0.0.1:{port}")
    async with Running(TelemetryClient(target, store)) as client:
        await wait_until(lambda: client.status.connect_retries >= 2, what="retries")
        assert client.status.state == LinkState.CONNECTING
        await wait_until(lambda: bool(client.status.unreachable), timeout=30, what="why")
        assert f"nothing is listening on 127.0.0.1:{port}" in client.status.unreachable
        assert client.status.detail == "retrying quietly"
        # Quitting now is a failure of attach, and says where nothing answered.
        assert never_reached(client).startswith(f"no trainer answered at 127.0.0.1:{port}: nothing is listening")
        # the trainer shows up late: the same client attaches without being restarted
        with publisher(port) as pub:
            pub.publish_snapshot(Run().snapshot(0, 1))
            await wait_until(lambda: client.status.state == LinkState.LIVE, timeout=15, what="live")
            assert never_reached(client) == "" and client.status.unreachable == ""


async def test_stale_then_disconnected_then_trainer_restart_resets_and_says_so() -> None:
    port = free_port()
    run = Run()
    store = TelemetryStore()
    with publisher(port, heartbeat_interval=0.2) as first:
        for k in range(5):
            first.publish_snapshot(run.snapshot(k, k + 1))
        client = TelemetryClient(resolve_target(f"127.0.0.1:{port}"), store, stale_after=0.6)
        async with Running(client):
            await wait_until(lambda: store.count == 5, what="5 snapshots")
            old_session = first.session
            first.close()
            await wait_until(
                lambda: client.status.state in (LinkState.STALE, LinkState.DISCONNECTED),
                what="stale or disconnected",
            )
            await wait_until(lambda: client.status.state == LinkState.DISCONNECTED, what="disconnected")
            with publisher(port, heartbeat_interval=0.2) as second:  # a restarted trainer, same port
                assert second.session != old_session
                second.publish_snapshot(run.snapshot(0, 1))
                await wait_until(lambda: store.session == second.session, timeout=15, what="new session")
                await wait_until(lambda: store.count >= 1, what="the new run's first snapshot")
                assert client.status.restarts == 1
                events = [e.message for e in store.drain_events()]
                assert any("trainer restarted" in m and second.session[:8] in m for m in events), events
                # the new connection file (new key) was picked up: commands work against the new trainer
                assert client.target.session == second.session
                assert client.commands_unavailable() == ""


async def _serve_commands(
    pub: Publisher, steps: Callable[[], int], replies: list, stop: asyncio.Event
) -> None:
    """The trainer loop's side of commands: poll at update boundaries, acknowledge with the step."""
    while not stop.is_set():
        for peer, cmd in pub.poll_commands():
            replies.append(cmd)
            step = steps() + 1
            if cmd.action in ("lease_debug", "renew"):
                pub.reply(
                    peer,
                    Ack(
                        command_id=cmd.id,
                        action=cmd.action,
                        effective_step=step,
                        lease_until=step + (cmd.updates or 10),
                        level="DEBUG",
                    ),
                )
            elif cmd.action == "set_level":
                pub.reply(
                    peer, Ack(command_id=cmd.id, action=cmd.action, effective_step=step, level=cmd.level)
                )
            elif cmd.action == "profile":
                pub.reply(
                    peer, Nack(command_id=cmd.id, reason="profiling needs torch.profiler", code="unavailable")
                )
            else:
                pub.reply(peer, Ack(command_id=cmd.id, action=cmd.action, effective_step=step))
        await asyncio.sleep(0.02)


async def test_commands_are_signed_acknowledged_and_the_lease_is_renewed() -> None:
    run = Run()
    with publisher() as pub:
        pub.publish_snapshot(run.snapshot(0, 1))
        store = TelemetryStore()
        client = TelemetryClient(target_of(pub), store, lease_seconds=0.6, lease_updates=50)
        received: list = []
        stop = asyncio.Event()
        server = asyncio.create_task(
            _serve_commands(pub, lambda: store.latest.step if store.latest else 0, received, stop)
        )
        try:
            async with Running(client):
                await wait_until(lambda: store.count >= 1, what="first snapshot")
                assert client.request_debug() == ""
                assert client.lease.phase == LeasePhase.PENDING
                await wait_until(lambda: client.lease.phase == LeasePhase.ACTIVE, what="lease acknowledged")
                first = run.snapshot(0).step + 1  # the trainer acknowledges with the next update
                assert client.lease.effective_step == first
                assert f"acknowledged at step {first}" in client.lease.describe()
                await wait_until(lambda: any(c.action == "renew" for c in received), what="a renewal")
                assert all(c.session == pub.session for c in received)
                assert client.set_level("NORMAL") == ""
                await wait_until(lambda: any(c.action == "set_level" for c in received), what="set_level")
                assert any(c.action == "release" for c in received)
                assert client.lease.phase == LeasePhase.RELEASED
                client.request_profile()
                await wait_until(lambda: "refused" in client.profile_note, what="profile refusal")
                messages = [e.message for e in store.drain_events()]
                assert any("level NORMAL acknowledged from step" in m for m in messages), messages
                assert any("trainer refused profile" in m for m in messages), messages
                assert pub.counters.commands_rejected == 0
        finally:
            stop.set()
            await server


async def test_a_wrong_key_is_refused_by_the_trainer_and_explained() -> None:
    with publisher() as pub:
        pub.publish_snapshot(Run().snapshot(0, 1))
        store = TelemetryStore()
        target = target_of(pub)
        from dataclasses import replace

        client = TelemetryClient(replace(target, key=os.urandom(32)), store)
        async with Running(client):
            await wait_until(lambda: client.status.state == LinkState.LIVE, what="live")
            pub.publish_snapshot(Run().snapshot(1, 2))
            await wait_until(lambda: store.count >= 1, what="a live snapshot despite the refused history")
            client.request_debug()
            await wait_until(lambda: client.lease.phase == LeasePhase.REFUSED, what="refusal")
            assert "does not match" in client.status.banner
            assert pub.counters.commands_rejected >= 1


def test_target_parsing_errors_are_plain_sentences(tmp_path: Path) -> None:
    from simic_tui.target import TargetError, parse_address

    assert parse_address("127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert parse_address("[::1]:7") == ("::1", 7)
    assert parse_address("gpu-box.lan:5555") == ("gpu-box.lan", 5555)
    for bad in ("", "host", ":5555", "host:0", "host:65536", "host:http", "::1:5555", "[nothost]:1", "a b:1"):
        with pytest.raises(TargetError, match="malformed address"):
            parse_address(bad)
    missing = tmp_path / "nope.json"
    with pytest.raises(TargetError, match="does not exist"):
        resolve_target("127.0.0.1:5555", missing)
    loose = tmp_path / "loose.json"
    loose.write_text("{}")
    loose.chmod(0o644)
    with pytest.raises(TargetError, match="readable by other users"):
        resolve_target("127.0.0.1:5555", loose)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    broken.chmod(0o600)
    with pytest.raises(TargetError, match="not valid"):
        resolve_target("127.0.0.1:5555", broken)
    watch_only = resolve_target("127.0.0.1:1")
    assert not watch_only.can_command and "commands disabled" in watch_only.note


async def test_heartbeats_keep_the_link_live_between_snapshots() -> None:
    with publisher(heartbeat_interval=0.1) as pub:
        pub.publish_snapshot(Run().snapshot(0, 1))
        store = TelemetryStore()
        client = TelemetryClient(target_of(pub), store, stale_after=0.5)
        async with Running(client):
            await wait_until(lambda: store.count == 1, what="snapshot")
            await asyncio.sleep(1.2)  # no snapshots, only heartbeats: still live
            assert client.status.state == LinkState.LIVE
            assert store.counters.heartbeats >= 5
            assert isinstance(store.last_heartbeat, Heartbeat)


async def test_a_batched_client_takes_every_frame_in_order_and_switches_back_to_per_frame() -> None:
    """A sweep's runs not on screen drain their sockets every ``receive_interval`` seconds: bursts
    faster than that arrive whole, in order, none missed; set to 0 it is woken per frame again."""
    run = Run()
    with publisher() as pub:
        pub.publish_snapshot(run.snapshot(0, published=1))
        store = TelemetryStore()
        client = TelemetryClient(target_of(pub), store)
        client.receive_interval = 0.25
        async with Running(client):
            await wait_until(lambda: store.count == 1, what="the first snapshot")
            seen: list[int] = []
            for k in range(1, 121):  # 120 updates at ~100/s: about 25 per drain
                pub.publish_snapshot(run.snapshot(k, published=k + 1))
                if k % 10 == 0:
                    seen.append(store.count)
                await asyncio.sleep(0.01)
            await wait_until(lambda: store.count == 121, what="121 snapshots")
            assert len(set(seen)) < len(seen), "frames were taken in batches, not one by one"
            client.receive_interval = 0.0
            await asyncio.sleep(0.3)  # the last batched sleep ends
            pub.publish_snapshot(run.snapshot(121, published=122))
            t0 = time.monotonic()
            await wait_until(lambda: store.count == 122, what="the next snapshot")
            assert time.monotonic() - t0 < 0.2  # woken by the frame, not by a timer
            assert list(store.steps()) == [run.snapshot(k).step for k in range(122)]
            assert store.counters.missed == 0 and store.counters.bad_frames == 0


async def test_a_command_to_an_unreachable_command_port_fails_at_once_and_says_why() -> None:
    port, dead = free_port(), free_port()
    target = AttachTarget(
        host="127.0.0.1",
        port=port,
        pub=f"tcp://127.0.0.1:{port}",
        cmd=f"tcp://127.0.0.1:{dead}",  # nothing listens: ZeroMQ would queue forever without IMMEDIATE
        session="abc",
        key=os.urandom(32),
    )
    store = TelemetryStore()
    async with Running(TelemetryClient(target, store, history_timeout=0.5)) as client:
        await wait_until(lambda: client.commands_unavailable() == "", what="session from the connection file")
        assert client.request_debug() == ""
        await wait_until(lambda: client.lease.phase == LeasePhase.REFUSED, what="refusal")
        assert "not reachable" in client.lease.reason
        assert any("not reachable" in e.message for e in store.drain_events())


def test_no_frame_can_crash_the_client_fuzz() -> None:
    """10,000 mutated frames through the client's receive paths (snapshot topic and signed replies)."""
    from telemetry_core.protocol import sign
    from telemetry_core.schema import History

    rng = random.Random(11)
    key = os.urandom(32)
    store = TelemetryStore()
    client = TelemetryClient(
        AttachTarget("127.0.0.1", 1, "tcp://127.0.0.1:1", cmd="tcp://127.0.0.1:2", session="s1", key=key),
        store,
    )
    run = Run()
    seeds = [
        encode_envelope("snapshot", run.snapshot(k, k + 1), session="s1", seq=k + 1, step=k)
        for k in (0, 39, 60, 95)
    ]
    seeds.append(encode_envelope("heartbeat", Heartbeat(step=3), session="s1", seq=3, step=3))
    seeds.append(
        encode_envelope("history", History(frames=seeds[:2], chunk=0, chunks=1), session="s1", seq=3, step=3)
    )
    seeds.append(
        encode_envelope(
            "ack", Ack(command_id="x", action="renew", effective_step=4), session="s1", seq=3, step=3
        )
    )
    for _ in range(10_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                del data[rng.randrange(len(data)) :]
            elif op == 2:
                data += rng.randbytes(rng.randrange(1, 50))
            elif data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        frame = bytes(data)
        client._on_sub_frames([rng.choice([TOPIC_SNAPSHOT, TOPIC_HEARTBEAT]), frame])
        client._on_reply([sign(key, frame), frame])  # signed: the decoder behind the MAC is exercised
    assert store.counters.bad_frames > 1000
    assert client.status.state in (LinkState.LIVE, LinkState.INCOMPATIBLE, LinkState.CONNECTING)
