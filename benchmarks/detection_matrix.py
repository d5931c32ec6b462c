"""Detection quality matrix: is each injected pathology flagged as its own kind, how fast, and how
many false alarms does a healthy run raise?

Run: ``python benchmarks/detection_matrix.py [--onset 90] [--inject-seeds 1] [--healthy-seeds 1 2 3]
[--updates 300] [--jobs 2] [--markdown FILE] [--json FILE]``

Every run is the real demo trainer (``telemetry_core.demo``) under the real ``TelemetryHub``
(``bind=None``: no sockets, everything else as in ``simic-tui demo``: NORMAL level, automatic
DEBUG escalation on onsets) judged by the real ``AnomalyDetector`` with the default ``Thresholds``.

* Injected runs: one per injection kind (and per ``--inject-seeds`` seed), ``KIND@ONSET`` of a run
  planned for ``--updates`` updates (so learning-rate annealing and training phase are those of a
  full run). *Onset* is the update at which the injected mechanism first acts (a coefficient, the
  learning rate, weights or an observation of that update changed), as the trainer's own record
  reports it (``UpdateRecord.injected``); latency 0 means flagged by that update's own snapshot.
  The run stops ``--after`` updates after onset + the detection window (the bar: flagged as its
  own kind within 2 updates of onset, on every agent).
* Healthy runs: ``--healthy-seeds`` x ``--updates`` updates, nothing injected; every anomaly is a
  false alarm. Counted per kind and severity as onsets (a new alarm: what a toast would show) and
  as updates flagged.

Runs go to a pool of ``--jobs`` processes (2 cores on the team machine; each run uses one torch
thread). Prints the table; ``--markdown`` writes it, ``--json`` writes every update's anomalies and
key statistics (for calibrating thresholds).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry_core.kinds import SPECS

# Injection kind -> the anomaly kind (of the registry) it must be flagged as.
EXPECTED: dict[str, str] = {
    "entropy-collapse": "entropy_collapse",
    "kl-spike": "kl_spike",
    "ratio-explosion": "ratio_explosion",
    "value-collapse": "value_collapse",
    "nan-gradients": "numerical_instability",
    "exploding-gradients": "gradient_exploding",
    "lstm-explosion": "lstm_unhealthy",
}
assert set(EXPECTED.values()) <= set(SPECS), "EXPECTED names a kind the registry does not define"
WINDOW = 2  # flagged as its own kind within 2 updates of onset


@dataclass
class Job:
    seed: int
    updates: int  # planned updates (sets LR annealing and training phase)
    injection: str | None = None
    onset: int | None = None
    stop: int | None = None  # last update run (None: all planned updates)
    record_dir: str | None = None  # write the hub's recording there (for --rejudge)

    @property
    def label(self) -> str:
        return f"{self.injection}-at{self.onset}-s{self.seed}" if self.injection else f"healthy-s{self.seed}"


@dataclass
class UpdateRow:
    step: int
    level: str
    anomalies: list[tuple[str, str, str | None]]  # kind, severity, head
    onsets: list[tuple[str, str, str | None]]
    stats: dict[str, float]


@dataclass
class RunResult:
    job: Job
    onset: int | None  # measured: first update whose record names the injection
    seconds: float
    updates_run: int
    rows: list[UpdateRow] = field(default_factory=list)


def _stats(snap: Any) -> dict[str, float]:
    """Key statistics of a snapshot (for the JSON dump)."""
    out: dict[str, float] = {}
    p, v, g, lstm = snap.policy, snap.value, snap.gradients, snap.lstm
    if p is not None:
        out.update({f"entropy.{h}": e for h, e in p.entropy_normalized.items()})
        out.update(kl=p.kl_k3_mean, ratio_max=p.ratio_max, ratio_min=p.ratio_min, samples=p.samples)
        for name in ("ratio_above", "ratio_above_critical", "ratio_below", "ratio_below_critical"):
            if getattr(p, name) is not None:
                out[name] = getattr(p, name)
    if v is not None:
        out.update(
            value_loss=v.value_loss, ev=v.explained_variance if v.explained_variance is not None else math.nan
        )
        out.update(value_std=v.value_std, return_std=v.return_std)
    if g is not None:
        out.update(grad_norm=g.total_norm, nan=float(g.nan_count))
        if g.ema_drift is not None:
            out["grad_drift"] = g.ema_drift
    if lstm is not None:
        out.update(h_norm=lstm.h_norm, c_norm=lstm.c_norm, c_max_abs=lstm.c_max_abs)
    if snap.episodes is not None and snap.episodes.count:
        out["return"] = snap.episodes.return_mean
    return {k: float(x) for k, x in out.items()}


def run_job(job: Job) -> RunResult:
    """One real run under the real hub; stops after ``job.stop`` updates."""
    import torch

    from telemetry_core.demo.ppo import DemoConfig, iter_train, make_agent, make_hub

    torch.set_num_threads(1)
    cfg = DemoConfig(seed=job.seed, num_updates=job.updates)
    agent = make_agent(cfg)
    injections = [f"{job.injection}@{job.onset}"] if job.injection else []
    start = time.perf_counter()
    result = RunResult(job=job, onset=None, seconds=0.0, updates_run=0)
    record = str(Path(job.record_dir) / f"{job.label}.simrec") if job.record_dir else None
    with make_hub(agent, cfg, bind=None, record=record, run_name=job.label) as hub:
        gen = iter_train(cfg, hub=hub, injections=injections, agent=agent)
        try:
            for record in gen:
                snap = record.snapshot
                if job.injection in record.injected and result.onset is None:
                    result.onset = record.update
                if snap is not None:
                    result.rows.append(
                        UpdateRow(
                            step=record.update,
                            level=snap.level.level,
                            anomalies=[(a.kind, a.severity, a.head) for a in snap.anomalies],
                            onsets=[(a.kind, a.severity, a.head) for a in hub.detector.onsets],
                            stats={
                                **_stats(snap),
                                "minibatches": float(record.minibatches),
                                "early_stop": float(record.early_stop),
                            },
                        )
                    )
                result.updates_run = record.update
                if job.stop is not None and record.update >= job.stop:
                    break
        finally:
            gen.close()
    result.seconds = time.perf_counter() - start
    if job.record_dir:
        meta = {"job": asdict(job), "onset": result.onset, "seconds": result.seconds}
        (Path(job.record_dir) / f"{job.label}.json").write_text(json.dumps(meta))
    return result


def rejudge(record_dir: Path) -> list[RunResult]:
    """Judge recorded runs again with a fresh detector and the current default Thresholds.

    For calibration: no training, seconds instead of minutes. Not identical to a live run where
    an alarm's DEBUG escalation changes what the next updates measure (e.g. gate saturation over
    the whole batch instead of a sample), so the matrix's numbers come from live runs.
    """
    from telemetry_core.anomaly import AnomalyDetector
    from telemetry_core.config import Thresholds
    from telemetry_core.record import read_updates

    results = []
    for sidecar in sorted(record_dir.glob("*.json")):
        meta = json.loads(sidecar.read_text())
        job = Job(**meta["job"])
        res = RunResult(job=job, onset=meta["onset"], seconds=0.0, updates_run=0)
        det = None
        for snap in read_updates(sidecar.with_suffix(".simrec")):  # the closing frame is no update
            if det is None:
                det = AnomalyDetector(Thresholds(), total_updates=job.updates, heads=snap.run.heads)
            found = det.check(snap)
            res.rows.append(
                UpdateRow(
                    step=snap.step,
                    level=snap.level.level,
                    anomalies=[(a.kind, a.severity, a.head) for a in found],
                    onsets=[(a.kind, a.severity, a.head) for a in det.onsets],
                    stats=_stats(snap),
                )
            )
            res.updates_run = snap.step
        results.append(res)
    return results


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------
@dataclass
class InjectedVerdict:
    injection: str
    seed: int
    expected: str
    onset: int | None
    warning_after: int | None  # updates from onset to the first alarm of the expected kind
    critical_after: int | None  # ... to its first critical
    detected: bool  # within WINDOW updates of onset
    others: dict[str, str]  # other kinds active from onset on -> worst severity
    before: dict[str, str]  # kinds active before onset -> worst severity (false alarms)


def _worst(rows: list[UpdateRow], kinds_out: set[str] | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in rows:
        for kind, sev, _ in row.anomalies:
            if kinds_out is not None and kind in kinds_out:
                continue
            if out.get(kind) != "critical":
                out[kind] = sev
    return dict(sorted(out.items()))


def judge_injected(res: RunResult) -> InjectedVerdict:
    inj = res.job.injection or ""
    expected = EXPECTED[inj]
    onset = res.onset
    warning_after = critical_after = None
    if onset is not None:
        for row in res.rows:
            if row.step < onset:
                continue
            sevs = {sev for kind, sev, _ in row.anomalies if kind == expected}
            if sevs and warning_after is None:
                warning_after = row.step - onset
            if "critical" in sevs and critical_after is None:
                critical_after = row.step - onset
    after = [r for r in res.rows if onset is not None and r.step >= onset]
    before = [r for r in res.rows if onset is None or r.step < onset]
    return InjectedVerdict(
        injection=inj,
        seed=res.job.seed,
        expected=expected,
        onset=onset,
        warning_after=warning_after,
        critical_after=critical_after,
        detected=warning_after is not None and warning_after <= WINDOW,
        others=_worst(after, {expected}),
        before=_worst(before),
    )


@dataclass
class HealthyVerdict:
    seed: int
    updates: int
    warning_onsets: dict[str, int]
    critical_onsets: dict[str, int]
    warning_updates: dict[str, int]
    critical_updates: dict[str, int]


def judge_healthy(res: RunResult) -> HealthyVerdict:
    w_on: Counter[str] = Counter()
    c_on: Counter[str] = Counter()
    w_up: Counter[str] = Counter()
    c_up: Counter[str] = Counter()
    for row in res.rows:
        for kind, sev, _ in row.onsets:
            (c_on if sev == "critical" else w_on)[kind] += 1
        for kind, sev, _ in row.anomalies:
            (c_up if sev == "critical" else w_up)[kind] += 1
    return HealthyVerdict(
        seed=res.job.seed,
        updates=res.updates_run,
        warning_onsets=dict(sorted(w_on.items())),
        critical_onsets=dict(sorted(c_on.items())),
        warning_updates=dict(sorted(w_up.items())),
        critical_updates=dict(sorted(c_up.items())),
    )


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _after(n: int | None) -> str:
    return "—" if n is None else f"+{n}"


def _kinds(d: dict[str, Any]) -> str:
    if not d:
        return "none"
    return ", ".join(f"{k} ({v})" if isinstance(v, str) else f"{k} ×{v}" for k, v in d.items())


def markdown(injected: list[InjectedVerdict], healthy: list[HealthyVerdict], meta: dict[str, Any]) -> str:
    lines = [
        f"Detection matrix (`python benchmarks/detection_matrix.py`), {meta['date']}, {meta['machine']}.",
        "",
        f"Injected runs: `--inject KIND@{meta['onset']}` of a {meta['updates']}-update demo run, real "
        "TelemetryHub (NORMAL, auto-escalation) and default Thresholds. **Onset** = the update at "
        "which the injected mechanism first acts (its coefficient, learning rate, weights or "
        "observation are changed for that update; from the trainer's own record); `+0` = flagged "
        "by the onset update's own snapshot. Detected = flagged as its own kind (any severity) "
        f"within {WINDOW} updates of onset. Other kinds: active from onset to the end of the run "
        f"(onset + {meta['after_window']}), worst severity.",
        "",
        "| injection | seed | expected kind | detected | first alarm | first critical "
        "| other kinds after onset | alarms before onset |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in injected:
        lines.append(
            f"| {v.injection} | {v.seed} | {v.expected} | {'yes' if v.detected else '**no**'} "
            f"| {_after(v.warning_after)} | {_after(v.critical_after)} | {_kinds(v.others)} "
            f"| {_kinds(v.before)} |"
        )
    lines += [
        "",
        f"Healthy runs: nothing injected, {meta['updates']} updates each; every anomaly is a false "
        "alarm. Onsets = new alarms (what a toast shows); updates = updates on which it was active.",
        "",
        "| seed | updates | critical onsets | warning onsets | critical updates | warning updates |",
        "|---|---|---|---|---|---|",
    ]
    for h in healthy:
        lines.append(
            f"| {h.seed} | {h.updates} | {_kinds(h.critical_onsets)} | {_kinds(h.warning_onsets)} "
            f"| {_kinds(h.critical_updates)} | {_kinds(h.warning_updates)} |"
        )
    updates = sum(h.updates for h in healthy)
    if updates:
        crit = sum(sum(h.critical_onsets.values()) for h in healthy)
        warn = sum(sum(h.warning_onsets.values()) for h in healthy)
        lines += [
            "",
            f"All healthy runs: {updates} updates, {crit} critical onsets, {warn} warning onsets "
            f"({100 * warn / updates:.2f} per 100 updates; targets: 0 critical, at most 0.5 warnings).",
        ]
    lines += ["", f"Wall time: {meta['seconds']:.0f} s with {meta['jobs']} processes."]
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {mp.cpu_count()} cores, Python {platform.python_version()}",
        "onset": args.onset,
        "updates": args.updates,
        "after_window": WINDOW + args.after,
        "seconds": seconds,
        "jobs": args.jobs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onset", type=int, default=90, help="update of injection (default 90 = 30%% of 300)"
    )
    parser.add_argument("--updates", type=int, default=300, help="planned updates of every run")
    parser.add_argument("--inject-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--healthy-seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--kinds", nargs="+", default=list(EXPECTED), choices=list(EXPECTED))
    parser.add_argument("--after", type=int, default=3, help="updates run after onset + the window")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--record-dir", type=Path, default=None, help="keep each run's recording here")
    parser.add_argument(
        "--rejudge", type=Path, default=None, help="judge the recordings in this folder again, run nothing"
    )
    args = parser.parse_args(argv)
    if args.rejudge:
        results = sorted(rejudge(args.rejudge), key=lambda r: (r.job.injection or "", r.job.seed))
        injected = [judge_injected(r) for r in results if r.job.injection]
        healthy = [judge_healthy(r) for r in results if not r.job.injection]
        meta = _meta(args, 0.0)
        print(markdown(injected, healthy, meta))
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in results]}, indent=1))
        return 0
    record_dir = None
    if args.record_dir:
        args.record_dir.mkdir(parents=True, exist_ok=True)
        record_dir = str(args.record_dir)

    jobs = [Job(seed=s, updates=args.updates, record_dir=record_dir) for s in args.healthy_seeds]
    stop = min(args.updates, args.onset + WINDOW + args.after)
    jobs += [
        Job(seed=s, updates=args.updates, injection=k, onset=args.onset, stop=stop, record_dir=record_dir)
        for s in args.inject_seeds
        for k in args.kinds
    ]
    start = time.perf_counter()
    results: list[RunResult] = []
    with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(run_job, jobs):
            what = res.job.injection or "healthy"
            print(
                f"  done: {what:20s} seed {res.job.seed}  {res.updates_run} updates  {res.seconds:6.1f} s",
                flush=True,
            )
            results.append(res)
    seconds = time.perf_counter() - start

    results.sort(key=lambda r: jobs.index(r.job))  # the table in job order, not finishing order
    injected = [judge_injected(r) for r in results if r.job.injection]
    healthy = [judge_healthy(r) for r in results if not r.job.injection]
    meta = _meta(args, seconds)
    text = markdown(injected, healthy, meta)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in results]}, indent=1))
    missed = [v for v in injected if not v.detected]
    criticals = [h for h in healthy if h.critical_onsets or h.critical_updates]
    return 1 if missed or criticals else 0


if __name__ == "__main__":
    raise SystemExit(main())
