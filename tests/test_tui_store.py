"""The dashboard's store, formatting and verdicts: bounded, honest about NaN/None, thresholds from the stream."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from simic_tui.fmt import chart, fmt_num, fmt_pct, sparkline
from simic_tui.judge import (
    Alarms,
    Verdict,
    grad_total,
    judge_entropy,
    judge_ev,
    judge_kl,
    judge_ratio_max,
    judge_ratio_min,
)
from simic_tui.replay import ReplaySource, load_recording
from simic_tui.store import TelemetryStore, flatten_snapshot
from telemetry_core.config import Thresholds
from telemetry_core.protocol import encode_envelope
from telemetry_core.schema import Anomaly, Snapshot

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from build_recording import Run  # the fixture recording's real snapshots, by index

RECORDING = Path(__file__).parent / "fixtures" / "ppo_run.simrec"


def _nan_gradients(s: Snapshot) -> bool:
    return s.gradients is not None and s.gradients.nan_count > 0


def _collapse(s: Snapshot) -> bool:
    return any(a.kind == "entropy_collapse" for a in s.anomalies)


def envelope(snap: Snapshot, seq: int, session: str = "s1"):
    from telemetry_core.protocol import decode_envelope

    return decode_envelope(encode_envelope("snapshot", snap, session=session, seq=seq, step=snap.step))


def test_ring_keeps_the_last_capacity_updates_in_order() -> None:
    run = Run()
    finite = run.find(lambda s: s.policy is not None and math.isfinite(s.policy.kl_k3_mean))[:40]
    assert len(finite) == 40
    store = TelemetryStore(capacity=16)
    for seq, k in enumerate(finite, start=1):
        store.ingest(envelope(run.snapshot(k, seq), seq), run.snapshot(k, seq))
    steps = [run.snapshot(k).step for k in finite]
    assert store.count == 40 and store.size == 16
    assert list(store.steps()) == steps[24:]
    assert list(store.steps(5)) == steps[35:]
    kl = store.series("policy.kl_k3_mean")
    assert kl.shape == (16,) and np.isfinite(kl).all()
    assert store.series("no.such.metric", 4).shape == (4,)
    assert not store.present("no.such.metric", 4).any()


def test_missing_sections_are_gaps_and_nan_is_kept_distinct() -> None:
    run = Run()
    store = TelemetryStore(capacity=8)
    full = run.snapshot(5, 1)
    store.ingest(envelope(full, 1), full)
    bare = Snapshot(step=full.step + 1, wall_time=1.0)  # a MINIMAL/OFF-like snapshot: no sections at all
    store.ingest(envelope(bare, 2), bare)
    nan = run.snapshot(run.find(_nan_gradients)[0], 3)  # the NaN-gradient update
    store.ingest(envelope(nan, 3), nan)
    present = store.present("gradients.total_norm")
    values = store.series("gradients.total_norm")
    assert list(present) == [True, False, True]
    assert math.isfinite(values[0]) and math.isnan(values[2])
    assert sparkline(values, 3, present)[1] == " "  # not measured: blank
    assert sparkline(values, 3, present)[2] == "×"  # NaN: marked
    assert math.isnan(store.series("value.explained_variance")[2])  # the NaN update's EV is NaN
    undefined = run.snapshot(6, 4)
    assert undefined.value is not None
    undefined.value.explained_variance = None  # undefined (constant returns)
    store.ingest(envelope(undefined, 4), undefined)
    assert math.isnan(store.series("value.explained_variance")[3])  # None becomes a gap, never a number


def test_older_and_duplicate_frames_are_dropped_and_gaps_counted() -> None:
    run = Run()
    store = TelemetryStore()
    for seq in (1, 2, 3, 2, 3, 7, 8):
        snap = run.snapshot(seq, seq)
        store.ingest(envelope(snap, seq), snap)
    assert store.count == 5
    assert store.counters.older_dropped == 2
    assert store.counters.missed == 3  # 4, 5 and 6 never came


def test_anomaly_log_is_bounded_and_judgements_raise_no_toasts() -> None:
    """Per-update judgements are kept (bounded) for export and DEBUG; the operator is told of
    incidents instead, which do not repeat every update (tests/test_tui_incidents.py)."""
    run = Run()
    first = run.find(_collapse)[0]  # the injected entropy collapse fires here and on every later update
    window = range(first - 3, first + 7)
    snaps = [run.snapshot(k, seq) for seq, k in enumerate(window, start=1)]
    assert not any(s.anomalies for s in snaps[:3])  # a quiet run before it
    store = TelemetryStore(anomaly_capacity=3)
    for seq, snap in enumerate(snaps, start=1):
        snap.incidents, snap.incident_events = [], []  # judgements alone
        store.ingest(envelope(snap, seq), snap)
    logged = [a for s in snaps for a in s.anomalies]
    assert store.anomaly_total == len(logged) > 3
    assert len(store.anomalies) == 3
    newest = [(a.step, a.kind, a.head) for a in reversed(logged[-3:])]
    assert [(e.anomaly.step, e.anomaly.kind, e.anomaly.head) for e in store.recent_anomalies()] == newest
    assert store.drain_events() == []


def test_rate_uses_the_injected_clock() -> None:
    now = [100.0]
    store = TelemetryStore(clock=lambda: now[0])
    run = Run()
    for k in range(20):
        now[0] += 0.1
        snap = run.snapshot(k, k + 1)
        store.ingest(envelope(snap, k + 1), snap)
    assert store.rate(window=5.0) == pytest.approx(20 / 5.0)
    now[0] += 10
    assert store.rate() == 0.0


def test_the_rate_is_the_trainers_pace_not_a_backfills_burst() -> None:
    now = [100.0]
    store = TelemetryStore(clock=lambda: now[0])
    run = Run()
    for k in range(40):  # a re-attach's history arrives at once
        snap = run.snapshot(k, k + 1)
        store.ingest(envelope(snap, k + 1), snap, quiet=True, backfill=True)
    assert store.count == 40 and store.counters.backfilled == 40 and store.rate() == 0.0
    for k in range(40, 45):
        now[0] += 0.5
        snap = run.snapshot(k, k + 1)
        store.ingest(envelope(snap, k + 1), snap)
    assert store.rate(window=5.0) == pytest.approx(5 / 5.0)


def test_the_closing_frame_ends_the_run_without_adding_a_row() -> None:
    store = TelemetryStore()
    run = Run()
    for k in range(3):
        snap = run.snapshot(k, k + 1)
        store.ingest(envelope(snap, k + 1), snap)
    last = store.latest
    assert last is not None and store.finished is None
    final = msgspec.structs.replace(last, run_state="finished")
    assert store.ingest(envelope(final, 4), final)
    assert store.count == 3 and store.latest is last and store.last_seq == 4
    assert store.finished is not None and store.finished.step == last.step
    assert len(store.series("policy.ratio_mean")) == 3
    # A new session (the trainer restarted) forgets it with the history.
    store.reset("s2")
    assert store.finished is None


def test_a_replay_of_a_run_that_ended_says_so_at_its_end_only(tmp_path: Path) -> None:
    from telemetry_core.record import Recorder

    run = Run()
    snaps = [run.snapshot(k, k + 1) for k in range(5)]
    snaps.append(msgspec.structs.replace(snaps[-1], run_state="finished"))
    path = tmp_path / "ended.simrec"
    recorder = Recorder(path, session="s1")
    for seq, snap in enumerate(snaps, 1):
        recorder.put(encode_envelope("snapshot", snap, session="s1", seq=seq, step=snap.step))
    recorder.close()
    loaded = load_recording(path)
    assert len(loaded.frames) == 5 and loaded.finished is not None  # not a position of its own
    store = TelemetryStore()
    replay = ReplaySource(loaded, store)
    replay.seek(replay.total)
    assert store.finished is not None and store.count == 5
    replay.step(-1)
    assert store.finished is None
    replay.step(+1)
    assert store.finished is not None


def test_replay_steps_back_and_forth_like_a_live_run() -> None:
    loaded = load_recording(RECORDING)
    store = TelemetryStore(capacity=50)
    replay = ReplaySource(loaded, store)
    replay.seek(len(loaded.frames))
    assert store.count == len(loaded.frames) and store.size == 50
    replay.seek(45)  # beyond the ring: rebuilt
    assert store.latest is not None and store.latest.step == loaded.frames[44][1].step
    assert list(store.steps())[-1] == store.latest.step
    replay.step(-1)  # within the ring: rolled back
    assert store.latest.step == loaded.frames[43][1].step
    assert store.count == 44
    total = store.anomaly_total
    replay.step(+1)
    assert store.count == 45
    assert store.anomaly_total >= total
    debug_step = store.latest_debug[0] if store.latest_debug else None
    assert debug_step is None or debug_step <= store.latest.step


def test_flatten_covers_every_section_and_per_head_metrics() -> None:
    run = Run()
    snap = run.snapshot(run.find(lambda s: None not in (s.episodes, s.lstm, s.advantage, s.value))[-1])
    cols = dict(flatten_snapshot(snap))
    for name in (
        "policy.entropy_normalized.force",
        "policy.kl_k3_mean",
        "value.explained_variance",
        "gradients.total_norm",
        "gradients.group_norms.lstm",
        "lstm.gate_saturation.forget",
        "advantage.raw.skew",
        "advantage.returns.p90",
        "episodes.return_mean",
    ):
        assert name in cols, name


def test_every_row_holds_its_own_snapshots_columns_as_they_change_and_grow() -> None:
    """Rows whose column sets change (sections missing, per-head keys appearing, the ring widening
    past its initial columns) each hold exactly their snapshot's values: checked cell by cell
    against ``flatten_snapshot`` in float64."""
    run = Run()
    store = TelemetryStore(capacity=16)
    expected: list[dict[str, float]] = []
    for k in range(12):
        snap = run.snapshot(k, k + 1)
        if k % 3 == 1:
            snap = Snapshot(step=snap.step, wall_time=1.0)  # no sections at all
        elif k >= 6:  # new per-head keys each update: 40 more columns each, past the initial width
            assert snap.policy is not None
            snap.policy.entropy = {**snap.policy.entropy, **{f"h{k}_{i}": i / 7 for i in range(40)}}
        store.ingest(envelope(snap, k + 1), snap)
        expected.append(dict(flatten_snapshot(snap)))
    assert len(store.columns) > 160
    for name in store.columns:
        values, present = store.series(name), store.present(name)
        for row, cols in enumerate(expected):
            assert bool(present[row]) == (name in cols), (name, row)
            if name in cols:
                assert np.float64(values[row]) == np.float64(cols[name]) or (
                    math.isnan(values[row]) and math.isnan(cols[name])
                ), (name, row)
            else:
                assert math.isnan(values[row]), (name, row)


def test_formatting_is_honest() -> None:
    assert fmt_num(None) == "—"
    assert fmt_num(math.nan) == "NaN"
    assert fmt_num(math.inf) == "inf" and fmt_num(-math.inf) == "-inf"
    assert fmt_num(0.0) == "0"
    assert fmt_num(0.012345) == "0.0123"
    assert fmt_num(12345678.0) == "1.2e7"
    assert fmt_num(3e-6) == "3.0e-6"
    assert fmt_pct(0.123) == "12%" and fmt_pct(None) == "—"
    rows, lo, hi = chart(np.array([0.0, 1.0, math.nan, 2.0]), 4, 2, marks={1.5: "limit"})
    assert len(rows) == 2 and all(len(r) == 4 for r in rows)
    assert rows[1][2] == "×" and lo == 0.0 and hi == 2.0


def test_verdicts_follow_the_thresholds_in_the_stream() -> None:
    """Change a threshold and the verdict changes: the dashboard has no numbers of its own."""
    thr = Thresholds()
    assert judge_entropy(thr, "force", 0.05) == Verdict.CRIT
    assert judge_entropy(thr, "force", 0.15) == Verdict.WARN
    assert judge_entropy(thr, "force", 0.5) == Verdict.OK
    assert judge_entropy(thr, "force", None) == Verdict.NA
    assert judge_entropy(thr, "force", math.nan) == Verdict.CRIT
    lenient = dataclasses.replace(thr, entropy_collapse_per_head={"force": 0.01}, entropy_warning=0.02)
    assert judge_entropy(lenient, "force", 0.05) == Verdict.OK
    assert judge_kl(thr, 0.06) == Verdict.WARN and judge_kl(thr, thr.kl_spike_critical * 1.1) == Verdict.CRIT
    assert (
        judge_kl(dataclasses.replace(thr, kl_spike_warning=0.1, kl_spike_critical=0.3), 0.2) == Verdict.WARN
    )
    run = Run()
    snap = run.snapshot(run.find(lambda s: s.phase == "late")[0])  # late phase: limit ev_late
    assert judge_ev(thr, snap, thr.ev_late - 0.01) == Verdict.WARN
    assert judge_ev(thr, snap, thr.ev_late + 0.01) == Verdict.OK
    cap = snap.gradients.max_grad_norm
    assert grad_total(thr, snap, cap * thr.grad_total_exploding_critical_rel * 1.01) == Verdict.CRIT
    assert grad_total(thr, snap, cap * thr.grad_total_exploding_rel * 1.01) == Verdict.WARN
    assert grad_total(thr, snap, cap * thr.grad_total_vanishing_rel * 0.5) == Verdict.WARN
    assert grad_total(thr, snap, cap) == Verdict.OK


def test_ratio_colours_are_the_detectors_limits_and_nan_is_not_named_an_alarm() -> None:
    """Yellow exactly where the detector warns, red where it is critical: a healthy max ratio of 2
    is no colour; a NaN is red but is not called a SPIKE or an EXPLOSION (it is numerical instability)."""
    thr = Thresholds()
    assert judge_ratio_max(thr, 2.0) == Verdict.OK
    assert judge_ratio_max(thr, thr.ratio_explosion * 1.01) == Verdict.WARN
    assert judge_ratio_max(thr, thr.ratio_explosion_critical * 1.01) == Verdict.CRIT
    assert judge_ratio_min(thr, 0.46) == Verdict.OK
    assert judge_ratio_min(thr, thr.ratio_collapse * 0.99) == Verdict.WARN
    assert judge_ratio_min(thr, thr.ratio_collapse_critical * 0.99) == Verdict.CRIT
    moved = dataclasses.replace(thr, ratio_explosion=1.5)
    assert judge_ratio_max(moved, 2.0) == Verdict.WARN
    assert judge_ratio_max(thr, math.nan) == Verdict.CRIT
    # on screen, a word needs an incident: a NaN is never called an EXPLOSION
    from telemetry_core.schema import Incident

    alarms = Alarms([Incident(id=1, kind="ratio_explosion", severity="critical")])
    assert (
        alarms.mark(
            judge_ratio_max(thr, math.nan), ("ratio_explosion",), value=math.nan, word="EXPLOSION"
        ).word
        == ""
    )
    assert (
        alarms.mark(
            judge_ratio_max(thr, math.inf), ("ratio_explosion",), value=math.inf, word="EXPLOSION"
        ).word
        == ""
    )
    assert (
        alarms.mark(judge_ratio_max(thr, 25.0), ("ratio_explosion",), value=25.0, word="EXPLOSION").word
        == "EXPLOSION"
    )
    assert (
        Alarms().mark(judge_ratio_max(thr, 25.0), ("ratio_explosion",), value=25.0, word="EXPLOSION").word
        == ""
    )


def test_bad_bytes_never_raise_from_the_store() -> None:
    store = TelemetryStore()
    for data in (
        b"",
        b"\x80\x04junk",
        b"\x00" * 10,
        encode_envelope(
            "snapshot",
            Anomaly(kind="x", severity="y", step=1, message="", action=""),
            session="s",
            seq=1,
            step=1,
        ),
    ):
        assert store.ingest_bytes(data) is None
    assert store.counters.bad_frames == 4
    assert store.count == 0
