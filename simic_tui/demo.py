"""``simic-tui demo``: run the demo trainer in a child process and attach the dashboard to it.

The trainer is ``python -m telemetry_core.demo`` (torch lives there, never in this process). Its
output goes to a log file, because the dashboard owns the terminal; quitting the dashboard stops it
cleanly: SIGINT (the trainer's own Ctrl-C path: it closes its hub and recording), then SIGTERM,
then SIGKILL if it still will not go.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import telemetry_core
from simic_tui.crash import open_private
from telemetry_core.protocol import connection_dir

__all__ = ["DemoError", "DemoTrainer", "demo_available", "free_port_pair", "trainer_command"]

DEMO_MODULE = "telemetry_core.demo"


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to install."""


def demo_available() -> str:
    """'' when the demo trainer can run here, else the reason (checked without importing torch)."""
    main = Path(telemetry_core.__file__).parent / "demo" / "__main__.py"
    if not main.exists():
        return "the demo trainer (telemetry_core.demo) is not part of this installation"
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("gymnasium") is None:
        return "the demo trainer needs torch and gymnasium: pip install 'simic-tui[trainer]'"
    return ""


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P + 1 free (the trainer binds PUB on P and its command port on P + 1)."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise DemoError("could not find two free consecutive ports on 127.0.0.1; pass --port")


def trainer_command(
    port: int,
    *,
    updates: int | None = None,
    seed: int | None = None,
    record: str | None = None,
    inject: list[str] | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", DEMO_MODULE, "--port", str(port)]
    if updates is not None:
        cmd += ["--updates", str(updates)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if record is not None:
        cmd += ["--record", record]
    for item in inject or []:
        cmd += ["--inject", item]
    return cmd


class DemoTrainer:
    """The trainer child of ``simic-tui demo`` (a :class:`~simic_tui.app.TrainerProcess`): started in
    its own session, stopped cleanly."""

    def __init__(self, command: list[str], *, log_path: Path | None = None) -> None:
        self.command = command
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> DemoTrainer:
        # In the user's 0700 runtime directory, 0600, never through a planted symlink: the shared
        # temporary directory would let another user pre-create or redirect the file.
        if self._log_path is None:
            self._log_path = connection_dir() / f"demo-{os.getpid()}.log"
        else:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_private(self._log_path)
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the dashboard's terminal keys never reach it
            )
        finally:
            os.close(fd)
        return self

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        return proc.poll()
