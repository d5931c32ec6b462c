"""Save / load: the hub's state and the callback's update count as a JSON file kept beside
``model.save``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from telemetry_core.hub import TelemetryHub

__all__ = ["read_state", "write_state"]

_STATE_FORMAT = "simic-sb3-callback"
_STATE_VERSION = 1


def write_state(path: str | Path, hub: TelemetryHub, last_step: int) -> None:
    """Write the hub's state and the last update step handed to it to ``path`` (JSON)."""
    state = {
        "format": _STATE_FORMAT,
        "version": _STATE_VERSION,
        "last_step": last_step,
        "heads": dict(hub.heads),
        "hub": hub.state_dict(),
    }
    Path(path).write_text(json.dumps(state))


def read_state(path: str | Path) -> dict[str, Any]:
    """What :func:`write_state` wrote, checked for its format and version."""
    state = json.loads(Path(path).read_text())
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a SimicCallback state file")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{path}: state version {state.get('version')!r}, expected {_STATE_VERSION}")
    return state
