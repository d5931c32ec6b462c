"""examples/cleanrl_recipe.py: CleanRL's PPO with the ``# simic`` lines, run for a few updates.

The hub's snapshots are compared with the numbers CleanRL's own loop computes and returns (clip
fraction, explained variance, episodic returns, last-minibatch KL); the command line is run once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cleanrl_checks as checks  # what the two recipes' tests check alike

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    return checks.load_recipe("cleanrl_recipe")


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
        snap = checks.check_against_the_loop(r, "cleanrl-ppo")
        assert snap.timesteps == 128 * r["iteration"]
        p, g, e = snap.policy, snap.gradients, snap.episodes
        assert p.minibatches == 4 and p.epochs == 2 and p.samples == 2 * 128
        assert g is not None and g.calls == 4 and g.total_norm > 0 and g.max_grad_norm == 0.5
        if e.count:
            assert math.isclose(e.return_mean, float(np.mean(r["episodic_returns"])), rel_tol=1e-9)
        assert 0 < p.entropy_normalized["action"] <= 1
    assert checks.recorded_steps(tmp_path / "cleanrl.simrec") == [1, 2, 3, 3]  # 3 again: the closing frame


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
    checks.check_command_line(
        checks.EXAMPLES / "cleanrl_recipe.py", tmp_path,
        "--total-timesteps", "128", "--num-envs", "2", "--num-steps", "64", "--no-anneal-lr",
    )
