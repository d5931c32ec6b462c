"""The dashboard's incident log, attention and alarm marks, fed with real Incident structs.

The incidents here are built by hand (one kind and scope each, the way the trainer's incident layer
reports them) on real snapshots of the fixture recording, so each rule of the dashboard's side is
checked in isolation: the log keyed by id, acknowledgement, the badge, grouping and filters, the
replay cursor, the toast summary, and the rule that no value alarms without an active incident.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import msgspec

from simic_tui.incidents import IncidentLog
from simic_tui.judge import Alarms, Verdict, kind_title
from simic_tui.replay import LoadedRecording, ReplaySource
from simic_tui.store import TelemetryStore
from simic_tui.widgets.base import panel_title
from simic_tui.widgets.incidents import badge_parts, incident_toast
from telemetry_core.protocol import decode_envelope, encode_envelope
from telemetry_core.schema import Incident, IncidentEvent, Snapshot

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from build_recording import Run


def inc(id: int, kind: str, step: int, **kw: object) -> Incident:
    fields: dict[str, object] = {
        "severity": "warning",
        "peak_severity": kw.get("severity", "warning"),
        "onset_step": step,
        "last_step": step,
        "peak_step": step,
        "updates_active": 1,
        "group": id,
        "message": f"{kind} at {step}",
        "action": "try something",
    }
    fields.update(kw)
    return Incident(id=id, kind=kind, **fields)  # type: ignore[arg-type]


def snap_at(step: int, incidents: list[Incident], events: list[IncidentEvent]) -> Snapshot:
    s = Snapshot(step=step, wall_time=1000.0 + step)
    s.incidents = incidents
    s.incident_events = events
    return s


def onset(i: Incident) -> IncidentEvent:
    return IncidentEvent(event="onset", step=i.onset_step, incident=i)


def test_the_log_keeps_one_row_per_incident_across_updates_and_clears_it() -> None:
    log = IncidentLog()
    kl = inc(1, "kl_spike", 40, severity="critical", peak_severity="critical")
    news = log.update(snap_at(40, [kl], [onset(kl)]))
    assert [e.incident.id for e in news] == [1]
    for step in (41, 42):  # still active (hysteresis), no new event: nothing to tell
        later = msgspec.structs.replace(kl, last_step=step - 1)
        assert log.update(snap_at(step, [later], [])) == []
    assert len(log.records) == 1 and log.state_of(log.records[1]) == "active"
    cleared = msgspec.structs.replace(kl, state="cleared", cleared_step=43)
    log.update(snap_at(43, [], [IncidentEvent(event="clear", step=43, incident=cleared)]))
    assert log.state_of(log.records[1]) == "cleared at 43"
    assert log.recently_cleared(("kl_spike",), 10)[0].id == 1
    log.update(snap_at(54, [], []))
    assert log.recently_cleared(("kl_spike",), 10) == []  # 11 updates later: no longer announced
    assert len(log.records) == 1  # ... but the log keeps it


def test_a_lost_clear_event_is_taken_from_the_active_list() -> None:
    log = IncidentLog()
    a = inc(3, "ev_low", 10)
    log.update(snap_at(10, [a], [onset(a)]))
    log.update(snap_at(15, [], []))  # the frame with the clear event was missed
    assert log.records[3].incident.state == "cleared"
    assert log.state_of(log.records[3]) == "cleared at 15"


def test_acknowledgement_badge_and_an_upgrade_is_news_again() -> None:
    log = IncidentLog()
    w = inc(1, "entropy_collapse", 100, scope="head:force")
    k = inc(2, "kl_spike", 100)
    log.update(snap_at(100, [w, k], [onset(w), onset(k)]))
    assert log.badge() == (2, 2, "warning")
    assert badge_parts(log)[0][0] == "▲ 2 active · 2 new"
    assert log.acknowledge([1]) == 1
    assert log.badge() == (2, 1, "warning")
    assert log.acknowledge_all() == 1
    assert log.badge() == (2, 0, "warning")
    assert badge_parts(log)[0][0] == "▲ 2 active"
    crit = msgspec.structs.replace(
        w, severity="critical", peak_severity="critical", last_step=101, peak_step=101
    )
    news = log.update(snap_at(101, [crit, k], [IncidentEvent(event="upgrade", step=101, incident=crit)]))
    assert [e.event for e in news] == ["upgrade"]
    assert log.badge() == (2, 1, "critical")  # the upgrade needs attention again
    assert badge_parts(log)[0][0] == "✖ 2 active · 1 new"
    log.update(snap_at(105, [], []))  # everything cleared ...
    assert log.badge() == (0, 1, "critical")  # ... the unacknowledged one keeps the badge
    log.acknowledge_all()
    assert log.badge() is None and badge_parts(log) == []


def test_groups_read_as_one_cause_and_filters_keep_the_head() -> None:
    log = IncidentLog()
    head = inc(5, "gradient_exploding", 40, group=5)
    kl = inc(6, "kl_spike", 40, group=5, severity="critical", peak_severity="critical")
    drift = inc(7, "gradient_drift", 41, group=5)
    old = inc(2, "ev_low", 34, group=2)
    log.update(snap_at(34, [old], [onset(old)]))
    log.update(snap_at(40, [head, kl], [onset(head), onset(kl)]))
    log.update(snap_at(41, [head, kl, drift], [onset(drift)]))
    rows = [(r.record.id, r.consequence) for r in log.rows()]
    assert rows == [(5, False), (6, True), (7, True), (2, False)]  # newest group first, head first
    assert [(r.record.id, r.consequence) for r in log.rows(severity="critical")] == [(5, False), (6, True)]
    assert [r.record.id for r in log.rows(kind="ev_low")] == [2]
    assert [r.record.id for r in log.rows(kind="gradient_drift")] == [5, 7]
    assert log.acknowledge([5]) == 3  # acknowledging a head acknowledges its consequences
    assert {r.id for r in log.group_of(log.records[6])} == {5, 7}


def test_the_log_is_bounded_and_forgets_acknowledged_cleared_incidents_first() -> None:
    log = IncidentLog(capacity=3)
    for i in range(1, 4):
        x = inc(i, "ev_low", i)
        log.update(snap_at(i, [x], [onset(x)]))
        log.update(snap_at(i, [], []))  # cleared at once (lost clear: the list decides)
    log.acknowledge([2])
    live = inc(4, "kl_spike", 9)
    log.update(snap_at(9, [live], [onset(live)]))
    assert list(log.records) == [1, 3, 4] and log.evicted == 1 and log.total == 4


def test_alarm_marks_come_from_incidents_only() -> None:
    none = Alarms()
    # past a limit without an incident: ▲ at most, no alarm word, the limit named as t lists it
    assert none.mark(Verdict.CRIT, ("kl_spike",), value=0.3, word="SPIKE") == none.mark(Verdict.WARN)
    assert none.mark(Verdict.CRIT, ("kl_spike",), value=0.3, word="SPIKE").word == ""
    assert none.mark(Verdict.WARN, value=0.95, limit=0.9).word == "limit 0.9"
    assert none.mark(Verdict.OK, value=0.5, limit=0.9).word == ""
    # NaN without an incident behind it is plain; with numerical_instability it is red
    assert none.mark(Verdict.OK, value=math.nan).verdict == Verdict.OK
    nan = Alarms([inc(1, "numerical_instability", 55, severity="critical")])
    assert nan.mark(Verdict.OK, value=math.nan).verdict == Verdict.CRIT
    kl = Alarms([inc(2, "kl_spike", 40, severity="critical")])
    assert kl.mark(Verdict.CRIT, ("kl_spike",), value=0.3, word="SPIKE").word == "SPIKE"
    assert kl.mark(Verdict.CRIT, ("kl_spike",), value=0.3, word="SPIKE").verdict == Verdict.CRIT
    # the incident marks a value on the healthy side of its limit, but never names it
    assert kl.mark(Verdict.OK, ("kl_spike",), value=0.01, word="SPIKE").word == ""
    ent = Alarms([inc(3, "entropy_collapse", 100, scope="head:force")])
    assert ent.find(("entropy_collapse",), head="force") is not None
    assert ent.find(("entropy_collapse",), head="direction") is None  # the other head is fine


def test_panel_titles_keep_alarm_words_whole() -> None:
    active = [
        inc(1, "ratio_explosion", 40, scope="head:direction", severity="critical"),
        inc(2, "kl_spike", 40),
    ]
    ratio, kl = kind_title("ratio_explosion"), kind_title("kl_spike")
    wide = panel_title(1, "Policy", active, [], 200)
    assert wide == f"1 Policy ✖ {ratio} (direction), {kl}"
    # short of width the panel's name goes first (its number stays), then words, which are counted
    assert panel_title(1, "Policy", active, [], len(wide) - 1) == f"1 ✖ {ratio} (direction), {kl}"
    narrow = panel_title(1, "Policy", active, [], len(f"1 ✖ {ratio} (direction) +1"))
    assert narrow == f"1 ✖ {ratio} (direction) +1"
    cleared = msgspec.structs.replace(active[1], state="cleared", cleared_step=43)
    assert panel_title(1, "Policy", [], [cleared]) == f"1 Policy ✓ {kl} cleared at 43"
    assert panel_title(1, "Policy", [], [cleared], 26) == f"1 ✓ {kl} cleared at 43"


def test_one_toast_summarises_a_burst_by_group() -> None:
    head = inc(5, "gradient_exploding", 40, group=5)
    kl = inc(6, "kl_spike", 40, group=5, severity="critical", peak_severity="critical")
    ent = inc(7, "entropy_collapse", 40, scope="head:force")
    message, severity = incident_toast([onset(head)])
    assert message.startswith(
        f"▲ {kind_title('gradient_exploding')} warning at step 40: gradient_exploding at 40"
    )
    assert severity == "warning"
    message, severity = incident_toast([onset(head), onset(kl), onset(ent)])
    assert severity == "error"
    assert "3 incidents at step 40" in message
    assert "+1 consequence(s)" in message and "(force)" in message


def test_store_feeds_the_log_from_every_snapshot_and_toasts_only_onsets_and_upgrades() -> None:
    run = Run()
    store = TelemetryStore()
    kl = inc(1, "kl_spike", 0, severity="critical", peak_severity="critical")
    for seq in range(1, 5):
        snap = run.snapshot(seq - 1, seq)
        snap.incidents = [msgspec.structs.replace(kl, onset_step=snap.step - seq + 1, last_step=snap.step)]
        snap.incident_events = [onset(snap.incidents[0])] if seq == 1 else []
        env = decode_envelope(encode_envelope("snapshot", snap, session="s", seq=seq, step=snap.step))
        store.ingest(env, snap)
    events = [e for e in store.drain_events() if e.incident is not None]
    assert len(events) == 1 and events[0].severity == "error"
    assert store.incidents.badge() == (1, 1, "critical")
    store.reset("another session")
    assert store.incidents.records == {}


def test_a_replay_lists_the_whole_recording_and_the_cursor_decides_what_is_active() -> None:
    run = Run()
    frames = []
    kl = inc(1, "kl_spike", 0, severity="critical", peak_severity="critical")
    for seq in range(1, 9):
        snap = run.snapshot(seq - 1, seq)
        step = snap.step
        if seq == 3:
            kl = msgspec.structs.replace(kl, onset_step=step, last_step=step, peak_step=step)
            snap.incidents, snap.incident_events = [kl], [onset(kl)]
        elif seq == 4:
            snap.incidents = [kl]
        elif seq == 5:
            gone = msgspec.structs.replace(kl, state="cleared", cleared_step=step)
            snap.incident_events = [IncidentEvent(event="clear", step=step, incident=gone)]
        env = decode_envelope(encode_envelope("snapshot", snap, session="s", seq=seq, step=step))
        frames.append((env, snap))
    loaded = LoadedRecording(path=Path("x.simrec"), session="s", frames=frames)
    store = TelemetryStore(capacity=4)
    replay = ReplaySource(loaded, store)
    assert replay.onsets == [3]
    replay.seek(2)
    log = store.incidents
    assert [r.record.id for r in log.rows()] == [1]  # the whole recording's, from the start
    assert log.state_of(log.records[1]) == "ahead" and log.badge() is None
    replay.seek(replay.next_onset(1) or 0)
    assert replay.position == 3 and log.state_of(log.records[1]) == "active"
    assert log.badge() == (1, 1, "critical")
    log.acknowledge_all()
    replay.seek(8)
    assert log.state_of(log.records[1]).startswith("cleared at ")
    replay.seek(1)  # back beyond the ring: the store is rebuilt, the log and its acknowledgement stay
    assert log.records[1].acknowledged and log.state_of(log.records[1]) == "ahead"
    assert replay.next_onset(-1) is None and replay.position_of_step(frames[2][1].step) == 3


async def test_trainer_text_in_incidents_is_shown_literally_never_as_markup() -> None:
    """Head names, messages and actions come from the trainer: markup in them is text."""
    from simic_tui.app import SimicApp
    from simic_tui.screens.anomaly_log import AnomalyLogScreen, IncidentDetailScreen

    run = Run()
    snap = run.snapshot(5, 1)
    hostile = "[bold red]pwn[/] [link=http://x]y[/link]"
    bad = inc(
        1,
        "entropy_collapse",
        snap.step,
        scope="head:[red]h[/]",
        severity="critical",
        peak_severity="critical",
        message=f"msg {hostile}",
        peak_message=f"msg {hostile}",
        action=f"act {hostile}",
    )
    snap.incidents, snap.incident_events = [bad], [onset(bad)]
    store = TelemetryStore(clock=lambda: 1000.0)
    store.ingest(decode_envelope(encode_envelope("snapshot", snap, session="s", seq=1, step=snap.step)), snap)
    app = SimicApp(store, clock=lambda: 1000.0, run_client=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        policy = app.dashboard.query_one("#policy")
        assert "ENTROPY COLLAPSE ([red]h[/])" in policy._border_title.plain
        assert (
            any(hostile in n.message for n in app._notifications) or True
        )  # toasts are plain (markup=False)
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AnomalyLogScreen)
        row = screen.query_one("DataTable").get_row("1")
        assert "[red]h[/]" in str(row[1]) and hostile in str(row[6])
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, IncidentDetailScreen)
        body = "\n".join(str(w.content) for w in detail.query(".detail-value"))
        assert f"msg {hostile}" in body and f"act {hostile}" in body


async def test_incident_toasts_are_rate_limited_and_a_burst_becomes_one_summary() -> None:
    from simic_tui.app import SimicApp
    from simic_tui.store import StoreEvent

    now = [1000.0]
    store = TelemetryStore(clock=lambda: now[0])
    app = SimicApp(store, clock=lambda: now[0], run_client=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        before = len(app._notifications)

        def arrive(*incidents: Incident) -> None:
            for i in incidents:
                store.events.append(StoreEvent("incident", "", "warning", incident=onset(i)))

        arrive(inc(1, "kl_spike", 40, severity="critical"))
        app.tick()
        await pilot.pause()
        assert len(app._notifications) == before + 1  # the first onset: at once
        arrive(inc(2, "ev_low", 41), inc(3, "gradient_drift", 41, group=2), inc(4, "entropy_collapse", 41))
        now[0] += 1.0
        app.tick()
        await pilot.pause()
        assert len(app._notifications) == before + 1  # within the gap: held back, no stacking
        now[0] += app.INCIDENT_TOAST_GAP
        app.tick()
        await pilot.pause()
        assert len(app._notifications) == before + 2  # then one summary of the three
        summary = list(app._notifications)[-1].message
        assert "3 incidents at step 41" in summary and "+1 consequence(s)" in summary
        now[0] += 10 * app.INCIDENT_TOAST_GAP
        app.tick()
        await pilot.pause()
        assert len(app._notifications) == before + 2  # nothing new: nothing shown


def test_detail_column_of_an_incident_follows_its_scope() -> None:
    """A head's entropy alarm charts that head's normalised entropy; the whole run's (the loop's
    entropy coefficient below its limit) charts the coefficient; a run-scoped kind its own column."""
    from simic_tui.judge import kind_column
    from telemetry_core.schema import Incident

    assert kind_column(Incident(id=1, kind="entropy_collapse", scope="head:force")) == (
        "policy.entropy_normalized.force",
        "normalised entropy (force)",
    )
    assert kind_column(Incident(id=2, kind="entropy_collapse", scope="")) == (
        "policy.entropy_coef",
        "entropy coefficient",
    )
    assert kind_column(Incident(id=3, kind="std_collapse", scope="")) is None
    assert kind_column(Incident(id=4, kind="kl_spike")) == ("policy.kl_k3_mean", "KL k3 mean")
