"""examples/cleanrl_continuous_recipe.py: CleanRL's ppo_continuous_action with the ``# simic`` lines on
gymnasium's Pendulum-v1, run for a few updates.

The hub's snapshots are compared with what CleanRL's own loop computes and returns (clip fraction,
explained variance, episodic returns and lengths, last-minibatch KL) and with float64 references of
the continuous-head statistics from the loop's own tensors (its log-std parameter, its pre-clip
actions); the command line is run once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from telemetry_core.reductions.gaussian import HALF_LOG_2PI_E

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cleanrl_checks as checks  # what the two recipes' tests check alike

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    return checks.load_recipe("cleanrl_continuous_recipe")


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
        p = checks.check_against_the_loop(r, "cleanrl-ppo-continuous").policy
        assert p.minibatches == 8 and p.epochs == 2 and p.samples == 2 * 256
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
    assert "action" not in records[0]["snapshot"].policy.log_std_trend  # one update: no slope yet
    assert math.isfinite(records[2]["snapshot"].policy.log_std_trend["action"])
    assert checks.recorded_steps(tmp_path / "continuous.simrec") == [1, 2, 3, 3]  # 3 again: the closing frame


def test_command_line(tmp_path: Path) -> None:
    checks.check_command_line(
        checks.EXAMPLES / "cleanrl_continuous_recipe.py", tmp_path,
        "--total-timesteps", "128", "--num-steps", "128", "--num-minibatches", "2", "--update-epochs", "1",
        "--no-anneal-lr",
    )
