"""Fuzz the frame decoders and the publisher's command port with random and mutated frames.

Run: ``python benchmarks/fuzz_frames.py [--frames 100000] [--socket-frames 20000] [--seed 0]``.

Seeds are valid frames of every kind (signed commands of every action, full NORMAL and DEBUG
snapshot envelopes, heartbeats, acks, nacks, history) plus pickles. Mutations: bit flips, byte
overwrites, truncations, extensions, insertions, deletions, splices of two frames, msgpack-level
type swaps anywhere in the envelope or its body (None / bool / huge ints / NaN / inf / strings /
bytes / lists / maps / deep nesting), and plain random bytes.

Invariants (any violation is a crash of this script / a failure of tests/test_fuzz_frames.py):

* :func:`protocol.decode_envelope` / :func:`protocol.decode_body` either raise
  :class:`protocol.FrameError` or return a Struct of the type the envelope's kind names, which
  re-encodes and decodes to the same bytes. Nothing else is ever raised.
* Every message sent to the command port is accounted for: accepted or refused with a code. Every
  accepted command is a valid :class:`Command` for the publisher's session. Every reply is a signed
  Ack / Nack / History or the constant unsigned Nack. The publisher still serves a valid command
  and still publishes afterwards.

The test suite imports this module and runs a smaller, seeded share of the same fuzzer.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_transport import full_snapshot  # noqa: E402

from telemetry_core import protocol  # noqa: E402
from telemetry_core.schema import (  # noqa: E402
    BODY_TYPES,
    COMMAND_ACTIONS,
    MAGIC,
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    Ack,
    Command,
    Heartbeat,
    History,
    Nack,
    Snapshot,
)

__all__ = ["check_decoders", "fuzz_decoders", "fuzz_socket", "hostile_snapshot", "mutate", "seed_frames"]

_SWAP_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "SIMIC",
    "x" * 300,
    "\u202e\x00",
    b"",
    b"\x80\x04\x95",
    [],
    [1, "a", None],
    {},
    {"a": 1, "magic": "SIMIC"},
    {"kind": "command"},
]


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def seed_frames(session: str = "0123456789abcdef") -> dict[str, list[bytes]]:
    """Valid envelopes of every kind: ``{"command": [...], "other": [...]}``."""
    now = time.time()

    def command(action: str, **fields: Any) -> bytes:
        cmd = Command(
            id=os.urandom(8).hex(), session=session, issued=now, expires=now + 3600, action=action, **fields
        )
        return protocol.encode_envelope("command", cmd, session=session, seq=0, step=0)

    commands = [
        command("lease_debug", updates=50, lease_seconds=30.0, client="fuzz"),
        command("renew", updates=10),
        command("release"),
        command("set_level", level="debug"),
        command("history", since_seq=3),
        command("profile", profile_updates=2),
    ]

    def env(kind: str, body: msgspec.Struct) -> bytes:
        return protocol.encode_envelope(kind, body, session=session, seq=7, step=7)

    others = [
        env("snapshot", full_snapshot(1)),
        env("snapshot", full_snapshot(2, debug=True, n_params=20)),
        env("snapshot", Snapshot(step=0, wall_time=0.0)),
        env("heartbeat", Heartbeat(step=3, level="DEBUG", run_name="fuzz")),
        env("ack", Ack(command_id="c", action="release", effective_step=4, level="DEBUG", lease_until=9)),
        env("nack", Nack(command_id="c", reason="no", code="expired")),
        env("history", History(frames=[commands[0], commands[1]], oldest_seq=1, newest_seq=2, chunks=2)),
        pickle.dumps({"action": "release"}),
        pickle.dumps(Ack(command_id="c", action="x"), protocol=0),
    ]
    return {"command": commands, "other": others}


def _type_swap(rng: random.Random, frame: bytes) -> bytes:
    """Decode generically, replace one value anywhere (envelope or body) with another type."""
    try:
        obj = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return frame
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any, depth: int) -> None:
        if depth > 6 or len(slots) > 4000:
            return
        if isinstance(node, dict):
            for key in node:
                slots.append((node, key))
                walk(node[key], depth + 1)
        elif isinstance(node, list):
            for index in range(min(len(node), 64)):
                slots.append((node, index))
                walk(node[index], depth + 1)

    walk(obj, 0)
    if not slots:
        return frame
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        container, key = rng.choice(slots)
        roll = rng.random()
        if roll < 0.1:
            value: Any = _deep(rng.choice((5, 50, 300, 2000)))
        elif roll < 0.2 and isinstance(container, dict):
            container[f"extra_{rng.randrange(100)}"] = rng.choice(_SWAP_VALUES)  # an unknown field
            continue
        elif roll < 0.3 and isinstance(container, dict):
            container.pop(key, None)  # a missing field
            continue
        else:
            value = rng.choice(_SWAP_VALUES)
        with contextlib.suppress(IndexError, KeyError, TypeError):
            container[key] = value
    try:
        return msgspec.msgpack.encode(obj)
    except (OverflowError, TypeError, ValueError, RecursionError):
        return frame


def mutate(rng: random.Random, frame: bytes, pool: list[bytes]) -> bytes:
    """One random mutation (sometimes two) of ``frame``."""
    op = rng.randrange(11)
    data = bytearray(frame)
    if op == 0 and data:  # bit flips
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == 1 and data:  # byte overwrites (often with msgpack type markers)
        for _ in range(rng.choice((1, 2, 3))):
            data[rng.randrange(len(data))] = rng.choice(
                (
                    0x00,
                    0x7F,
                    0x80,
                    0x90,
                    0xA0,
                    0xC0,
                    0xC1,
                    0xC4,
                    0xCF,
                    0xD9,
                    0xDB,
                    0xDD,
                    0xDF,
                    0xFF,
                    rng.randrange(256),
                )
            )
    elif op == 2:  # truncation
        data = data[: rng.randrange(len(data) + 1)]
    elif op == 3:  # extension
        data += (
            os.urandom(rng.choice((1, 2, 8, 64, 512)))
            if rng.random() < 0.5
            else data[: rng.randrange(len(data) + 1)]
        )
    elif op == 4:  # insertion
        i = rng.randrange(len(data) + 1)
        data[i:i] = os.urandom(rng.choice((1, 4, 16)))
    elif op == 5 and data:  # deletion
        i = rng.randrange(len(data))
        del data[i : i + rng.choice((1, 2, 8, 32))]
    elif op == 6:  # splice with another frame
        other = rng.choice(pool)
        data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif op in (7, 8):  # msgpack-level type swaps, extra and missing fields
        data = bytearray(_type_swap(rng, frame))
    elif op == 9:  # random bytes
        data = bytearray(os.urandom(rng.choice((0, 1, 2, 8, 40, 200, 1000))))
    else:  # absurd lengths: a str/bin/array/map header claiming 4 GB
        i = rng.randrange(len(data) + 1)
        data[i:i] = bytes([rng.choice((0xC6, 0xDB, 0xDD, 0xDF))]) + b"\xff\xff\xff\xf0"
    if rng.random() < 0.1:
        return mutate(rng, bytes(data), pool)
    return bytes(data)


def check_decoders(frame: bytes) -> str:
    """Decode ``frame`` as a dashboard / the publisher would; return the outcome.

    Raises AssertionError (or whatever crashed) when an invariant is violated.
    """
    try:
        env = protocol.decode_envelope(frame)
    except protocol.FrameError as exc:
        return f"refused:{exc.code}"
    try:
        body = protocol.decode_body(env)
    except protocol.FrameError as exc:
        return f"refused-body:{exc.code}"
    expected = BODY_TYPES[env.kind]
    assert type(body) is expected, f"{env.kind} decoded to {type(body).__name__}"
    again = msgspec.msgpack.encode(body)
    assert msgspec.msgpack.encode(msgspec.msgpack.decode(again, type=expected)) == again
    return f"decoded:{env.kind}"


def fuzz_decoders(n: int, seed: int = 0) -> collections.Counter[str]:
    rng = random.Random(seed)
    seeds = seed_frames()
    pool = seeds["command"] + seeds["other"]
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(n):
        frame = rng.choice(pool)
        frame = mutate(rng, frame, pool) if i % 50 else frame  # a few untouched seeds too
        outcomes[check_decoders(frame)] += 1
    return outcomes


# -- structure-aware hostile snapshots (valid msgpack, valid shape, hostile values) ----------------

HOSTILE_INTS = [2**53 + 1, 2**63, 2**64 - 1, -(2**63), -(2**53) - 1, 2**31]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0]
HOSTILE_STRINGS = [
    "[/x]",
    "[bold red]boom[/]",
    "[link=file:///etc/passwd]x[/link]",
    "\x1b]0;pwned\x07",  # rewrites the terminal's title
    "\x1b[2J\x1b[H",  # clears the screen
    "\x1b[31mred\x1b[0m",
    "\u202eevil",  # right-to-left override
    "nul\x00bell\x07back\x08",
    "line\nbreak\rtab\t",
    "🔥" * 600,
    "x" * 2_000_000,  # a 2 MB string
]


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out: list[tuple[tuple[Any, ...], Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, (*path, k))
        if path:
            out.append((path, obj))  # a dict itself: a target for many new keys
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, (*path, i))
    else:
        out.append((path, obj))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def hostile_snapshot(
    rng: random.Random, seq: int, base: dict[str, Any], *, session: str = "hostile"
) -> bytes:
    """A snapshot frame of valid msgpack and valid shape whose values are hostile.

    Picks a few leaves of a real DEBUG snapshot and replaces each by a hostile value of its own
    kind: huge or negative integers, NaN / inf floats, markup, escape sequences, control
    characters, 2 MB strings; or floods a dict with thousands of new keys. Sometimes the
    envelope's own seq or step is the hostile integer.
    """
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(base))  # a deep copy, as builtins
    leaves = _leaves(snap)
    for _ in range(rng.randrange(1, 6)):
        path, value = rng.choice(leaves)
        if not path:
            continue
        if isinstance(value, dict):
            value.update(
                {
                    f"k{rng.randrange(10**9)}\x1b[{i}m": rng.random()
                    for i in range(rng.choice((50, 2000, 20_000)))
                }
            )
        elif isinstance(value, bool) or value is None:
            _set(snap, path, rng.choice(HOSTILE_STRINGS[:4] + HOSTILE_INTS[:2]))
        elif isinstance(value, int):
            _set(snap, path, rng.choice(HOSTILE_INTS))
        elif isinstance(value, float):
            _set(snap, path, rng.choice(HOSTILE_FLOATS))
        elif isinstance(value, str):
            _set(snap, path, rng.choice(HOSTILE_STRINGS))
    if rng.random() < 0.3:  # new history columns: a dict the dashboard keeps as columns
        section, name = rng.choice(
            [("policy", "entropy"), ("gradients", "group_norms"), ("lstm", "gate_saturation")]
        )
        if isinstance(snap.get(section), dict):
            snap[section][name] = {
                f"{name}{rng.randrange(10**9)}": rng.random() for _ in range(rng.choice((100, 20_000)))
            }
    if rng.random() < 0.3:
        snap["run"]["name"] = rng.choice(HOSTILE_STRINGS)
    if rng.random() < 0.2:
        snap["anomalies"] = [
            {
                "kind": rng.choice(HOSTILE_STRINGS[:7]),
                "severity": "critical",
                "step": 1,
                "message": rng.choice(HOSTILE_STRINGS),
                "action": rng.choice(HOSTILE_STRINGS),
            }
        ]
    env_seq = rng.choice(HOSTILE_INTS) if rng.random() < 0.05 else seq
    env_step = rng.choice(HOSTILE_INTS) if rng.random() < 0.05 else snap.get("step", 0)
    if not isinstance(env_step, int):
        env_step = 0
    env = {
        "magic": MAGIC,
        "major": SCHEMA_MAJOR,
        "minor": SCHEMA_MINOR,
        "session": session,
        "seq": env_seq,
        "step": env_step,
        "wall_time": time.time(),
        "kind": "snapshot",
        "body": msgspec.Raw(msgspec.msgpack.encode(snap)),
    }
    return msgspec.msgpack.encode(env)


def fuzz_socket(n: int, seed: int = 0, *, resign: float = 0.6) -> dict[str, Any]:
    """Send ``n`` mutated messages into a live publisher's command port; check the invariants."""
    import zmq

    from telemetry_core.transport import REJECT_CODES, Publisher

    rng = random.Random(seed)
    pub = Publisher(
        "tcp://127.0.0.1:0",
        connection_file=False,
        heartbeat_interval=0.2,
        command_rate=1e9,
        command_burst=10**9,
        read_rate=1e9,
        read_burst=10**9,
        history_cost=1.0,
        command_cpu_share=1.0,  # the fuzz measures the gate, not the CPU budget
    ).start()
    assert pub.network, "the publisher did not bind"
    info = pub.connection_info
    assert info is not None
    key = info.key_bytes
    seeds = seed_frames(pub.session)
    pool = seeds["command"] + seeds["other"]
    small = [f for f in pool if len(f) <= 4096]
    for step in range(5):
        pub.publish_snapshot(full_snapshot(step, n_params=10))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    if info.curve_server_public:  # the connection file's keys, as a dashboard uses them
        dealer.curve_serverkey = info.curve_server_public.encode()
        dealer.curve_publickey = (info.curve_client_public or "").encode()
        dealer.curve_secretkey = (info.curve_client_secret or "").encode()
    dealer.connect(info.cmd)
    replies: collections.Counter[str] = collections.Counter()

    def drain(timeout_ms: int = 0) -> None:
        while dealer.poll(timeout_ms):
            mac, frame = dealer.recv_multipart()
            env = protocol.decode_envelope(frame)
            body = protocol.decode_body(env)
            if mac:
                assert protocol.verify(key, mac, frame), "a signed reply with a bad signature"
                assert env.session == pub.session
            else:  # the constant unsigned refusal, nothing echoed
                assert (
                    isinstance(body, Nack)
                    and body.code in ("unsigned", "bad_signature")
                    and body.command_id == ""
                )
            replies[env.kind if isinstance(body, (Ack, History)) else f"nack:{body.code}"] += 1
            timeout_ms = 0

    accepted: list[Command] = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            if i % 100 == 0:  # fresh command ids, so mutated commands get past the duplicate check
                seeds["command"] = seed_frames(pub.session)["command"]
            base = rng.choice(seeds["command"] if rng.random() < 0.8 else small)
            envelope = mutate(rng, base, pool)[:8000] if i % 20 else base
            roll = rng.random()
            if roll < resign:
                mac = protocol.sign(key, envelope)  # a key holder sending garbage: reaches the decoders
            elif roll < resign + 0.15:
                mac = mutate(rng, protocol.sign(key, envelope), pool)[:100]
            elif roll < resign + 0.25:
                mac = b""
            else:
                mac = os.urandom(rng.choice((0, 1, 32, 64, 64)))
            frames = [mac, envelope]
            shape = rng.random()
            if shape < 0.05:
                frames = [envelope]
            elif shape < 0.08:
                frames = [mac, envelope, os.urandom(rng.randrange(8))]
            elif shape < 0.09:
                frames = [mac, envelope, b"", b"", b""]
            dealer.send_multipart(frames)
            if i % 200 == 0:
                drain()
                for _peer, command in pub.poll_commands():
                    accepted.append(command)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counters = pub.counters
            if counters.commands_accepted + counters.commands_rejected >= n:
                break
            drain(20)
        drain(200)
        accepted.extend(cmd for _peer, cmd in pub.poll_commands())
        elapsed = time.perf_counter() - t0
        counters = pub.counters
        assert counters.commands_accepted + counters.commands_rejected == n, (
            f"{n} sent, {counters.commands_accepted} accepted + {counters.commands_rejected} refused"
        )
        assert set(counters.rejected) <= set(REJECT_CODES), counters.rejected
        assert counters.errors == 0, "the publisher thread hit an unexpected exception"
        for command in accepted:
            assert isinstance(command, Command) and command.session == pub.session
            assert command.action in COMMAND_ACTIONS and command.id
        assert len(accepted) + replies["history"] <= counters.commands_accepted
        # The publisher still serves: a fresh valid command is accepted, snapshots still flow.
        before = counters.commands_accepted
        fresh = seed_frames(pub.session)["command"][2]
        dealer.send_multipart([protocol.sign(key, fresh), fresh])
        deadline = time.monotonic() + 10
        while pub.counters.commands_accepted == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.counters.commands_accepted == before + 1, "the publisher stopped serving commands"
        assert pub.poll_commands()[-1][1].action == "release"
        published = pub.counters.published
        pub.publish_snapshot(full_snapshot(99, n_params=10))
        deadline = time.monotonic() + 10
        while pub.counters.published == published and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.counters.published == published + 1, "the publisher stopped publishing"
        return {
            "sent": n,
            "seconds": elapsed,
            "accepted": counters.commands_accepted,
            "rejected": dict(sorted(counters.rejected.items())),
            "replies": dict(sorted(replies.items())),
        }
    finally:
        dealer.close(linger=0)
        ctx.term()
        pub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames into the decoders")
    parser.add_argument("--socket-frames", type=int, default=20_000, help="messages into the command port")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("SIMIC_RUNTIME_DIR", tempfile.mkdtemp(prefix="simic-fuzz-"))
    t0 = time.perf_counter()
    outcomes = fuzz_decoders(args.frames, args.seed)
    elapsed = time.perf_counter() - t0
    print(f"decoders: {args.frames} frames in {elapsed:.1f} s, no crash")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {outcome:32s} {count:8d}")
    result = fuzz_socket(args.socket_frames, args.seed)
    print(f"command port: {result['sent']} messages in {result['seconds']:.1f} s, all accounted for")
    print(f"  accepted {result['accepted']}")
    for code, count in sorted(result["rejected"].items(), key=lambda kv: -kv[1]):
        print(f"  refused {code:24s} {count:8d}")
    for kind, count in sorted(result["replies"].items(), key=lambda kv: -kv[1]):
        print(f"  reply   {kind:24s} {count:8d}")
    print("publisher still serves commands and publishes: yes")


if __name__ == "__main__":
    main()
