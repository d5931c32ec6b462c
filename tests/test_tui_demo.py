"""``simic-tui demo`` end to end with the real demo trainer (python -m telemetry_core.demo).

The dashboard attaches to the child it started, a DEBUG lease round-trips through the real hub, and
quitting stops the trainer cleanly (exit 0, connection file removed). ``--headless`` runs only the
trainer in the foreground.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simic_tui.cli import build_parser, launch_demo
from simic_tui.client import LeasePhase, LinkState
from simic_tui.demo import demo_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[1]

if demo_available():
    pytest.skip(f"the demo trainer cannot run here: {demo_available()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))  # the child inherits it: its connection file lands here
    return d


async def test_demo_attaches_to_its_trainer_and_quitting_stops_it_cleanly(
    tmp_path: Path, _runtime_dir: Path
) -> None:
    args = build_parser().parse_args(
        ["demo", "--updates", "200", "--seed", "2", "--log", str(tmp_path / "trainer.log")]
    )
    app, trainer = launch_demo(args)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            client = app.client
            assert client is not None
            deadline = time.monotonic() + 150
            while not (app.store.count >= 2 and client.commands_unavailable() == ""):
                assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the demo never streamed"
                await pilot.pause(0.2)
            assert client.status.state == LinkState.LIVE
            assert client.target.require_pid == trainer.pid
            assert list(_runtime_dir.rglob("*.json")), "the trainer's connection file"
            await pilot.press("d")
            while client.lease.phase != LeasePhase.ACTIVE:
                assert time.monotonic() < deadline + 60, f"no lease: {client.lease}"
                await pilot.pause(0.2)
            await pilot.press("escape", "q")
    finally:
        code = trainer.stop(timeout=20)
    assert code == 0, (tmp_path / "trainer.log").read_text()[-2000:]
    assert not list(_runtime_dir.rglob("*.json")), "the trainer removed its connection file on the way out"


def test_headless_demo_runs_only_the_trainer_in_the_foreground() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simic_tui.cli", "demo", "--headless", "--updates", "2", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "simic-tui attach 127.0.0.1:" in proc.stdout
    assert "Traceback" not in proc.stderr
