"""Calibration of the continuous-head rules (std_collapse, std_explosion, action_saturation).

``run`` trains CleanRL's ppo_continuous_action loop (``examples/cleanrl_continuous_recipe.py``) on
each task, healthy over several seeds and with one pathology injected at ``--onset``, and keeps a
recording per run; ``judge`` re-judges every recording with the detector of the ``telemetry_core`` on
the path (so changed rules need no retraining) and prints, per injection, the first update flagged as
its kind (latency from onset) and, over the healthy runs, warning and critical onsets per 100 updates.

Injections (from the onset update on, through the recipe's ``before_update`` hook):

* ``neg_ent``: the entropy coefficient becomes ``-0.05`` (a wrong-sign entropy term): every update
  shrinks the log-std as fast as the optimiser allows -> ``std_collapse``.
* ``neg_ent_strong``: ``-1.0``, an entropy term that dominates the loss.
* ``logstd_down``: the log-std parameter is lowered by 2.5 nats once (std x 0.08, e.g. a bad
  checkpoint or an init bug) -> ``std_collapse``.
* ``logstd_up``: raised by 3 nats once (std x 20) -> ``std_explosion``.
* ``mean_shift``: the actor's output bias moves the mean by twice the action bound (an action
  scaling slip between policy and environment, or a bad checkpoint): the actions pile up beyond the
  bounds -> ``action_saturation``.
* ``obs_scale``: the actor's and critic's inputs are multiplied by 30 (an observation-scale slip
  after normalisation). Early in training it does *not* saturate the actions (the actor's output
  layer starts at gain 0.01, so saturated hidden units still give a small mean); the kinds it raises
  are reported as they come.

    PYTHONPATH=$PWD python benchmarks/continuous_calibration.py run --out /tmp/cont-cal
    PYTHONPATH=$PWD python benchmarks/continuous_calibration.py judge --out /tmp/cont-cal
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Which kind each injection must be flagged as.
EXPECTED = {
    "neg_ent": "std_collapse",
    "neg_ent_strong": "std_collapse",
    "logstd_down": "std_collapse",
    "logstd_up": "std_explosion",
    "mean_shift": "action_saturation",
    "obs_scale": None,  # what it breaks depends on the network: reported as the kinds it raised
}
NEW_KINDS = ("std_collapse", "std_explosion", "action_saturation")


def recipe() -> ModuleType:
    """``examples/cleanrl_continuous_recipe.py`` as a module (examples/ goes on the path: the recipe
    imports ``cleanrl_common`` from beside it)."""
    examples = str(ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    return importlib.import_module("cleanrl_continuous_recipe")


def injection(kind: str, onset: int) -> Callable[[int, Any, Any], None]:
    """The recipe's ``before_update`` hook that injects ``kind`` at update ``onset``."""
    import gymnasium as gym
    import numpy as np
    import torch

    def hook(iteration: int, agent: Any, args: Any) -> None:
        if iteration != onset:
            return
        if kind == "neg_ent":
            args.ent_coef = -0.05
        elif kind == "neg_ent_strong":
            args.ent_coef = -1.0
        elif kind == "logstd_down":
            with torch.no_grad():
                agent.actor_logstd -= 2.5
        elif kind == "logstd_up":
            with torch.no_grad():
                agent.actor_logstd += 3.0
        elif kind == "mean_shift":
            bound = float(np.max(np.abs(gym.make(args.env_id).action_space.high)))
            with torch.no_grad():
                agent.actor_mean[-1].bias += 2.0 * bound
        elif kind == "obs_scale":
            for module in (agent.actor_mean, agent.critic):
                module.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * 30.0,))
        else:
            raise ValueError(f"unknown injection {kind!r}")

    return hook


def run(out: Path, envs: list[str], seeds: list[int], injections: list[str], updates: int, onset: int,
        num_steps: int, minibatches: int, after_onset: int) -> None:
    r = recipe()
    out.mkdir(parents=True, exist_ok=True)
    plan = [(env, inj, seeds[0]) for env in envs for inj in injections if inj != "healthy"]
    plan += [(env, "healthy", seed) for env in envs for seed in seeds if "healthy" in injections]
    for env, inj, seed in plan:
        path = out / f"{env}__{inj}__{seed}.simrec"
        if path.exists() or Path(str(path) + ".part").exists():  # done, or another process runs it
            continue
        n = updates if inj == "healthy" else min(updates, onset + after_onset)
        args = r.Args(
            seed=seed, env_id=env, num_steps=num_steps, num_minibatches=minibatches,
            total_timesteps=num_steps * n, bind=None, record=str(path) + ".part",
        )
        hook = None if inj == "healthy" else injection(inj, onset)
        t0 = time.time()
        r.main(args, before_update=hook)
        Path(str(path) + ".part").rename(path)
        meta = {"env": env, "injection": inj, "seed": seed, "onset": None if inj == "healthy" else onset,
                "updates": n, "num_steps": num_steps, "minibatches": minibatches,
                "seconds": time.time() - t0}
        path.with_suffix(".json").write_text(json.dumps(meta))
        print(f"# {env} {inj} seed {seed}: {time.time() - t0:.0f} s", flush=True)


def snapshots(path: Path) -> list[Any]:
    """One snapshot per update (the trainer's closing frame is not an update)."""
    from telemetry_core.record import read_updates

    return list(read_updates(path))


def judge(outs: list[Path], verbose: bool) -> int:
    from telemetry_core.config import Thresholds
    from telemetry_core.detection import AnomalyDetector

    healthy_updates = 0
    healthy_onsets = {"warning": 0, "critical": 0}
    healthy_by_kind: dict[str, int] = {}
    margins = {"drop": 0.0, "rise": 0.0, "saturation": 0.0, "log_std_min": math.inf}
    rows = []
    for meta_path in sorted(p for out in outs for p in out.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        snaps = snapshots(meta_path.with_suffix(".simrec"))
        det = AnomalyDetector(Thresholds(), total_updates=meta["updates"], heads={"action": 1})
        first: dict[str, tuple[int, str]] = {}
        onsets = []
        for snap in snaps:
            det.check(snap)
            for a in det.onsets:
                onsets.append((snap.step, a.kind, a.severity))
            for a in det.last:
                if a.kind not in first or (a.severity == "critical" and first[a.kind][1] != "critical"):
                    first.setdefault(a.kind, (snap.step, a.severity))
            if verbose:
                p = snap.policy
                print(
                    f"{meta_path.stem} {snap.step:3d} ls {p.log_std_mean.get('action', float('nan')):7.3f} "
                    f"tr {p.log_std_trend.get('action', float('nan')):7.3f} "
                    f"sat {p.action_saturation.get('action', float('nan')):.3f} "
                    f"kl {p.kl_k3_mean:.4f} " + " ".join(f"{a.kind}:{a.severity[0]}" for a in det.last)
                )
        if EXPECTED.get(meta["injection"], "") is None:  # no one expected kind: report what it raised
            after = sorted({f"{k}:{sev[0]}@+{s - meta['onset']}" for s, k, sev in onsets if s >= meta["onset"]})
            rows.append((meta["env"], meta["injection"], "(none expected) raised: " + ("; ".join(after) or "nothing"), -1, "-", []))
            continue
        if meta["injection"] == "healthy":
            healthy_updates += len(snaps)
            means: list[float] = []
            for snap in snaps:  # how close healthy training came to each limit
                p = snap.policy
                mean = p.log_std_mean.get("action", math.nan)
                if len(means) >= 5:
                    med = statistics.median(means[-20:])
                    margins["drop"] = max(margins["drop"], med - mean)
                    margins["rise"] = max(margins["rise"], mean - med)
                means.append(mean)
                margins["log_std_min"] = min(margins["log_std_min"], p.log_std_min.get("action", math.inf))
                margins["saturation"] = max(margins["saturation"], p.action_saturation_max.get("action", 0.0))
            for _, kind, severity in onsets:
                healthy_onsets[severity] += 1
                healthy_by_kind[f"{kind}:{severity}"] = healthy_by_kind.get(f"{kind}:{severity}", 0) + 1
        else:
            want = EXPECTED[meta["injection"]]
            hit = [(s, sev) for s, k, sev in onsets if k == want and s >= meta["onset"]]
            early = [(s, k, sev) for s, k, sev in onsets if s < meta["onset"]]
            latency = hit[0][0] - meta["onset"] if hit else None
            rows.append((meta["env"], meta["injection"], want, latency, hit[0][1] if hit else "-", early))
    print(f"# judged {' '.join(map(str, outs))} with {Path(sys.modules['telemetry_core'].__file__).parent} on {platform.node()}")
    print("| task | injection | expected kind | latency (updates after onset) | severity | alarms before onset |")
    print("|---|---|---|---|---|---|")
    for env, inj, want, latency, sev, early in rows:
        lat = "missed" if latency is None else "-" if latency < 0 else str(latency)
        print(f"| {env} | {inj} | {want} | {lat} | {sev} | {len(early)} |")
    per100 = {k: 100.0 * v / max(healthy_updates, 1) for k, v in healthy_onsets.items()}
    print(
        f"healthy: {healthy_updates} updates; onsets per 100 updates: warning {per100['warning']:.2f}, "
        f"critical {per100['critical']:.2f}; by kind {healthy_by_kind}"
    )
    print(
        f"healthy extremes: log-std drop below its recent median {margins['drop']:.3f} nats, rise above it "
        f"{margins['rise']:.3f}, smallest log-std {margins['log_std_min']:.3f}, worst-dimension saturation "
        f"{margins['saturation']:.3f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("run", "judge"))
    ap.add_argument("--out", type=Path, nargs="+", required=True, help="judge: one or more run directories")
    ap.add_argument("--envs", nargs="+", default=["Pendulum-v1", "InvertedPendulum-v5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--injections", nargs="+", default=[*EXPECTED, "healthy"])
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--onset", type=int, default=16)
    ap.add_argument("--num-steps", type=int, default=1024)
    ap.add_argument("--minibatches", type=int, default=16)
    ap.add_argument("--after-onset", type=int, default=8, help="updates an injected run goes on after onset")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.mode == "run":
        run(a.out[0], a.envs, a.seeds, a.injections, a.updates, a.onset, a.num_steps, a.minibatches, a.after_onset)
        return 0
    return judge(a.out, a.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
