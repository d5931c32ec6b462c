"""examples/cleanrl_continuous_recipe.py: CleanRL's ppo_continuous_action with the ``# simic`` lines on
gymnasium's Pendulum-v1, run for a few updates.

The hub's snapshots are compared with what CleanRL's own loop computes and returns (clip fraction,
explained variance, episodic returns and lengths, last-minibatch KL) and with float64 references of
the continuous-head statistics from the loop's own tensors (its log-std parameter, its pre-clip
actions); the command line is run once.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from telemetry_core import protocol
from telemetry_core.record import read_recording
from telemetry_core.reductions.gaussian import HALF_LOG_2PI_E

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cleanrl_continuous_recipe.py"


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cleanrl_continuous_recipe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_snapshots_agree_with_the_loops_own_statistics(recipe: ModuleType, tmp_path: Path) -> None:
    args = recipe.Args(
        total_timesteps=3 * 256,
        num_steps=256,
        num_minibatches=4,
        update_epochs=2,
        bind=None,
        record=str(tmp_path / "continuous.simrec"),
    )
    records = recipe.main(args)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert sum(len(r["episodic_lengths"]) for r in records) > 0  # Pendulum episodes end at 200 steps
    for r in records:
        snap = r["snapshot"]
        assert snap is not None and snap.step == r["iteration"] and snap.run.name == "cleanrl-ppo-continuous"
        p, v, e = snap.policy, snap.value, snap.episodes
        assert p is not None and v is not None and e is not None
        assert p.minibatches == 8 and p.epochs == 2 and p.samples == 2 * 256
        assert math.isclose(p.clip_fraction, r["clipfrac"], rel_tol=1e-9, abs_tol=1e-12)
        assert r["approx_kl"] <= p.kl_k3_max * (1 + 2e-3) + 1e-9
        assert v.explained_variance is not None
        assert math.isclose(v.explained_variance, r["explained_variance"], rel_tol=1e-4, abs_tol=1e-5)
        assert e.count == len(r["episodic_returns"])
        if e.count:
            assert math.isclose(e.length_mean, float(np.mean(r["episodic_lengths"])), rel_tol=1e-9)
        # a continuous head: no normalised entropy; its log-std and differential entropy instead
        assert p.entropy_normalized == {}
        log_std = r["log_std"].reshape(-1)  # the parameter after the update, float64
        assert math.isclose(p.log_std_mean["action"], float(log_std.mean()), rel_tol=1e-12, abs_tol=1e-15)
        assert p.log_std_min["action"] == float(log_std.min()) == p.log_std_max["action"]
        ref_entropy = float(torch.distributions.Normal(0.0, log_std.exp()).entropy().sum())
        assert math.isclose(p.entropy_differential["action"], ref_entropy, rel_tol=1e-12)
        assert math.isclose(p.entropy_differential["action"], float(log_std.sum()) + HALF_LOG_2PI_E)
        # the rollout's pre-clip actions against Pendulum's torque bounds (+-2), in float64
        actions = r["actions"].numpy()
        assert math.isclose(p.action_saturation["action"], float((np.abs(actions) > 2.0).mean()), rel_tol=1e-12)
        assert p.action_saturation_max["action"] == p.action_saturation["action"]  # one dimension
        assert snap.counters.telemetry_errors == 0
    assert "action" not in records[0]["snapshot"].policy.log_std_trend  # one update: no slope yet
    assert math.isfinite(records[2]["snapshot"].policy.log_std_trend["action"])
    rec = read_recording(tmp_path / "continuous.simrec")
    assert [protocol.decode_envelope(f).step for f in rec.frames] == [1, 2, 3, 3]  # 3 again: the closing frame


def test_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--total-timesteps",
            "128",
            "--num-steps",
            "128",
            "--num-minibatches",
            "2",
            "--update-epochs",
            "1",
            "--bind",
            "none",
            "--record",
            str(tmp_path / "r.simrec"),
            "--no-anneal-lr",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("update    1/1  step     128")
    assert len(read_recording(tmp_path / "r.simrec").frames) == 2  # the update and the closing frame
