"""The command port on the publisher thread: read, judge, answer; history replies for late joiners.

Every message read from the ROUTER socket goes through the :class:`~.gate.CommandGate`; what it
admits lands in the inbox the training thread polls at update boundaries, history requests are
answered at once from the :class:`~.history.HistoryRing`, and refusals get the reply the gate
chose (none, the constant unsigned Nack, or a signed Nack). Replies never block: a peer that is
gone or whose queue is full loses its reply (counted).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import msgspec
import zmq

from telemetry_core import protocol
from telemetry_core.schema import Ack, Command, History, Nack
from telemetry_core.transport.gate import AUTH_CODES, CommandGate, TokenBucket
from telemetry_core.transport.history import HistoryRing

__all__ = ["CommandPort"]

READ_BATCH = 256


def encode_auth_nack(code: str) -> bytes:
    """The constant, unsigned refusal for a peer that does not hold the key (nothing echoed)."""
    reason = (
        "command refused: it is not signed; dashboards sign commands with the key from the "
        "trainer's connection file"
        if code == "unsigned"
        else "command refused: bad signature; the key does not match this trainer's connection "
        "file (did the trainer restart? re-read the file)"
    )
    return protocol.encode_envelope(
        "nack", Nack(command_id="", reason=reason, code=code), session="", seq=0, step=0, wall_time=0.0
    )


class CommandPort:
    """Reads and answers the ROUTER socket; owned by the publisher thread.

    ``header()`` gives the ``(seq, step)`` that signed replies carry: the newest snapshot sent and
    the trainer's current step.
    """

    def __init__(
        self,
        gate: CommandGate,
        key: bytes,
        session: str,
        *,
        read_bucket: TokenBucket,
        cpu_bucket: TokenBucket,
        history: HistoryRing,
        chunk_bytes: int,
        inbox: collections.deque[tuple[bytes, Command]],
        header: Callable[[], tuple[int, int]],
    ) -> None:
        self.gate = gate
        self.key = key
        self.session = session
        self.read_bucket = read_bucket
        self.cpu_bucket = cpu_bucket
        self.history = history
        self.chunk_bytes = chunk_bytes
        self.inbox = inbox
        self.header = header
        self.auth_nacks = {code: encode_auth_nack(code) for code in AUTH_CODES}
        # -- counters (written by the publisher thread only) -----------------------------------
        self.history_served = 0
        self.history_frames = 0
        self.replies_sent = 0
        self.replies_dropped = 0

    # -- replies --------------------------------------------------------------------------------

    def drain_replies(self, router: zmq.Socket, replies: collections.deque[tuple[bytes, Ack | Nack]]) -> None:
        while replies:
            peer, message = replies.popleft()
            kind = "ack" if isinstance(message, Ack) else "nack"
            self.send_signed(router, peer, kind, message)

    def send_signed(self, router: zmq.Socket, peer: bytes, kind: str, body: msgspec.Struct) -> bool:
        seq, step = self.header()
        frame = protocol.encode_envelope(kind, body, session=self.session, seq=seq, step=step)
        return self.send_raw(router, peer, protocol.sign(self.key, frame), frame)

    def send_raw(self, router: zmq.Socket, peer: bytes, mac: bytes, frame: bytes) -> bool:
        try:
            router.send_multipart([peer, mac, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (its queue is full)
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.replies_dropped += 1
            return False
        self.replies_sent += 1
        return True

    # -- commands -------------------------------------------------------------------------------

    def read(self, router: zmq.Socket, cpu_start: float) -> None:
        """Read up to a batch of commands, within the read rate and what the CPU budget holds."""
        budget = self.cpu_bucket
        for i in range(READ_BATCH):
            now = time.monotonic()
            if not self.read_bucket.take(now):
                return
            # Stop mid-batch once this batch alone has spent what the CPU budget still holds.
            if i % 16 == 15 and time.thread_time() - cpu_start > budget.tokens:
                return
            try:
                parts = [router.recv(zmq.NOBLOCK)]
            except zmq.Again:
                self.read_bucket.tokens += 1.0
                return
            count = 1
            while router.getsockopt(zmq.RCVMORE):
                part = router.recv()
                count += 1
                if count <= 3:  # never hold more than the routing id, mac and envelope
                    parts.append(part)
            self.handle(router, parts, count, now)

    def handle(self, router: zmq.Socket, parts: list[bytes], count: int, now: float) -> None:
        verdict = self.gate.admit(parts, count, now, len(self.inbox))
        peer = parts[0]
        if verdict.action == "auth_nack":
            self.send_raw(router, peer, b"", self.auth_nacks[verdict.code])
        elif verdict.action == "nack":
            nack = Nack(command_id=verdict.command_id, reason=verdict.reason, code=verdict.code)
            self.send_signed(router, peer, "nack", nack)
        elif verdict.action == "history":
            assert verdict.command is not None
            self.serve_history(router, peer, verdict.command)
        elif verdict.action == "accept":
            assert verdict.command is not None
            self.inbox.append((peer, verdict.command))

    def serve_history(self, router: zmq.Socket, peer: bytes, command: Command) -> None:
        since = -1 if command.since_seq is None else command.since_seq
        chunks = self.history.chunks(since, self.chunk_bytes, protocol.MAX_FRAME_BYTES - 4096)
        latest = self.header()[0]
        for index, chunk in enumerate(chunks):
            body = History(
                frames=[frame for _, frame in chunk],
                oldest_seq=chunk[0][0] if chunk else None,
                newest_seq=chunk[-1][0] if chunk else None,
                command_id=command.id,
                chunk=index,
                chunks=len(chunks),
                latest_seq=latest,
            )
            if not self.send_signed(router, peer, "history", body):
                return
            self.history_served += 1
            self.history_frames += len(chunk)
