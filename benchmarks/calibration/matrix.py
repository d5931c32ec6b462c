"""The calibration matrix: agents the detector's limits were not tuned on, healthy and with every
injection, recorded so the *current* detector (and incident layer) can judge them again offline.

Run from the repository root::

    python benchmarks/calibration run --jobs 2              # train the matrix, record, print the table
    python benchmarks/calibration rejudge                   # re-judge the recordings, no training
    python benchmarks/calibration rejudge --markdown t.md --json t.json

Every run is real training on real gymnasium environments under the real ``TelemetryHub``
(``bind=None``, ``record=<run>.simrec``: NORMAL level, automatic DEBUG escalation), one torch thread
per process. Each run leaves ``<label>.simrec`` (every published snapshot) and ``<label>.json``
(the job, the update at which the injected mechanism first acted as the trainer saw it, the
episode returns, wall time, the exception if training died).

``run`` judges with what the live hub recorded (each snapshot's anomalies, incidents and level);
``rejudge`` replays each recording's snapshots through a fresh detector and incident layer with the
current default ``Thresholds``, escalating to DEBUG as the hub does (critical onsets and upgrades,
within the DEBUG budget) - seconds instead of an hour, which is how the rules get calibrated. A re-judged run is not a live run in one
respect: DEBUG escalation changes what later updates measure, and the recording holds what the
*recorded* detector's escalations measured. The DEBUG share of a re-judged run is therefore the
share that the current incidents would escalate (``TelemetryConfig``'s own rule, replayed).

Verdicts:
* injected run: **detected** when the injection's own kind is judged (any severity) within
  ``WINDOW`` = 2 updates of onset (latency 0 = the onset update's own snapshot);
* healthy run (and the updates of injected runs before onset, shown apart): **onsets** per 100
  updates by severity - incident onsets when the run has incidents (an upgrade to critical counts as
  a critical onset), otherwise anomaly onsets (a (kind, scope) judged now and not in the update
  before) - and the share of updates that ran at DEBUG.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from calibration.ppo import PPOConfig

__all__ = [
    "AGENTS",
    "EXPECTED",
    "WINDOW",
    "AgentSpec",
    "HealthyVerdict",
    "InjectedVerdict",
    "Job",
    "RunRows",
    "judge_healthy",
    "judge_injected",
    "load_runs",
    "main",
    "markdown",
    "matrix_jobs",
    "run_job",
]

# Injection -> the anomaly kind it must be flagged as.
EXPECTED: dict[str, str] = {
    "entropy-collapse": "entropy_collapse",
    "kl-spike": "kl_spike",
    "ratio-explosion": "ratio_explosion",
    "value-collapse": "value_collapse",
    "nan-gradients": "numerical_instability",
    "exploding-gradients": "gradient_exploding",
    "lstm-explosion": "lstm_unhealthy",
}
WINDOW = 2  # flagged as its own kind within this many updates of onset
INJECT_SEED = 11  # injection k of an agent runs on seed INJECT_SEED + k: its own healthy prefix
FEEDFORWARD_KINDS = tuple(k for k in EXPECTED if k != "lstm-explosion")


@dataclass(frozen=True)
class AgentSpec:
    """One agent of the calibration set and the shape of its runs."""

    name: str
    about: str
    kinds: tuple[str, ...]  # injections that apply to it
    healthy_updates: int  # planned (and run) updates of a healthy run
    inject_plan: int  # planned updates of an injected run (sets LR annealing and phase)
    onset: int  # update at which injections act
    config: Callable[[int, int], PPOConfig] | None = None  # (seed, updates) -> config; None: SB3
    after: int = 2  # updates run past the window (what else fires, how incidents group)


def _lstm_po(seed: int, updates: int) -> PPOConfig:
    return PPOConfig(
        env="acrobot-po",
        recurrent=True,
        seed=seed,
        num_updates=updates,
        hidden=(64,),
        lstm_hidden=64,
        learning_rate=2.5e-3,
        reward_scale=0.1,
        target_kl=0.02,
    )


def _mlp(seed: int, updates: int) -> PPOConfig:
    return PPOConfig(env="acrobot", seed=seed, num_updates=updates)


def _factored(seed: int, updates: int) -> PPOConfig:
    return PPOConfig(env="acrobot-factored", seed=seed, num_updates=updates)


AGENTS: dict[str, AgentSpec] = {
    spec.name: spec
    for spec in (
        AgentSpec(
            "lstm-acrobot-po",
            "recurrent PPO (64 tanh -> LSTM 64), Acrobot-v1 with both angular velocities masked, "
            "3 actions, env-wise minibatches, rewards x0.1, lr 2.5e-3, target KL 0.02",
            tuple(EXPECTED),
            80,
            100,
            30,
            _lstm_po,
        ),
        AgentSpec(
            "mlp-acrobot",
            "feed-forward PPO (CleanRL ppo.py: 64-64 tanh actor and critic), Acrobot-v1, 3 actions, "
            "shuffled minibatches, unnormalised returns, lr 1e-3, no target KL",
            FEEDFORWARD_KINDS,
            80,
            100,
            30,
            _mlp,
        ),
        AgentSpec(
            "mlp-acrobot-factored",
            "feed-forward PPO with two heads, Acrobot-v1 torque as [push on/off, direction] = "
            "MultiDiscrete([2, 2]) (direction is moot when not pushing)",
            FEEDFORWARD_KINDS,
            80,
            100,
            30,
            _factored,
        ),
        AgentSpec(
            "sb3-ppo-default",
            "Stable-Baselines3 PPO('MlpPolicy', 'CartPole-v1') with every default (n_steps 2048, "
            "batch 64, 10 epochs, ent_coef 0, max_grad_norm 0.5) through SimicCallback",
            FEEDFORWARD_KINDS,
            15,
            15,
            6,
            after=0,  # an SB3 update takes ~5 s of CPU: stop at the end of the window
        ),
    )
}


@dataclass
class Job:
    agent: str
    seed: int
    updates: int  # planned updates
    injection: str | None = None
    onset: int | None = None
    stop: int | None = None  # last update run (None: all planned)
    out: str = "runs/calibration"
    skip_done: bool = False  # do nothing when the run's sidecar exists (finished or being run)

    @property
    def label(self) -> str:
        what = f"{self.injection}@{self.onset}" if self.injection else f"healthy{self.updates}"
        return f"{self.agent}--{what}--s{self.seed}"


def matrix_jobs(
    agents: Sequence[str],
    healthy_seeds: Sequence[int],
    inject_seeds: Sequence[int],
    out: str,
    *,
    long_updates: int = 0,
    kinds: Sequence[str] | None = None,
) -> list[Job]:
    """The matrix, longest jobs first (so a pool does not end waiting on one).

    Injection ``k`` (in ``EXPECTED``'s order) of seed ``s`` runs on seed ``s + k``, so every injected
    run is an independent trial and its updates before onset are healthy data of another seed.
    """
    jobs: list[Job] = []
    if long_updates:  # the cheapest agent, trained to convergence and beyond
        jobs.append(Job("mlp-acrobot", healthy_seeds[0] if healthy_seeds else 1, long_updates, out=out))
    for name in agents:
        spec = AGENTS[name]
        for seed in healthy_seeds:
            if long_updates and name == "mlp-acrobot" and seed == jobs[0].seed:
                continue
            jobs.append(Job(name, seed, spec.healthy_updates, out=out))
        stop = spec.onset + WINDOW + spec.after
        for kind in spec.kinds:
            if kinds is not None and kind not in kinds:
                continue
            k = list(EXPECTED).index(kind)
            for seed in inject_seeds:
                jobs.append(Job(name, seed + k, spec.inject_plan, kind, spec.onset, stop, out=out))
    cost = {name: (8.0 if AGENTS[name].config is None else 1.0) for name in AGENTS}
    return sorted(jobs, key=lambda j: -cost[j.agent] * (j.stop or j.updates))


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def run_job(job: Job) -> dict[str, Any]:
    """Train one run under a recording hub; write ``<label>.json`` beside ``<label>.simrec``."""
    import torch

    torch.set_num_threads(1)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{job.label}.simrec"
    sidecar = out / f"{job.label}.json"
    if job.skip_done and sidecar.exists():
        return {**json.loads(sidecar.read_text()), "skipped": True}
    # Written first, so a healthy run stopped early can still be judged up to where it got.
    sidecar.write_text(json.dumps({"job": asdict(job), "label": job.label, "onset": None, "finished": False}))
    returns: list[float | None] = []
    started = time.perf_counter()
    crashed = None
    spec = AGENTS[job.agent]
    if spec.config is None:
        from calibration.sb3_agent import run_sb3

        def on_update(snap: Any, _logged: dict[str, float]) -> None:
            ep = snap.episodes if snap is not None else None
            returns.append(ep.return_mean if ep is not None and ep.count else None)

        stop = job.stop or job.updates  # SB3's learn() runs whole updates: plan = what is run
        result = run_sb3(
            job.seed, stop, injection=job.injection, onset=job.onset, record=str(record),
            run_name=job.label, on_update=on_update,
        )
        onset = result["fired"][0] if result["fired"] else None
        crashed = result["crashed"]
    else:
        from calibration.ppo import iter_train, make_agent, make_hub, obs_dim_of

        cfg = spec.config(job.seed, job.updates)
        agent = make_agent(cfg, obs_dim_of(cfg))
        onset = None
        injections = [f"{job.injection}@{job.onset}"] if job.injection else []
        with make_hub(agent, cfg, bind=None, record=str(record), run_name=job.label) as hub:
            gen = iter_train(cfg, agent, hub, injections)
            try:
                for rec in gen:
                    if job.injection in rec.injected and onset is None:
                        onset = rec.update
                    returns.append(None if math.isnan(rec.episode_return) else rec.episode_return)
                    if job.stop is not None and rec.update >= job.stop:
                        break
            finally:
                gen.close()
    meta = {
        "job": asdict(job),
        "label": job.label,
        "onset": onset,
        "seconds": time.perf_counter() - started,
        "crashed": crashed,
        "returns": returns,
        "finished": True,
    }
    sidecar.write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------
# judging recordings
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    step: int
    level: str
    anomalies: list[tuple[str, str, str]]  # kind, severity, scope
    onsets: list[tuple[str, str, str]]  # anomaly onsets: (kind, scope) not judged the update before
    events: list[tuple[str, str, str, str]]  # incident events: event, kind, severity, scope


@dataclass
class RunRows:
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    incidents: bool = False  # the judgement includes an incident layer

    @property
    def job(self) -> Job:
        return Job(**self.meta["job"])


def _scope(a: Any) -> str:
    if getattr(a, "head", None):
        return f"head:{a.head}"
    if getattr(a, "rank", None) is not None:
        return f"rank:{a.rank}"
    return ""


def _snapshots(path: Path) -> list[Any]:
    """One snapshot per update (the trainer's closing frame is not an update)."""
    from telemetry_core.record import read_updates

    return list(read_updates(path))


def _events(snap: Any) -> list[tuple[str, str, str, str]]:
    return [
        (e.event, e.incident.kind, e.incident.severity, e.incident.scope)
        for e in getattr(snap, "incident_events", ())
    ]


def _recorded(meta: dict[str, Any], snaps: list[Any]) -> RunRows:
    """What the live hub judged, as recorded."""
    res = RunRows(meta)
    active: set[tuple[str, str]] = set()
    for snap in snaps:
        found = [(a.kind, a.severity, _scope(a)) for a in snap.anomalies]
        keys = {(k, s) for k, _, s in found}
        res.rows.append(
            Row(snap.step, snap.level.level, found, [f for f in found if (f[0], f[2]) not in active], _events(snap))
        )
        active = keys
    # Recordings from before the incident layer carry no events: count their anomaly onsets instead.
    res.incidents = any(r.events for r in res.rows) or not any(r.anomalies for r in res.rows)
    return res


class _Replayer:
    """The current detector and incident layer over recorded snapshots, escalating as the hub does."""

    def __init__(self, planned: int, heads: dict[str, int]) -> None:
        from telemetry_core.anomaly import AnomalyDetector
        from telemetry_core.config import TelemetryConfig
        from telemetry_core.incidents import IncidentTracker, escalates

        self.config = TelemetryConfig()
        th = self.config.thresholds
        self.detector = AnomalyDetector(th, total_updates=planned, heads=heads)
        self.incidents = IncidentTracker.from_thresholds(th)
        self.escalates = escalates

    def judge(self, snap: Any) -> Row:
        import msgspec

        step = int(snap.step)
        # The hub's order: the level of this update was fixed at the end of the last one; the update
        # is noted in the DEBUG budget's window; judged; critical onsets and upgrades escalate.
        level, reason = self.config.effective(step)
        self.config.note_update(level, reason, snap.update_seconds)
        fresh = msgspec.structs.replace(snap, anomalies=[], incidents=[], incident_events=[])
        found = self.detector.check(fresh)
        onsets = list(self.detector.onsets)
        evs = self.incidents.update(found, step)
        for e in evs:
            if self.escalates(e):
                self.config.escalate(e.incident.kind, step + 1)
        return Row(
            step,
            level.name,
            [(a.kind, a.severity, _scope(a)) for a in found],
            [(a.kind, a.severity, _scope(a)) for a in onsets],
            [(e.event, e.incident.kind, e.incident.severity, e.incident.scope) for e in evs],
        )


def load_runs(out: Path, *, rejudge: bool, match: str | None = None) -> list[RunRows]:
    """Every run under ``out`` (``<label>.json`` with its ``.simrec``), judged as recorded or again."""
    runs = []
    for sidecar in sorted(out.glob("*.json")):
        if match is not None and match not in sidecar.stem:
            continue
        meta = json.loads(sidecar.read_text())
        if "job" not in meta or (not meta.get("finished") and meta["job"]["injection"]):
            continue  # an injected run that did not finish has no measured onset
        try:
            snaps = _snapshots(sidecar.with_suffix(".simrec"))
        except (OSError, ValueError):  # just started (no header yet) or never written
            continue
        if not snaps:
            continue
        if "returns" not in meta:  # a run still going or stopped: the returns its hub published
            meta["returns"] = [
                s.episodes.return_mean if s.episodes is not None and s.episodes.count else None for s in snaps
            ]
        if not rejudge:
            runs.append(_recorded(meta, snaps))
            continue
        # the plan the live hub judged phases by (SB3's callback plans the updates learn() runs)
        planned = snaps[0].run.planned_updates or Job(**meta["job"]).updates
        replay = _Replayer(planned, dict(snaps[0].run.heads))
        res = RunRows(meta, incidents=True)
        res.rows = [replay.judge(s) for s in snaps]
        runs.append(res)
    return runs


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------
@dataclass
class InjectedVerdict:
    agent: str
    injection: str
    seed: int
    expected: str
    onset: int | None
    latency: int | None  # updates from onset to the first judgement of the expected kind
    critical_latency: int | None
    detected: bool
    others: dict[str, str]  # other kinds judged from onset to the end -> worst severity
    crashed: str | None
    unpublished: bool  # training raised inside the onset update: no snapshot of it exists


def judge_injected(run: RunRows) -> InjectedVerdict:
    job = run.job
    inj = job.injection or ""
    expected = EXPECTED[inj]
    onset = run.meta["onset"]
    latency = critical = None
    others: dict[str, str] = {}
    for row in run.rows:
        if onset is None or row.step < onset:
            continue
        sevs = {sev for kind, sev, _ in row.anomalies if kind == expected}
        if sevs and latency is None:
            latency = row.step - onset
        if "critical" in sevs and critical is None:
            critical = row.step - onset
        for kind, sev, _ in row.anomalies:
            if kind != expected and others.get(kind) != "critical":
                others[kind] = sev
    return InjectedVerdict(
        agent=job.agent,
        injection=inj,
        seed=job.seed,
        expected=expected,
        onset=onset,
        latency=latency,
        critical_latency=critical,
        detected=latency is not None and latency <= WINDOW,
        others=dict(sorted(others.items())),
        crashed=run.meta.get("crashed"),
        unpublished=onset is not None and bool(run.meta.get("crashed")) and all(r.step < onset for r in run.rows),
    )


@dataclass
class HealthyVerdict:
    agent: str
    seed: int
    updates: int
    debug_updates: int
    critical: dict[str, int]  # kind -> critical onsets (incident onsets and upgrades when incidents)
    warning: dict[str, int]
    returns: tuple[float, float, float]  # rolling mean of 10 at the start, the end, the best


def _rolling(returns: Iterable[float | None], window: int = 10) -> list[float]:
    vals = [math.nan if r is None else float(r) for r in returns]
    out = []
    for i in range(len(vals)):
        recent = [v for v in vals[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(recent) if recent else math.nan)
    return out


def judge_healthy(run: RunRows, *, before: int | None = None) -> HealthyVerdict:
    """Onsets and DEBUG share over the run's updates (``before``: only updates before that step)."""
    rows = [r for r in run.rows if before is None or r.step < before]
    crit: Counter[str] = Counter()
    warn: Counter[str] = Counter()
    for row in rows:
        if run.incidents:
            for event, kind, sev, _ in row.events:
                if event == "upgrade" or (event == "onset" and sev == "critical"):
                    crit[kind] += 1
                elif event == "onset":
                    warn[kind] += 1
        else:
            for kind, sev, _ in row.onsets:
                (crit if sev == "critical" else warn)[kind] += 1
    rolling = [x for x in _rolling(run.meta.get("returns", ())) if math.isfinite(x)]
    returns = (rolling[0], rolling[-1], max(rolling)) if rolling else (math.nan,) * 3
    return HealthyVerdict(
        agent=run.job.agent,
        seed=run.job.seed,
        updates=len(rows),
        debug_updates=sum(r.level == "DEBUG" for r in rows),
        critical=dict(sorted(crit.items())),
        warning=dict(sorted(warn.items())),
        returns=returns,
    )


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _per100(n: int, updates: int) -> str:
    return f"{100.0 * n / updates:.2f}" if updates else "—"


def _kinds(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


def _sum(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def markdown(runs: list[RunRows], meta: dict[str, Any]) -> str:
    agents = [a for a in AGENTS if any(r.job.agent == a for r in runs)]
    injected = [judge_injected(r) for r in runs if r.job.injection]
    healthy = [judge_healthy(r) for r in runs if not r.job.injection]
    pre_onset = [judge_healthy(r, before=r.meta["onset"]) for r in runs if r.job.injection and r.meta["onset"]]
    incidents = any(r.incidents for r in runs)
    counted = "incident onsets (an upgrade to critical counts as a critical onset)" if incidents else (
        "anomaly onsets (a kind and scope judged now and not in the update before; no incident layer yet)"
    )
    lines = [
        f"{meta['what']}, {meta['date']}, {meta['machine']}. Command: `{meta['command']}`"
        + (f" (telemetry_core of `{meta['judge']}`)." if meta.get("judge") else "."),
        "",
        "Agents:",
        "",
    ]
    lines += [f"- `{a}`: {AGENTS[a].about}." for a in agents]
    lines += [
        "",
        f"**Injections** (onset = the update at which the mechanism first acted, from the trainer's own "
        f"record; cell = seeds flagged as the injection's own kind within {WINDOW} updates / seeds run, "
        "then the latency of each seed, `+0` = the onset update's own snapshot; `—` does not apply):",
        "",
        "| injection → kind | " + " | ".join(f"`{a}`" for a in agents) + " |",
        "|---|" + "---|" * len(agents),
    ]
    for inj, kind in EXPECTED.items():
        cells = []
        for a in agents:
            vs = [v for v in injected if v.agent == a and v.injection == inj]
            if not vs:
                cells.append("—")
                continue
            hit = sum(v.detected for v in vs)
            lat = ",".join(
                ("died†" if v.unpublished else "miss") if v.latency is None else f"+{v.latency}" for v in vs
            )
            mark = "" if hit == len(vs) else "**"
            cells.append(f"{mark}{hit}/{len(vs)}{mark} ({lat})")
        lines.append(f"| {inj} → `{kind}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Healthy runs** (nothing injected; onsets = {counted}; per 100 updates; DEBUG = share of "
        "updates that ran at DEBUG; return = rolling mean of 10 episodes' returns, first → last):",
        "",
        "| agent | runs × updates | critical /100 | warning /100 | DEBUG | critical kinds | warning kinds "
        "| return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in agents:
        hs = [h for h in healthy if h.agent == a]
        if not hs:
            continue
        n = sum(h.updates for h in hs)
        crit, warn = _sum(h.critical for h in hs), _sum(h.warning for h in hs)
        dbg = sum(h.debug_updates for h in hs)
        shape = " + ".join(str(h.updates) for h in hs)
        ret = "; ".join(f"{h.returns[0]:.0f} → {h.returns[1]:.0f}" for h in hs)
        lines.append(
            f"| `{a}` | {shape} | {_per100(sum(crit.values()), n)} | {_per100(sum(warn.values()), n)} "
            f"| {100.0 * dbg / n:.1f} % | {_kinds(crit)} | {_kinds(warn)} | {ret} |"
        )
    if pre_onset:
        lines += [
            "",
            "Updates of the injected runs before their onset (healthy too, more seeds):",
            "",
            "| agent | updates | critical /100 | warning /100 | DEBUG | critical kinds | warning kinds |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in agents:
            hs = [h for h in pre_onset if h.agent == a]
            if not hs:
                continue
            n = sum(h.updates for h in hs)
            crit, warn = _sum(h.critical for h in hs), _sum(h.warning for h in hs)
            dbg = sum(h.debug_updates for h in hs)
            lines.append(
                f"| `{a}` | {n} | {_per100(sum(crit.values()), n)} | {_per100(sum(warn.values()), n)} "
                f"| {100.0 * dbg / n:.1f} % | {_kinds(crit)} | {_kinds(warn)} |"
            )
    if injected:
        lines += [
            "",
            "Each injected run: first judgement of its own kind and first critical (updates after onset), "
            "and every other kind judged from onset to the end of the run (worst severity) - what the "
            "incident layer has to group under one cause:",
            "",
            "| agent | injection | seed | first | first critical | other kinds after onset |",
            "|---|---|---|---|---|---|",
        ]
        for v in injected:
            first = "died†" if v.unpublished else ("—" if v.latency is None else f"+{v.latency}")
            crit = "—" if v.critical_latency is None else f"+{v.critical_latency}"
            other = ", ".join(f"{k} ({sev})" for k, sev in v.others.items()) or "none"
            lines.append(f"| `{v.agent}` | {v.injection} | {v.seed} | {first} | {crit} | {other} |")
    crashed = [v for v in injected if v.crashed]
    if crashed:
        lines += ["", "Training died after the injection (the run's own exception, recorded; † = inside the "
                  "onset update, before the hub could publish it):", ""]
        lines += [
            f"- `{v.agent}` {v.injection} seed {v.seed}{' †' if v.unpublished else ''}: {v.crashed}"
            for v in crashed
        ]
    if meta.get("seconds"):
        lines += ["", f"Wall time {meta['seconds']:.0f} s with {meta['jobs']} processes."]
    return "\n".join(lines) + "\n"


def _meta(what: str, command: str, seconds: float = 0.0, jobs: int = 0) -> dict[str, Any]:
    import telemetry_core

    return {
        "what": what,
        "judge": str(Path(telemetry_core.__file__).resolve().parents[1]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {mp.cpu_count()} cores (shared), Python {platform.python_version()}",
        "command": command,
        "seconds": seconds,
        "jobs": jobs,
    }


def _dump(runs: list[RunRows], verdicts: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": [{"meta": r.meta, "rows": [asdict(x) for x in r.rows]} for r in runs]}
    if verdicts:
        out["injected"] = [asdict(judge_injected(r)) for r in runs if r.job.injection]
        out["healthy"] = [asdict(judge_healthy(r)) for r in runs if not r.job.injection]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/calibration", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="train the matrix under recording hubs")
    run.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    run.add_argument("--healthy-seeds", type=int, nargs="*", default=[1, 2, 3])
    run.add_argument("--inject-seeds", type=int, nargs="*", default=[INJECT_SEED])
    run.add_argument("--kinds", nargs="+", default=None, choices=list(EXPECTED))
    run.add_argument("--long", type=int, default=1000, help="updates of the long mlp-acrobot run (0: none)")
    run.add_argument(
        "--skip-done", action="store_true",
        help="skip runs whose .json exists when they come up (two harnesses can share a folder)",
    )
    run.add_argument("--reverse", action="store_true", help="shortest runs first")
    for p in (run, sub.add_parser("rejudge", help="judge the recordings again with the current detector"),
              sub.add_parser("report", help="the table from what the live hubs recorded")):
        p.add_argument("--out", type=Path, default=Path("runs/calibration"))
        p.add_argument("--jobs", type=int, default=2)
        p.add_argument("--markdown", type=Path, default=None)
        p.add_argument("--json", type=Path, default=None)
        p.add_argument("--match", default=None, help="only runs whose label contains this")
    args = parser.parse_args(argv)
    command = "python benchmarks/calibration " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    seconds = 0.0
    if args.mode == "run":
        jobs = matrix_jobs(
            args.agents, args.healthy_seeds, args.inject_seeds, str(args.out),
            long_updates=args.long if "mlp-acrobot" in args.agents else 0, kinds=args.kinds,
        )
        if args.skip_done:
            jobs = [replace(j, skip_done=True) for j in jobs if not (args.out / f"{j.label}.json").exists()]
        if args.reverse:
            jobs.reverse()
        print(f"{len(jobs)} runs, {args.jobs} processes, recordings in {args.out}", flush=True)
        started = time.perf_counter()
        with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
            for meta in pool.imap_unordered(run_job, jobs):
                if meta.get("skipped"):
                    continue
                print(f"  done {meta['label']:55s} {meta['seconds']:7.1f} s"
                      + (f"  died: {meta['crashed'][:60]}" if meta["crashed"] else ""), flush=True)
        seconds = time.perf_counter() - started
    rejudge = args.mode == "rejudge"
    runs = load_runs(args.out, rejudge=rejudge, match=args.match)
    what = "Calibration, re-judged by the current detector" if rejudge else "Calibration, as judged live"
    text = markdown(runs, _meta(what, command, seconds, args.jobs))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(_dump(runs, True)))
    return 0
