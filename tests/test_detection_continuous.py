"""Detection quality of the continuous-head rules on real training: CleanRL's ppo_continuous_action
loop (``examples/cleanrl_continuous_recipe.py``) on gymnasium's Pendulum-v1 under the real hub, with
one failure injected through the recipe's ``before_update`` hook. Each new kind must be flagged as
itself within one update of the onset, with no critical alarm before it; a healthy run of the same
loop raises none of these kinds. (The calibration across tasks and seeds, with latencies and false
alarm rates: ``benchmarks/continuous_calibration.py``.)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from telemetry_core.anomaly import CRITICAL
from telemetry_core.schema import Snapshot

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
ONSET = 7  # after baseline_min_updates known updates: the relative limits are live
NEW_KINDS = ("std_collapse", "std_explosion", "action_saturation")


def _recipe() -> ModuleType:
    name = "cleanrl_continuous_recipe"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def _at(onset: int, act: Callable[[Any], None]) -> Callable[[int, Any, Any], None]:
    def hook(iteration: int, agent: Any, args: Any) -> None:
        if iteration == onset:
            with torch.no_grad():
                act(agent)

    return hook


def _logstd(delta: float) -> Callable[[Any], None]:
    def act(agent: Any) -> None:
        agent.actor_logstd += delta

    return act


def _shift_mean(agent: Any) -> None:
    agent.actor_mean[-1].bias += 4.0  # twice Pendulum's torque bound of 2


@dataclass(frozen=True)
class Case:
    act: Callable[[Any], None]
    why: str


CASES: dict[str, Case] = {
    "std_collapse": Case(_logstd(-2.5), "the log-std parameter is lowered by 2.5 nats (std x0.08)"),
    "std_explosion": Case(_logstd(3.0), "the log-std parameter is raised by 3 nats (std x20)"),
    "action_saturation": Case(
        _shift_mean, "the actor's output bias moves the mean by twice the action bound (a scaling slip)"
    ),
}


def run(hook: Callable[[int, Any, Any], None] | None, updates: int, seed: int = 1) -> dict[int, Snapshot]:
    r = _recipe()
    args = r.Args(
        env_id="Pendulum-v1",
        seed=seed,
        num_steps=256,
        num_minibatches=4,
        update_epochs=4,
        total_timesteps=256 * updates,
        bind=None,
    )
    return {rec["iteration"]: rec["snapshot"] for rec in r.main(args, before_update=hook)}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_continuous_injection_is_flagged_as_its_kind(kind: str) -> None:
    snaps = run(_at(ONSET, CASES[kind].act), ONSET + 1)
    fired = {s: {a.kind: a.severity for a in snap.anomalies} for s, snap in snaps.items()}
    assert kind in fired[ONSET] or kind in fired[ONSET + 1], (CASES[kind].why, fired)
    before = [(s, k) for s in range(1, ONSET) for k, sev in fired[s].items() if sev == CRITICAL or k == kind]
    assert not before, before


def test_a_healthy_continuous_run_raises_none_of_these_kinds() -> None:
    snaps = run(None, 14, seed=2)
    found = [(s, a.kind, a.severity) for s, snap in snaps.items() for a in snap.anomalies if a.kind in NEW_KINDS]
    assert not found, found
    assert not [a for snap in snaps.values() for a in snap.anomalies if a.severity == CRITICAL]
