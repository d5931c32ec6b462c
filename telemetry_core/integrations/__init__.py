"""Integrations with other tools; each module imports its tool only when it is itself imported.

* :mod:`telemetry_core.integrations.sb3` — ``SimicCallback``, a Stable-Baselines3 callback for
  ``PPO`` and sb3-contrib's ``RecurrentPPO`` (extra ``simic-tui[sb3]``).
* :mod:`telemetry_core.integrations.tensorboard` — ``export_recording``: a recording as TensorBoard
  scalars, histograms and text (extra ``simic-tui[tensorboard]``; torch-free).

Nothing is imported here, so ``import telemetry_core.integrations`` costs nothing and needs neither.
"""

from __future__ import annotations

__all__: list[str] = []
