"""examples/cleanrl_recipe.py: CleanRL's PPO with the ``# simic`` lines, run for a few updates.

The hub's snapshots are compared with the numbers CleanRL's own loop computes and returns (clip
fraction, explained variance, episodic returns, last-minibatch KL); the command line is run once.
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

from telemetry_core import protocol
from telemetry_core.record import read_recording

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cleanrl_recipe.py"


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cleanrl_recipe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_snapshots_agree_with_the_loops_own_statistics(recipe: ModuleType, tmp_path: Path) -> None:
    args = recipe.Args(
        total_timesteps=3 * 2 * 64,
        num_envs=2,
        num_steps=64,
        num_minibatches=2,
        update_epochs=2,
        bind=None,
        record=str(tmp_path / "cleanrl.simrec"),
    )
    records = recipe.main(args)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert sum(len(r["episodic_lengths"]) for r in records) > 0  # episodes ended: lengths were checked
    for r in records:
        snap = r["snapshot"]
        assert snap is not None and snap.step == r["iteration"] and snap.run.name == "cleanrl-ppo"
        assert snap.timesteps == r["global_step"] == 128 * r["iteration"]  # CleanRL's own x-axis
        p, g, v, e = snap.policy, snap.gradients, snap.value, snap.episodes
        assert p is not None and g is not None and v is not None and e is not None
        assert p.minibatches == 4 and p.epochs == 2 and p.samples == 2 * 128
        assert g.calls == 4 and g.total_norm > 0 and g.max_grad_norm == 0.5
        # CleanRL's clipfrac is the mean of equal-sized minibatches' fractions: the pooled share
        assert math.isclose(p.clip_fraction, r["clipfrac"], rel_tol=1e-9, abs_tol=1e-12)
        # its approx_kl is the last minibatch's k3 mean (in float32, where (r - 1) - log r loses
        # ~1e-3 of its value to cancellation): never above the hub's float64 max over minibatches
        assert r["approx_kl"] <= p.kl_k3_max * (1 + 2e-3) + 1e-9
        assert v.explained_variance is not None
        assert math.isclose(v.explained_variance, r["explained_variance"], rel_tol=1e-4, abs_tol=1e-5)
        assert e.count == len(r["episodic_returns"])
        if e.count:
            assert math.isclose(e.return_mean, float(np.mean(r["episodic_returns"])), rel_tol=1e-9)
            assert math.isclose(e.length_mean, float(np.mean(r["episodic_lengths"])), rel_tol=1e-9)
        assert 0 < p.entropy_normalized["action"] <= 1
        assert snap.counters.telemetry_errors == 0
    rec = read_recording(tmp_path / "cleanrl.simrec")
    assert [protocol.decode_envelope(f).step for f in rec.frames] == [1, 2, 3]


def test_target_kl_stop_reaches_the_hub(recipe: ModuleType) -> None:
    args = recipe.Args(
        total_timesteps=2 * 2 * 64,
        num_envs=2,
        num_steps=64,
        num_minibatches=2,
        update_epochs=4,
        target_kl=1e-9,
        bind=None,
    )
    for r in recipe.main(args):
        p = r["snapshot"].policy
        # CleanRL checks the KL after each epoch: it stops after epoch 0 of every update
        assert p.early_stopped and p.early_stop_epoch == 0 and p.epochs == 1 and p.minibatches == 2
        assert p.early_stop_kl is not None and math.isclose(p.early_stop_kl, r["approx_kl"], rel_tol=1e-6)


def test_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--total-timesteps",
            "128",
            "--num-envs",
            "2",
            "--num-steps",
            "64",
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
    assert len(read_recording(tmp_path / "r.simrec").frames) == 1
