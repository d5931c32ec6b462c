"""Anomaly detection: one rule class per kind of ``telemetry_core.kinds`` (each owns its state),
run by :class:`AnomalyDetector`. Torch-free: it judges Structs, so recordings can be re-judged."""

from telemetry_core.detection.base import CRITICAL, WARNING
from telemetry_core.detection.detector import DETECTED_KINDS, RULES, AnomalyDetector

__all__ = ["CRITICAL", "DETECTED_KINDS", "RULES", "WARNING", "AnomalyDetector"]
