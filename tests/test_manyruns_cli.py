"""The many-runs commands refuse what they cannot do in one plain sentence and a usage exit code:
``compare`` without usable files, ``attach`` without an address, ``--baseline`` or
``--connection-file`` with a sweep, a baseline that is not a recording, more trainers than a sweep holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simic_tui.sweep import MAX_SWEEP_RUNS

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = Path(__file__).parent / "fixtures" / "cmp_healthy.simrec"

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simic_tui.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ},
    )


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("attach",), 2, ("needs HOST:PORT", "--scan")),
        (("attach", "127.0.0.1:5555", "127.0.0.1:5557", "--baseline", str(HEALTHY)), 2, ("one trainer",)),
        (("attach", "127.0.0.1:5555", "127.0.0.1:5557", "--connection-file", "x.json"), 2, ("one trainer",)),
        (("attach", "--scan", "--baseline", str(HEALTHY)), 2, ("not a sweep",)),
        (("attach", *[f"127.0.0.1:{6000 + 2 * i}" for i in range(MAX_SWEEP_RUNS + 1)]), 2, ("at most",)),
        (("attach", "127.0.0.1:5555", "--baseline", "missing.simrec"), 1, ("--baseline", "does not exist")),
        (("compare",), 2, ("FILE",)),
        (("compare", str(HEALTHY), "missing.simrec"), 1, ("does not exist",)),
    ],
)
def test_plain_refusals(args: tuple[str, ...], code: int, words: tuple[str, ...]) -> None:
    proc = cli(*args)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def test_help_names_the_many_runs_commands() -> None:
    out = cli("--help").stdout
    assert "compare" in out and "--scan" in out
    attach = cli("attach", "--help").stdout
    assert "--scan" in attach and "--baseline" in attach
