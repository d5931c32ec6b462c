"""Fixtures shared by several test files."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest


@pytest.fixture
def deterministic_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC clock labels, colour on, the default theme: what the committed snapshot SVGs assume."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("TEXTUAL_THEME", raising=False)
    yield
    monkeypatch.undo()
    time.tzset()
