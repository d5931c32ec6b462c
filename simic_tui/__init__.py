"""simic_tui: the live terminal dashboard for telemetry_core streams. Never imports torch."""

__version__ = "0.1.0"
__all__ = ["__version__"]
