"""TelemetryHub: the one object a training loop holds.

The hub's parts, by responsibility:

* :mod:`~telemetry_core.hub.core`: :class:`TelemetryHub` itself: construction, the update boundary
  (``end_update``), checkpointing, the error guard, ``close``;
* :mod:`~telemetry_core.hub.observe`: the observe calls a training loop makes during an update;
* :mod:`~telemetry_core.hub.epochs`: which epoch a minibatch observed without one belongs to;
* :mod:`~telemetry_core.hub.collect`: the update's reducers, its one host transfer, detection;
* :mod:`~telemetry_core.hub.levels`: the level policy: commands, leases, profiles, escalation;
* :mod:`~telemetry_core.hub.output`: the hand-off of snapshots to the publisher and the recorder.
"""

# The defaults stay importable from telemetry_core.hub, where they were before the hub was split.
from telemetry_core.hub.core import DEFAULT_BIND as DEFAULT_BIND
from telemetry_core.hub.core import TelemetryHub
from telemetry_core.hub.levels import DEFAULT_LEASE_SECONDS as DEFAULT_LEASE_SECONDS
from telemetry_core.hub.levels import DEFAULT_LEASE_UPDATES as DEFAULT_LEASE_UPDATES

__all__ = ["TelemetryHub"]
