"""Fixtures shared by several test files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def deterministic_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC clock labels, colour on, the default theme, a 256-colour terminal: what the committed
    snapshot SVGs assume (the palette follows the terminal's depth, see simic_tui.palette)."""
    import textual.constants

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("TEXTUAL_THEME", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("COLORTERM", raising=False)
    monkeypatch.setattr(textual.constants, "COLOR_SYSTEM", "auto")  # depth from TERM, as in a terminal
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def sb3_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private runtime directory (connection files) and one torch thread, for the SB3 tests."""
    import torch

    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
