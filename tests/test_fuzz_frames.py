"""Seeded fuzzing of the frame decoders and the live command port (the fuzzer is
benchmarks/fuzz_frames.py, which runs 100,000 frames; here a fast share of it).

Invariants: the decoders raise only ``FrameError`` or return the Struct the kind names; every
message into the command port is accepted or refused with a code; the publisher keeps serving.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from fuzz_frames import check_decoders, fuzz_decoders, fuzz_socket, mutate, seed_frames  # noqa: E402

from telemetry_core import protocol  # noqa: E402


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(path))


def test_seed_frames_are_valid_before_mutation() -> None:
    seeds = seed_frames()
    for frame in seeds["command"]:
        assert check_decoders(frame) == "decoded:command"
    outcomes = [check_decoders(frame) for frame in seeds["other"]]
    assert outcomes[:7] == ["decoded:snapshot"] * 3 + [
        "decoded:heartbeat",
        "decoded:ack",
        "decoded:nack",
        "decoded:history",
    ]
    assert outcomes[7:] == ["refused:malformed"] * 2  # the pickles


@pytest.mark.parametrize("seed", [0, 1])
def test_ten_thousand_mutated_frames_never_crash_the_decoders(seed: int) -> None:
    outcomes = fuzz_decoders(10_000, seed)
    assert sum(outcomes.values()) == 10_000
    # The fuzzer must reach every stage: refusals of several kinds and decoded Structs of every kind.
    refused = {k.split(":", 1)[1] for k in outcomes if k.startswith("refused")}
    decoded = {k.split(":", 1)[1] for k in outcomes if k.startswith("decoded")}
    assert {"malformed", "empty", "bad_magic", "incompatible", "unknown_kind"} <= refused
    assert decoded == {"command", "snapshot", "heartbeat", "ack", "nack", "history"}
    assert outcomes["refused-body:malformed"] > 0, "no mutation reached the body decoder"


def test_mutations_cover_every_operation() -> None:
    rng = random.Random(3)
    seeds = seed_frames()
    pool = seeds["command"] + seeds["other"]
    base = seeds["command"][0]
    lengths = set()
    swapped = 0
    for _ in range(2000):
        frame = mutate(rng, base, pool)
        lengths.add((len(frame) > len(base)) - (len(frame) < len(base)))
        try:
            obj = msgspec.msgpack.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            continue
        swapped += isinstance(obj, dict) and frame != base
    assert lengths == {-1, 0, 1}  # shorter, same length, longer
    assert swapped > 100  # structured (type-swap) mutations that still parse as msgpack


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91" * 5000 + b"\xc0",  # deep nesting at the top level
        b"\x81\xa5magic\xa2\xff\xfe",  # invalid UTF-8 (used to raise UnicodeDecodeError)
        b"\xdb\xff\xff\xff\xf0abc",  # a string claiming 4 GB
        b"\xdd\xff\xff\xff\xf0",  # an array claiming 4 billion items
        b"\x80",  # empty map (also a pickle PROTO byte)
        b"",
    ],
)
def test_known_nasty_frames_are_refused_as_frame_errors(frame: bytes) -> None:
    with pytest.raises(protocol.FrameError):
        protocol.decode_envelope(frame)


def test_deeply_nested_body_is_refused_not_crashed() -> None:
    env = msgspec.msgpack.encode(
        {
            "magic": "SIMIC",
            "major": 1,
            "minor": 0,
            "session": "s",
            "seq": 1,
            "step": 1,
            "wall_time": 0.0,
            "kind": "snapshot",
            "body": msgspec.Raw(b"\x91" * 3000 + b"\xc0"),
        }
    )
    with pytest.raises(protocol.FrameError, match="nested too deeply"):
        protocol.decode_envelope(env)


def test_ten_thousand_fuzzed_messages_into_the_command_port() -> None:
    result = fuzz_socket(10_000, seed=7)
    assert result["sent"] == 10_000
    rejected = result["rejected"]
    # Refusals at every layer: before auth, at auth, in the decoders and in the checks.
    assert {"frame_count", "unsigned", "bad_signature", "malformed", "duplicate"} <= set(rejected)
    assert result["accepted"] + sum(rejected.values()) == 10_000
    assert result["accepted"] > 0, "no mutated command survived: the fuzzer is too blunt"
