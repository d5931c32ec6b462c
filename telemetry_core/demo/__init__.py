"""The instrumented recurrent PPO that ``simic-tui demo`` trains, with pathology injection.

``env`` (CartPole without velocities, direction x force-level action), ``agent`` (encoder -> LSTM ->
one categorical head per action dimension + critic), ``ppo`` (the CleanRL-style loop that calls the
TelemetryHub), ``inject`` (pathologies by realistic mechanisms), ``cli`` (``python -m
telemetry_core.demo``). Torch-backed names load lazily, so importing the package (or its ``cli``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from telemetry_core.demo.cli import INJECTION_KINDS, Injection, parse_injection

__all__ = [
    "INJECTION_KINDS",
    "DemoConfig",
    "Injection",
    "RecurrentAgent",
    "UpdateRecord",
    "iter_train",
    "make_agent",
    "make_env",
    "make_hub",
    "make_vector_env",
    "parse_injection",
    "train",
]

_LAZY = {
    "DemoConfig": "telemetry_core.demo.ppo",
    "UpdateRecord": "telemetry_core.demo.ppo",
    "iter_train": "telemetry_core.demo.ppo",
    "make_agent": "telemetry_core.demo.ppo",
    "make_hub": "telemetry_core.demo.ppo",
    "train": "telemetry_core.demo.ppo",
    "RecurrentAgent": "telemetry_core.demo.agent",
    "make_env": "telemetry_core.demo.env",
    "make_vector_env": "telemetry_core.demo.env",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'telemetry_core.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
