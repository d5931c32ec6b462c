"""The anomaly detector's historical import path: ``telemetry_core.detection`` holds it, one rule
class per kind."""

from telemetry_core.detection import CRITICAL, DETECTED_KINDS, WARNING, AnomalyDetector

__all__ = ["CRITICAL", "DETECTED_KINDS", "WARNING", "AnomalyDetector"]
