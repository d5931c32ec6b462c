"""``simic-tui compare``: recordings of real demo runs with different injections, side by side.

The fixtures (tests/fixtures/cmp_*.simrec, built by tests/fixtures/build_compare_recordings.py) are
real 40-update demo runs. Every number the screen shows is checked against a float64 reference
computed here straight from the decoded snapshots; incidents are found by content (their onset
events in the recording), never by index. Snapshots pin the screen with two and four runs at 80x24
and 160x48; regenerate with ``pytest tests/test_compare.py --snapshot-update``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from simic_tui.compare import (
    MAX_RUNS,
    align,
    bucket,
    build_comparison,
    load_runs,
    scaled_spark,
)
from simic_tui.replay import ReplayError, load_recording
from simic_tui.screens.compare import CompareApp, CompareScreen, chart_lines
from telemetry_core.protocol import encode_envelope
from telemetry_core.record import RecordWriter, read_recording
from telemetry_core.schema import Snapshot

FIXTURES = Path(__file__).parent / "fixtures"
HEALTHY = FIXTURES / "cmp_healthy.simrec"
KLSPIKE = FIXTURES / "cmp_klspike.simrec"
ENTROPY = FIXTURES / "cmp_entropy.simrec"
NANGRAD = FIXTURES / "cmp_nangrad.simrec"
FOUR = [HEALTHY, KLSPIKE, ENTROPY, NANGRAD]
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


def snaps(path: Path) -> list[Snapshot]:
    return [s for _, s in load_recording(path).frames]


def onsets(path: Path) -> dict[tuple[str, str], int]:
    """(kind, scope) -> first onset step, from the recording's own incident events."""
    out: dict[tuple[str, str], int] = {}
    for s in snaps(path):
        for e in s.incident_events:
            if e.event == "onset":
                out.setdefault((e.incident.kind, e.incident.scope), e.step)
    return out


# ---------------------------------------------------------------------------------------------
# The comparison's numbers
# ---------------------------------------------------------------------------------------------


def test_summary_matches_a_float64_reference_from_the_snapshots() -> None:
    runs = load_runs(FOUR)
    c = build_comparison(runs)
    for path, run, summary in zip(FOUR, runs, c.summaries):
        frames = snaps(path)
        returns = [s.episodes.return_mean for s in frames if s.episodes is not None and s.episodes.count > 0]
        assert summary.updates == len(frames)
        assert summary.final_return == returns[-1]
        assert summary.best_return == max(returns)
        assert summary.debug_updates == sum(s.level.level == "DEBUG" for s in frames)
        assert summary.debug_seconds == frames[-1].level.debug_seconds
        assert run.name == frames[-1].run.name
        kinds: dict[str, set[int]] = {}
        for s in frames:
            for inc in [*s.incidents, *(e.incident for e in s.incident_events)]:
                kinds.setdefault(inc.kind, set()).add(inc.id)
        assert summary.incidents_by_kind == {k: len(v) for k, v in sorted(kinds.items())}
        # the series are the snapshots' numbers, in float64, NaN where undefined
        kl = np.array([s.policy.kl_k3_mean for s in frames], dtype=np.float64)
        np.testing.assert_array_equal(run.series["KL k3"], kl)
        ev = np.array(
            [np.nan if s.value.explained_variance is None else s.value.explained_variance for s in frames]
        )
        np.testing.assert_array_equal(run.series["explained var"], ev)
        env = np.cumsum([float(s.advantage.raw.count) for s in frames])
        np.testing.assert_array_equal(run.env_steps, env)


def test_the_incident_diff_names_what_only_some_runs_had_and_when() -> None:
    c = build_comparison(load_runs(FOUR))
    per_run = [onsets(p) for p in FOUR]
    assert ("kl_spike", "") in per_run[1], "the kl-spike run must have a kl_spike incident"
    assert any(k == "numerical_instability" for k, _ in per_run[3]), "the NaN run must be non-finite"
    every = set.intersection(*(set(o) for o in per_run))
    listed = {(d.kind, d.scope) for d in c.diffs}
    assert listed == set().union(*(set(o) for o in per_run)) - every
    for d in c.diffs:
        for i, o in enumerate(per_run):
            key = (d.kind, d.scope)
            if key in o:
                assert d.onsets[i][0] == o[key]
            else:
                assert i in d.missing
    # the healthy run's first critical incident is none; the injected ones name theirs
    assert c.summaries[0].first_critical is None or c.summaries[0].first_critical.peak_severity == "critical"
    kl = c.summaries[1].first_critical
    assert kl is not None and kl.peak_severity == "critical"


def test_runs_are_compared_on_what_they_share_and_the_rest_is_named(tmp_path: Path) -> None:
    """A run whose second head is called differently (a different action space): the charts keep the
    shared head and say which head was left out; a different threshold is listed."""
    rec = read_recording(KLSPIKE)
    out = tmp_path / "renamed.simrec"
    with RecordWriter(out, session=rec.session) as w:
        for env, snap in load_recording(KLSPIKE).frames:
            pol = snap.policy
            if pol is not None:
                pol.entropy_normalized = {
                    ("throttle" if k == "force" else k): v for k, v in pol.entropy_normalized.items()
                }
            snap.run.heads = {("throttle" if k == "force" else k): n for k, n in snap.run.heads.items()}
            snap.thresholds = dataclasses.replace(snap.thresholds, kl_spike_critical=0.9)
            w.write(
                encode_envelope(
                    "snapshot", snap, session=env.session, seq=env.seq, step=env.step, wall_time=env.wall_time
                )
            )
    c = build_comparison(load_runs([HEALTHY, out]))
    shared = {n for _, names in c.shared for n in names}
    assert "entropy/log|A|[direction]" in shared
    assert "entropy/log|A|[force]" not in shared and "entropy/log|A|[throttle]" not in shared
    assert ("entropy/log|A|[force]", (0,)) in c.left_out
    assert ("entropy/log|A|[throttle]", (1,)) in c.left_out
    assert any(k == "kl_spike_critical" and v[1] == 0.9 for k, v in c.threshold_diffs)


def test_bucket_keeps_the_worst_update_of_each_column_and_every_nan() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(100, dtype=np.float64)
    v = rng.random(100)
    v[37] = 50.0  # a spike inside a column of several updates
    v[61] = np.nan
    have = np.ones(100, dtype=bool)
    have[80:85] = False
    edges, lo, hi = align([x], 20)
    assert (lo, hi) == (0.0, 99.0) and len(edges) == 21
    cols, filled = bucket(x, v, have, edges, "max")
    for c in range(20):
        members = [
            i for i in range(100) if have[i] and (edges[c] <= x[i] < edges[c + 1] or (c == 19 and i == 99))
        ]
        if not members:
            assert not filled[c]
            continue
        ref = np.max(v[members]) if not np.isnan(v[members]).any() else np.nan
        assert filled[c]
        assert (np.isnan(ref) and np.isnan(cols[c])) or cols[c] == ref
    assert 50.0 in cols
    spark = scaled_spark(cols, filled, 0.0, 50.0)
    assert "×" in spark and "█" in spark and len(spark) == 20
    # few updates: one column each, no blank columns between them
    edges, _, _ = align([x[:10], x[:5] + 0.0], 40)
    assert len(edges) == 11
    cols, filled = bucket(x[:10], v[:10], have[:10], edges)
    assert filled.all()
    np.testing.assert_array_equal(cols, v[:10])


def test_the_env_steps_axis_aligns_runs_by_samples_consumed() -> None:
    c = build_comparison(load_runs([HEALTHY, KLSPIKE]))
    assert c.env_steps_known
    lines_update = [ln.plain for ln in chart_lines(c, 100, env_steps=False)]
    lines_env = [ln.plain for ln in chart_lines(c, 100, env_steps=True)]
    assert len(lines_update) == len(lines_env)
    # same rollout size in both runs: env steps are a rescaling of updates, so the charts agree
    assert c.runs[0].env_steps[-1] == sum(s.advantage.raw.count for s in snaps(HEALTHY))


def test_the_loops_own_timesteps_are_the_env_steps_axis_when_every_update_has_them(tmp_path: Path) -> None:
    """A recording whose snapshots carry the loop's timesteps is aligned on those (here a loop that
    counts two environment steps per sample, so they differ from the rollout sizes' sum)."""
    rec = read_recording(HEALTHY)
    out = tmp_path / "timesteps.simrec"
    with RecordWriter(out, session=rec.session) as w:
        for env, snap in load_recording(HEALTHY).frames:
            snap.timesteps = 2 * (snap.step + 1) * snap.advantage.raw.count
            w.write(
                encode_envelope(
                    "snapshot", snap, session=env.session, seq=env.seq, step=env.step, wall_time=env.wall_time
                )
            )
    with_ts, without = load_runs([out, HEALTHY])
    np.testing.assert_array_equal(with_ts.env_steps, [float(s.timesteps) for s in snaps(out)])
    np.testing.assert_array_equal(
        without.env_steps, np.cumsum([s.advantage.raw.count for s in snaps(HEALTHY)])
    )


def test_trainer_text_is_cleaned_before_it_reaches_the_screen(tmp_path: Path) -> None:
    """Every byte of a recording is hostile: a run name and an incident kind carrying escape sequences
    and bidirectional overrides arrive cleaned (the replay's decode path)."""
    rec = read_recording(KLSPIKE)
    out = tmp_path / "hostile.simrec"
    evil = "\x1b]0;owned\x07\x1b[2J\u202eevil"
    with RecordWriter(out, session=rec.session) as w:
        for env, snap in load_recording(KLSPIKE).frames:
            snap.run.name = evil
            for e in snap.incident_events:
                e.incident.kind = evil + e.incident.kind
            w.write(
                encode_envelope(
                    "snapshot", snap, session=env.session, seq=env.seq, step=env.step, wall_time=env.wall_time
                )
            )
    c = build_comparison(load_runs([HEALTHY, out]))
    texts = [c.runs[1].name, *(i.kind for i in c.runs[1].incidents), *(d.kind for d in c.diffs)]
    assert c.runs[1].incidents
    for text in texts:
        assert text.isprintable() and "\x1b" not in text and "\u202e" not in text


def test_load_runs_refuses_too_many_and_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="at most 8"):
        load_runs([HEALTHY] * (MAX_RUNS + 1))
    with pytest.raises(ReplayError, match="does not exist"):
        load_runs([HEALTHY, tmp_path / "missing.simrec"])
    bad = tmp_path / "bad.simrec"
    bad.write_bytes(b"not a recording at all")
    with pytest.raises(ReplayError, match="not a simic-tui recording"):
        load_runs([bad])


def test_a_truncated_recording_compares_on_what_could_be_read(tmp_path: Path) -> None:
    data = KLSPIKE.read_bytes()
    cut = tmp_path / "cut.simrec"
    cut.write_bytes(data[: len(data) * 2 // 3])
    runs = load_runs([HEALTHY, cut])
    assert 0 < runs[1].updates < len(snaps(KLSPIKE))
    assert "truncated" in runs[1].notice
    c = build_comparison(runs)
    assert c.summaries[1].updates == runs[1].updates


def test_the_cli_refuses_in_one_sentence(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simic_tui.cli", "compare", str(HEALTHY), str(tmp_path / "nope.simrec")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("simic-tui compare:") and "does not exist" in proc.stderr


# ---------------------------------------------------------------------------------------------
# The screen
# ---------------------------------------------------------------------------------------------


async def test_the_screen_shows_every_run_in_its_colour_and_e_switches_the_axis() -> None:
    c = build_comparison(load_runs(FOUR))
    app = CompareApp(c)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        table = screen.query_one(DataTable)
        assert table.row_count == 4
        title = screen.query_one("#compare-title", Static)
        text = str(title.render())
        for run in c.runs:
            assert run.name in text
        charts = screen.query_one("#compare-charts", Static)
        before = str(charts.render())
        assert "x: update" in text
        await pilot.press("e")
        await pilot.pause()
        assert "x: environment steps" in str(screen.query_one("#compare-title", Static).render())
        assert screen.env_steps
        await pilot.press("e")
        await pilot.pause()
        assert str(charts.render()) == before
        # the body scrolls with the keyboard to reach the charts below the table and the diff
        body = screen.query_one(VerticalScroll)
        await pilot.press("pagedown")
        await pilot.pause()
        assert body.scroll_y > 0


@pytest.mark.usefixtures("deterministic_terminal")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("runs", ["two", "four"])
def test_compare_snapshot(snap_compare, runs: str, size: str) -> None:  # type: ignore[no-untyped-def]
    paths = [HEALTHY, KLSPIKE] if runs == "two" else FOUR
    app = CompareApp(build_comparison(load_runs(paths)))
    assert snap_compare(app, terminal_size=SIZES[size])


def test_nan_updates_show_as_crosses_in_the_nan_run() -> None:
    c = build_comparison(load_runs([HEALTHY, NANGRAD]))
    frames = snaps(NANGRAD)
    bad = [s.step for s in frames if s.gradients is not None and not math.isfinite(s.gradients.total_norm)]
    assert bad, "the NaN injection must leave a non-finite gradient norm"
    block = [ln.plain for ln in chart_lines(c, 100)]
    i = next(k for k, ln in enumerate(block) if ln.startswith("grad norm"))
    assert "×" in block[i + 2] and "×" not in block[i + 1]
