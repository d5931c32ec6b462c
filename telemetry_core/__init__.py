"""telemetry_core: PPO training-health telemetry computed on the device, streamed once per update.

This package must stay importable without torch: the dashboard imports the torch-free parts
(``config``, ``schema``, ``protocol``, ``record``). Torch-backed names are resolved lazily on first
access, so ``import telemetry_core`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from telemetry_core.config import ANOMALY_KINDS, TelemetryConfig, TelemetryLevel, Thresholds

__version__ = "0.1.0"

__all__ = [
    "ANOMALY_KINDS",
    "AnomalyDetector",
    "TelemetryConfig",
    "TelemetryHub",
    "TelemetryLevel",
    "Thresholds",
    "__version__",
]

_LAZY = {
    "TelemetryHub": "telemetry_core.hub",
    "AnomalyDetector": "telemetry_core.anomaly",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'telemetry_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
