"""The sweep table against real demo trainers: three PPO runs on different seeds and injections, found
by ``--scan`` (one of them starting after the table opened), one killed and one restarted during the
test; drill-in and back; a DEBUG lease that reaches the selected trainer only.

Every trainer is the real demo (``python -m telemetry_core.demo``: torch training, the real hub and
publisher, a connection file in a private runtime directory); the dashboard is the real SweepApp
driven by Pilot, its clients on real loopback sockets with the trainers' CURVE keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simic_tui.client import LeasePhase, LinkState
from simic_tui.demo import demo_available, free_port_pair
from simic_tui.screens.debug import DebugScreen
from simic_tui.screens.sweep import SweepApp, SweepDashboard, SweepScreen, SweepTable
from simic_tui.sweep import SweepRun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(bool(demo_available()), reason=demo_available() or "demo available"),
]


class Trainers:
    """Real demo trainer processes in a private runtime directory; all killed at the end."""

    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, port: int, seed: int, inject: str | None = None) -> None:
        cmd = [sys.executable, "-m", "telemetry_core.demo", "--port", str(port), "--updates", "400"]
        cmd += ["--seed", str(seed), "--run-name", name, "--quiet"]
        if inject:
            cmd += ["--inject", inject]
        env = {**os.environ, "SIMIC_RUNTIME_DIR": str(self.runtime)}
        self.procs[name] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


async def until(pilot, cond: Callable[[], bool], timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.25)


def by_name(app: SweepApp, name: str) -> SweepRun | None:
    for run in app.runs:
        snap = run.store.latest
        if snap is not None and snap.run.name == name:
            return run
    return None


def step_of(app: SweepApp, name: str) -> int:
    run = by_name(app, name)
    return -1 if run is None or run.store.latest is None else run.store.latest.step


async def test_a_sweep_of_real_trainers_found_killed_restarted_and_commanded(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    scan_dir = runtime / "simic-tui"
    trainers = Trainers(runtime)
    ports = {"healthy": free_port_pair(), "klspike": free_port_pair()}
    trainers.start("healthy", ports["healthy"], seed=1)
    trainers.start("klspike", ports["klspike"], seed=2, inject="kl-spike@3")
    try:
        scan_dir.mkdir(mode=0o700)
        app = SweepApp([], scan=True, scan_dir=scan_dir)
        async with app.run_test(size=(120, 30)) as pilot:
            await until(
                pilot,
                lambda: step_of(app, "healthy") >= 1 and step_of(app, "klspike") >= 1,
                240,
                "the first two trainers in the table",
            )
            # a third trainer starts after the table opened: the scan finds it
            ports["nan"] = free_port_pair()
            trainers.start("nan", ports["nan"], seed=3, inject="nan-gradients@2")
            await until(pilot, lambda: step_of(app, "nan") >= 3, 240, "the late trainer to join and train")
            assert len(app.runs) == 3
            screen = app.sweep
            assert isinstance(app.screen, SweepScreen)
            await until(pilot, lambda: len(screen.rows) == 3, 5, "three rows")
            # the NaN injection is a critical incident: the table's badge says so
            await until(
                pilot,
                lambda: (
                    any(r.name == "nan" for r in screen.rows)
                    and by_name(app, "nan").store.incidents.total > 0
                ),  # type: ignore[union-attr]
                120,
                "the NaN run's incident",
            )
            title = str(screen.query_one("#sweep-title").render())
            assert "incident" in title

            # one killed: its row leaves "live" and stays in the table
            killed = by_name(app, "klspike")
            assert killed is not None
            trainers.kill("klspike")
            await until(
                pilot, lambda: killed.client.status.state != LinkState.LIVE, 30, "the killed run's link"
            )
            await until(
                pilot,
                lambda: not next(r for r in screen.rows if r.key == killed.key).link.startswith("live"),
                5,
                "the table to show the killed run's link",
            )

            # one restarted on the same port (a new session): the same row follows the new trainer
            first = by_name(app, "healthy")
            assert first is not None
            old_session = first.store.session
            trainers.kill("healthy")
            trainers.start("healthy", ports["healthy"], seed=4)
            await until(
                pilot,
                lambda: first.store.session not in (None, old_session) and first.store.latest is not None,
                240,
                "the restarted trainer's new session",
            )
            assert first.client.status.restarts >= 1
            assert len(app.runs) == 3  # the same row, not a new one

            # drill in and back
            table = screen.query_one(SweepTable)
            table.move_cursor(row=screen._order.index(first.key))
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, SweepDashboard)
            assert app.store is first.store and app.client is first.client
            await pilot.press("escape")
            await pilot.pause()
            assert app.screen is screen

            # a DEBUG lease goes to the selected run only
            other = by_name(app, "nan")
            assert other is not None
            table.move_cursor(row=screen._order.index(first.key))
            await pilot.press("d")
            await pilot.pause()
            assert isinstance(app.screen, DebugScreen)
            await until(
                pilot,
                lambda: (
                    first.client.lease.phase == LeasePhase.ACTIVE
                    and first.store.latest is not None
                    and first.store.latest.level.lease_until is not None
                ),
                240,
                "the lease on the selected trainer",
            )
            assert other.client.lease.phase == LeasePhase.NONE
            assert other.store.latest is not None and other.store.latest.level.lease_until is None
            await pilot.press("escape")
            await pilot.press("escape")
            await pilot.pause()
            assert app.screen is screen
    finally:
        trainers.close()
