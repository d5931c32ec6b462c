"""TelemetryHub: the one object a training loop holds (see :mod:`telemetry_core.hub.core`)."""

from telemetry_core.hub.core import TelemetryHub

__all__ = ["TelemetryHub"]
