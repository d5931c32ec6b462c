"""The sanitizer's fast check sees every string the cleaning walk cleans, wherever a hostile one sits.

:func:`simic_tui.sanitize.sanitize` returns a frame untouched when the strings its generated
collectors gather are all clean. That is safe only if the collectors reach every string of the
frame: checked here against an independent reflective walk on real snapshots (every statistics
Struct, DEBUG reports, ranks, incidents, continuous heads), and by planting a hostile string at every
single string position (field, list item, dict key and value) and requiring the result clean and
equal to what the full cleaning walk makes of it.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from simic_tui import sanitize as sanitize_module
from simic_tui.sanitize import MAX_CHARS, sanitize
from telemetry_core.protocol import decode_envelope, encode_envelope
from telemetry_core.record import read_updates
from telemetry_core.schema import Envelope, Snapshot

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "benchmarks", ROOT / "tests" / "fixtures"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from bench_transport import full_snapshot  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
HOSTILE = "\x1b]0;owned\x07\x1b[2J\u202eevil\tname\n" + "x" * (2 * MAX_CHARS)


def _snapshots() -> list[Snapshot]:
    snaps = [full_snapshot(debug=True), full_snapshot(debug=False, seed=3)]
    for name in ("ppo_run.simrec", "ranks_run.simrec", "continuous_run.simrec"):
        updates = read_updates(FIXTURES / name)
        # the richest updates of each recording: most strings (DEBUG reports, incidents, ranks)
        snaps.extend(sorted(updates, key=lambda s: -len(_positions(s)))[:3])
    return snaps


def _positions(obj: Any) -> list[tuple[Any, str, Any]]:
    """Every place a string sits, in a fixed order: (container, 'attr' | 'item' | 'key' | 'value', where)."""
    out: list[tuple[Any, str, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, msgspec.Struct):
            for name in value.__struct_fields__:
                v = getattr(value, name)
                if isinstance(v, str):
                    out.append((value, "attr", name))
                else:
                    walk(v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, str):
                    out.append((value, "item", i))
                else:
                    walk(v)
        elif isinstance(value, dict):
            for k, v in list(value.items()):
                if isinstance(k, str):
                    out.append((value, "key", k))
                if isinstance(v, str):
                    out.append((value, "value", k))
                else:
                    walk(v)

    walk(obj)
    return out


def _strings(obj: Any) -> Iterator[str]:
    for container, kind, where in _positions(obj):
        if kind == "attr":
            yield getattr(container, where)
        elif kind in ("item", "value"):
            yield container[where]
        else:
            yield where


def _plant(container: Any, kind: str, where: Any) -> None:
    if kind == "attr":
        setattr(container, where, HOSTILE)
    elif kind in ("item", "value"):
        container[where] = HOSTILE
    else:  # a key: the same value under a hostile key, the mapping's order kept
        items = [(HOSTILE if k == where else k, v) for k, v in container.items()]
        container.clear()
        container.update(items)


def _copy(snap: Snapshot) -> Snapshot:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=Snapshot)


@pytest.fixture(scope="module")
def snapshots() -> list[Snapshot]:
    return _snapshots()


def test_the_collectors_gather_every_string_of_real_frames(snapshots: list[Snapshot]) -> None:
    envelope = decode_envelope(encode_envelope("snapshot", snapshots[0], session="s" * 32, seq=1, step=1))
    for obj in [*snapshots, envelope]:
        collect = sanitize_module._collector(type(obj))
        assert collect is not None
        gathered: list[str] = []
        collect(obj, gathered)
        expected = list(_strings(obj))
        assert len(expected) >= (3 if isinstance(obj, Envelope) else 20)  # the frames do carry text
        assert collections.Counter(gathered) == collections.Counter(expected)


def test_a_hostile_string_anywhere_is_cleaned_as_the_full_walk_cleans_it(snapshots: list[Snapshot]) -> None:
    clean_walk = sanitize_module._cleaner(Snapshot)
    assert clean_walk is not None
    planted = 0
    # a full DEBUG snapshot, and the richest update of each recording (recurrent, ranks, continuous)
    for snap in (snapshots[0], snapshots[2], snapshots[5], snapshots[8]):
        n = len(_positions(snap))
        for i in range(n):
            fast, full = _copy(snap), _copy(snap)
            _plant(*_positions(fast)[i])
            _plant(*_positions(full)[i])
            assert HOSTILE in list(_strings(fast))
            fast = sanitize(fast)
            full = clean_walk(full)
            # (compared encoded: NaN statistics are unequal to themselves)
            assert msgspec.msgpack.encode(fast) == msgspec.msgpack.encode(full), f"position {i} of {n}"
            for text in _strings(fast):
                assert text.isprintable() and len(text) <= MAX_CHARS, repr(text[:40])
            planted += 1
    assert planted > 200


def test_clean_frames_come_back_as_they_are(snapshots: list[Snapshot]) -> None:
    for snap in snapshots:
        before = _copy(snap)
        assert sanitize(snap) is snap
        assert msgspec.msgpack.encode(snap) == msgspec.msgpack.encode(before)
