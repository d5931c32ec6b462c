"""The calibration matrix on a reduced set (``benchmarks/calibration``; the full matrix and its table
are in BENCHMARKS.md): real PPO training on Acrobot-v1 by the feed-forward calibration agent, a
detector that was not tuned on it, under a real recording ``TelemetryHub``.

Three injections (a one-update learning-rate spike; one NaN observation; stored old log-probs that
do not belong to the acting policy, on the two-head agent while its heads are still near uniform -
where a merely mismatched behaviour policy cannot move a ratio past 5) must each be flagged as
their own kind within ``WINDOW`` (2) updates of the update at which the mechanism acted,
and a short healthy run must raise no critical incident. The recordings are then re-judged offline
(the harness's ``rejudge`` path, which is how the limits get calibrated) and must give the very
judgements the live hub made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("gymnasium")
torch = pytest.importorskip("torch")

from calibration.matrix import (  # noqa: E402
    EXPECTED,
    WINDOW,
    Job,
    judge_healthy,
    judge_injected,
    load_runs,
    markdown,
    run_job,
)

AGENT = "mlp-acrobot"
ONSET = 6


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibration")
    threads = torch.get_num_threads()
    try:
        for job in (
            Job(AGENT, seed=1, updates=16, out=str(out)),
            Job(AGENT, seed=2, updates=30, injection="kl-spike", onset=ONSET, stop=ONSET + WINDOW, out=str(out)),
            Job(AGENT, seed=3, updates=30, injection="nan-gradients", onset=ONSET, stop=ONSET + WINDOW,
                out=str(out)),
            Job("mlp-acrobot-factored", seed=4, updates=30, injection="ratio-explosion", onset=ONSET,
                stop=ONSET + WINDOW, out=str(out)),
        ):
            meta = run_job(job)
            assert meta["crashed"] is None
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_injections_flagged_as_their_kind_within_the_window(recorded: Path) -> None:
    runs = [r for r in load_runs(recorded, rejudge=False) if r.job.injection]
    assert sorted(r.job.injection for r in runs) == ["kl-spike", "nan-gradients", "ratio-explosion"]
    for run in runs:
        verdict = judge_injected(run)
        assert verdict.onset == ONSET, "the mechanism acted at the planned update (trainer's own record)"
        assert [r.step for r in run.rows] == list(range(1, ONSET + WINDOW + 1)), "every update recorded"
        assert verdict.expected == EXPECTED[run.job.injection]
        assert verdict.detected, f"{run.job.injection}: first {verdict.expected} at +{verdict.latency}"
        assert verdict.latency is not None and 0 <= verdict.latency <= WINDOW
        # the incident layer opened an incident of that kind too (what the operator is told)
        opened = {
            kind for row in run.rows if row.step >= ONSET for event, kind, _, _ in row.events if event == "onset"
        }
        assert verdict.expected in opened


@pytest.mark.slow
def test_healthy_run_raises_no_critical_incident(recorded: Path) -> None:
    (run,) = [r for r in load_runs(recorded, rejudge=False) if not r.job.injection]
    verdict = judge_healthy(run)
    assert verdict.updates == 16
    assert run.incidents, "the live hub recorded incident events (or no judgement at all)"
    assert verdict.critical == {}, f"critical incidents on a healthy run: {verdict.critical}"
    assert all(r.level in ("NORMAL", "DEBUG") for r in run.rows)
    assert len(run.meta["returns"]) == 16


@pytest.mark.slow
def test_rejudge_reproduces_the_live_judgements(recorded: Path) -> None:
    live = {r.meta["label"]: r for r in load_runs(recorded, rejudge=False)}
    again = {r.meta["label"]: r for r in load_runs(recorded, rejudge=True)}
    assert live.keys() == again.keys() and len(live) == 4
    for label, run in live.items():
        rows = again[label].rows
        assert [r.step for r in rows] == [r.step for r in run.rows]
        for a, b in zip(run.rows, rows):
            assert sorted(a.anomalies) == sorted(b.anomalies), f"{label} step {a.step}"
            assert sorted(a.events) == sorted(b.events), f"{label} step {a.step}"
            assert a.level == b.level, f"{label} step {a.step}: the replayed escalation differs"
    table = markdown(list(again.values()), {"what": "t", "date": "d", "machine": "m", "command": "c"})
    assert "| kl-spike → `kl_spike` | — | 1/1 (+" in table or "| kl-spike → `kl_spike` | 1/1 (+" in table
