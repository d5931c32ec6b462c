"""A hostile trainer (or a rewritten plaintext path) against the dashboard, over real sockets.

The fake trainer here is a raw PUB + ROUTER pair speaking the real protocol functions, with a
connection file of its own (plaintext, loopback): what anyone who can bind the port, or sit on a
plaintext path, can send. The dashboard is the real client, store and Textual app.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from simic_tui import client_commands
from simic_tui.app import SimicApp
from simic_tui.client import LeasePhase, LinkState, TelemetryClient
from simic_tui.sanitize import MAX_CHARS
from simic_tui.store import TelemetryStore
from simic_tui.target import resolve_target
from simic_tui.widgets.header import Banner, StatusHeader
from telemetry_core import protocol
from telemetry_core.schema import Ack, History

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "benchmarks", ROOT / "tests" / "fixtures"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from bench_transport import full_snapshot  # noqa: E402
from fuzz_frames import hostile_snapshot  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class FakeTrainer:
    """PUB + ROUTER on loopback with a connection file; the test decides every reply."""

    def __init__(self, tmp: Path, *, host: str = "127.0.0.1") -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for sock in (self.pub, self.router):
            sock.linger = 0
        self.pub.bind(f"tcp://{host}:0")
        self.router.bind(f"tcp://{host}:0")
        self.session = protocol.new_session_id()
        self.info = protocol.ConnectionInfo(
            pub=self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
            cmd=self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            session=self.session,
            key=protocol.ConnectionInfo.new_key(),
        )
        self.path = protocol.write_connection_file(self.info, tmp / "fake.json")
        self.seq = 0

    @property
    def address(self) -> str:
        return self.info.pub.removeprefix("tcp://")

    def snapshot(self, step: int) -> bytes:
        self.seq += 1
        snap = full_snapshot(step, n_params=10)
        return protocol.encode_envelope("snapshot", snap, session=self.session, seq=self.seq, step=step)

    def command(self, timeout: float = 5.0) -> tuple[bytes, Any]:
        assert self.router.poll(int(timeout * 1000)), "no command from the dashboard"
        peer, _mac, data = self.router.recv_multipart()
        env = protocol.decode_envelope(data)
        return peer, protocol.decode_body(env)

    def reply(
        self, peer: bytes, kind: str, body: Any, *, key: bytes | None = None, mac: bytes | None = None
    ) -> list[bytes]:
        data = protocol.encode_envelope(kind, body, session=self.session, seq=self.seq, step=0)
        frames = [peer, mac if mac is not None else protocol.sign(key or self.info.key_bytes, data), data]
        self.router.send_multipart(frames)
        return frames

    def close(self) -> None:
        self.ctx.destroy(linger=0)


async def _attached_with_a_pending_lease(
    fake: FakeTrainer,
) -> tuple[TelemetryClient, asyncio.Task[None], bytes, Any]:
    store = TelemetryStore()
    client = TelemetryClient(resolve_target(fake.address, fake.path), store)
    task = asyncio.create_task(client.run())
    peer, history = await asyncio.to_thread(fake.command)
    assert history.action == "history"
    fake.reply(peer, "history", History(command_id=history.id, frames=[fake.snapshot(1)]))
    await wait_until(lambda: store.count == 1, what="the signed history")
    assert client.request_debug() == ""
    peer, lease = await asyncio.to_thread(fake.command)
    assert lease.action == "lease_debug" and client.lease.phase == LeasePhase.PENDING
    return client, task, peer, lease


async def _stop(client: TelemetryClient, task: asyncio.Task[None]) -> None:
    client.stop()
    await asyncio.wait_for(task, 5.0)


@pytest.mark.parametrize("check", ["on", "off"])
async def test_forged_and_wrong_key_replies_are_refused_and_switching_the_check_off_lets_them_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: str
) -> None:
    """Without the reply-signature check, a forged Ack would take the lease: the ``off`` case shows
    that the ``on`` case's assertions can fail."""
    if check == "off":
        monkeypatch.setattr(client_commands, "verify", lambda key, mac, data: True)
    fake = FakeTrainer(tmp_path)
    try:
        client, task, peer, lease = await _attached_with_a_pending_lease(fake)
        ack = Ack(command_id=lease.id, action="lease_debug", effective_step=7, lease_until=99)
        fake.reply(peer, "ack", ack, mac=b"0" * 64)  # forged: no key at all
        fake.reply(peer, "ack", ack, key=b"k" * 32)  # signed, with another key
        bad = client.store.counters.bad_by_code
        if check == "on":
            await wait_until(lambda: bad["bad_signature"] == 2, what="two refused replies")
            assert client.lease.phase == LeasePhase.PENDING and client.lease.effective_step is None
        else:
            await wait_until(
                lambda: client.lease.phase == LeasePhase.ACTIVE, what="the forged ack taking effect"
            )
        await _stop(client, task)
    finally:
        fake.close()


async def test_a_replayed_reply_changes_nothing(tmp_path: Path) -> None:
    """The trainer's earlier, validly signed Ack replayed while a new lease is pending."""
    fake = FakeTrainer(tmp_path)
    try:
        client, task, peer, lease = await _attached_with_a_pending_lease(fake)
        first = fake.reply(
            peer, "ack", Ack(command_id=lease.id, action="lease_debug", effective_step=3, lease_until=50)
        )
        await wait_until(lambda: client.lease.phase == LeasePhase.ACTIVE, what="the genuine ack")
        assert client.set_level("NORMAL") == ""  # releases the lease
        await asyncio.to_thread(fake.command)
        await asyncio.to_thread(fake.command)
        assert client.request_debug() == ""
        _, second = await asyncio.to_thread(fake.command)
        assert second.action == "lease_debug" and client.lease.phase == LeasePhase.PENDING
        fake.router.send_multipart(first)  # the replay
        await wait_until(
            lambda: client.store.counters.bad_by_code["unexpected_reply"] == 1, what="the replay refused"
        )
        assert client.lease.phase == LeasePhase.PENDING
        await _stop(client, task)
    finally:
        fake.close()


async def test_a_plaintext_remote_trainer_is_flagged_and_commands_stay_off(tmp_path: Path) -> None:
    """Non-loopback without CURVE: ``⚠ unencrypted`` on screen and no command leaves the dashboard."""
    fake = FakeTrainer(tmp_path, host="127.0.0.1")
    try:
        target = resolve_target(fake.address, fake.path)
        # The dashboard's view of the address: a remote host (the fake listens on loopback).
        from dataclasses import replace

        target = replace(target, host="10.1.2.3")
        store = TelemetryStore()
        client = TelemetryClient(target, store)
        app = SimicApp(store, client=client)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(0.3)
            assert client.status.unencrypted
            reason = client.request_debug()
            assert "not encrypted" in reason and "--allow-plaintext-commands" in reason
            app.tick()
            await pilot.pause()
            assert "⚠ unencrypted" in app.query_one(StatusHeader)._shown.plain  # type: ignore[union-attr]
        allowed = TelemetryClient(replace(target, allow_plaintext=True), TelemetryStore())
        assert allowed.commands_unavailable() != client.commands_unavailable()
    finally:
        fake.close()


async def test_hostile_snapshots_into_the_real_dashboard(tmp_path: Path) -> None:
    """Structure-aware fuzz: valid msgpack of the snapshot's shape with hostile values, published
    into the running app while its screens are opened. The app stays up, refuses what is out of
    range, counts it on screen, caps its columns and never shows a control character."""
    fake = FakeTrainer(tmp_path)
    base = msgspec.to_builtins(full_snapshot(debug=True))
    rng = random.Random(11)
    store = TelemetryStore()
    client = TelemetryClient(resolve_target(fake.address), store)  # no file: a plaintext stream
    app = SimicApp(store, client=client)
    try:
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(0.3)
            for round_ in range(6):
                for _ in range(25):
                    fake.seq += 1  # hostile and sane frames of one session, in sequence
                    frame = hostile_snapshot(rng, fake.seq, base, session=fake.session)
                    fake.pub.send_multipart([protocol.TOPIC_SNAPSHOT, frame])
                    fake.pub.send_multipart([protocol.TOPIC_SNAPSHOT, fake.snapshot(fake.seq + 1)])
                await pilot.pause(0.2)
                # Every screen that shows trainer text. (The anomaly log is rendered by the incident
                # screens, which draw trainer text as rich Text.)
                await pilot.press(("t", "d", "r", "question_mark", "d", "t")[round_])
                await pilot.pause(0.1)
                await pilot.press("escape")
            await wait_until(lambda: store.counters.bad_frames > 0 and store.count > 10, what="frames")
            app.tick()
            await pilot.pause()
            assert app.is_running and app.return_code in (None, 0)
            assert client.status.state in (LinkState.LIVE, LinkState.STALE)
            assert client.status.worker_failures == 0
            assert len(store.columns) <= store.max_columns
            shown = app.query_one(StatusHeader)._shown
            assert shown is not None and "bad frames" in shown.plain
            texts = [shown.plain, app.query_one(Banner)._text, *[n.message for n in app._notifications]]
            for text in texts:
                assert not any(ord(ch) < 32 and ch != "\n" for ch in text), repr(text[:80])
                assert "\x1b" not in text and "\u202e" not in text
            latest = store.latest
            assert latest is not None and len(latest.run.name) <= MAX_CHARS
    finally:
        fake.close()
