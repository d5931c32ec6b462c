"""What the tests of the two CleanRL recipes (``examples/cleanrl_*recipe.py``) check alike: each
update's snapshot against the numbers CleanRL's own loop computed for it, and the command line."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from telemetry_core import protocol
from telemetry_core.record import read_recording
from telemetry_core.schema import Snapshot

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_recipe(name: str) -> ModuleType:
    """The recipe ``examples/<name>.py`` as a module (it imports ``cleanrl_common`` beside it)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def check_against_the_loop(r: dict[str, Any], run_name: str) -> Snapshot:
    """Update ``r``'s snapshot (``r["snapshot"]``) against CleanRL's own statistics in ``r``."""
    snap = r["snapshot"]
    assert snap is not None and snap.step == r["iteration"] and snap.run.name == run_name
    assert snap.timesteps == r["global_step"]  # CleanRL's own x-axis
    p, v, e = snap.policy, snap.value, snap.episodes
    assert p is not None and v is not None and e is not None
    # CleanRL's clipfrac is the mean of equal-sized minibatches' fractions: the pooled share
    assert math.isclose(p.clip_fraction, r["clipfrac"], rel_tol=1e-9, abs_tol=1e-12)
    # its approx_kl is the last minibatch's k3 mean (in float32, where (r - 1) - log r loses
    # ~1e-3 of its value to cancellation): never above the hub's float64 max over minibatches
    assert r["approx_kl"] <= p.kl_k3_max * (1 + 2e-3) + 1e-9
    assert v.explained_variance is not None
    assert math.isclose(v.explained_variance, r["explained_variance"], rel_tol=1e-4, abs_tol=1e-5)
    assert e.count == len(r["episodic_returns"])
    if e.count:
        assert math.isclose(e.length_mean, float(np.mean(r["episodic_lengths"])), rel_tol=1e-9)
    assert snap.counters.telemetry_errors == 0
    return snap


def recorded_steps(path: Path) -> list[int]:
    """The step of every frame of a recording."""
    return [protocol.decode_envelope(f).step for f in read_recording(path).frames]


def check_command_line(script: Path, tmp_path: Path, *flags: str) -> None:
    """``script --bind none --record ... *flags`` runs one update: its printed line and recording."""
    record = tmp_path / "r.simrec"
    out = subprocess.run(
        [sys.executable, str(script), *flags, "--bind", "none", "--record", str(record)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("update    1/1  step     128")
    assert len(read_recording(record).frames) == 2  # the update and the closing frame
