"""How many incidents does a long healthy run leave in the operator's log?

Run from the repository root, on a recording of a healthy run (the demo's, say)::

    python -m telemetry_core.demo --no-network --updates 3000 --seed 1 --record runs/demo3000.simrec --quiet
    python benchmarks/long_run_incidents.py runs/demo3000.simrec [--planned 3000]

Re-judges every recorded snapshot with the *current* detector and incident layer (the calibration
harness's replayer, which escalates within the DEBUG budget as the hub does) and prints the incidents
the log would hold at the end (one row per incident: kind, scope, peak severity, first-last step),
onsets per 100 updates by severity, and the share of updates that would have run at DEBUG. The
recording may still be growing (a run in progress): what is complete is judged.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here))
sys.path.append(str(_here.parent))

from calibration.matrix import _Replayer, _snapshots  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording", type=Path)
    ap.add_argument("--planned", type=int, default=None, help="planned updates (default: the run's own)")
    args = ap.parse_args(argv)
    snaps = _snapshots(args.recording)
    if not snaps:
        print("no snapshots in", args.recording)
        return 1
    planned = args.planned or snaps[0].run.planned_updates or len(snaps)
    rep = _Replayer(planned, dict(snaps[0].run.heads))
    log: dict[int, tuple[str, str, str, int, int]] = {}
    onsets: Counter[str] = Counter()
    debug = 0
    for snap in snaps:
        row = rep.judge(snap)
        debug += row.level == "DEBUG"
        for inc in rep.incidents.active():
            log[inc.id] = (inc.kind, inc.scope, inc.peak_severity, inc.onset_step, inc.last_step)
        for event, _kind, severity, _scope in row.events:
            if event == "onset":
                onsets[severity] += 1
            elif event == "upgrade":
                onsets["critical"] += 1
    n = len(snaps)
    print(f"{args.recording}: {n} updates (steps {snaps[0].step}-{snaps[-1].step}), planned {planned}")
    print(f"incidents in the log at the end: {len(log)}")
    for kind, scope, sev, first, last in log.values():
        print(f"  {sev:8s} {kind}{f' ({scope})' if scope else ''}  {first}-{last}")
    print(
        f"onsets per 100 updates: warning {100 * onsets['warning'] / n:.2f}, "
        f"critical {100 * onsets['critical'] / n:.2f}; DEBUG {debug} of {n} updates ({100 * debug / n:.1f} %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
