"""DEBUG-only diagnostics: per-layer gradient table, numerical stability, ratio outliers, conflict.

Everything here rides in the hub's single transfer per update. :class:`DebugDiagnostics`
(``diagnostics.py``) follows the reducer protocol: ``reset`` at the start of an update,
``observe_*`` accumulate on the device with no host sync, ``pending(level)`` hands over tensors
under ``"debug."`` names, ``build(host, level)`` turns the transferred floats into a
:class:`~telemetry_core.schema.DebugReport`. Each diagnostic lives in its own module:

* ``layers.py`` — the per-layer table: exact statistics of every gradient element with a fixed
  number of kernels per backward however many parameter tensors there are (one copy into a
  chunked buffer, row reductions, one scatter to parameters); per-parameter norms on every
  backward, the element statistics on every ``table_every``-th backward of the run.
* ``numerical.py`` — non-finite losses, gradients and weights, largest magnitudes, the pre-clip
  total norm of every backward.
* ``outliers.py`` — the worst samples of the update by |log ratio|, joint and per head.
* ``conflict.py`` — cosines between the gradients of the separate loss terms (extra backward
  passes), on every ``conflict_every``-th DEBUG update.

The hub calls ``observe_*`` only at DEBUG; :meth:`DebugDiagnostics.reset` also accepts the update's
level and turns every ``observe_*`` into a no-op below DEBUG, so a hub that always forwards costs
nothing. What each costs is measured by ``benchmarks/bench_gradients.py`` and
``benchmarks/bench_debug.py`` (figures in BENCHMARKS.md).
"""

from telemetry_core.debug.diagnostics import PREFIX, DebugDiagnostics

__all__ = ["PREFIX", "DebugDiagnostics"]
