"""A known-good recording as the backdrop of a live run: its band at each update, and where the live
run leaves it.

The baseline is read like any compared recording (:func:`simic_tui.compare.load_runs`: the replay's
hostile-safe path). Its *band* at update ``u`` is the range of its own values over updates
``u - BAND_HALF_WIDTH .. u + BAND_HALF_WIDTH``, widened by ``BAND_MARGIN`` of that range: a healthy run
wanders, and a band one update wide would flag every wiggle. A live value *leaves the band* when it is
below or above it at the same update, or non-finite where the baseline was finite. Where the baseline
has no updates near ``u`` (the live run is longer), there is no band and nothing is judged.

This is a comparison, not a judgement of health: the trainer's incidents stay the alarms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simic_tui.compare import RunTrace, load_runs
from simic_tui.store import TelemetryStore

__all__ = ["BAND_HALF_WIDTH", "BAND_MARGIN", "Baseline", "LiveBand", "load_baseline"]

BAND_HALF_WIDTH = 5
BAND_MARGIN = 0.1


@dataclass
class LiveBand:
    """One statistic over the last updates of the live run, against the baseline's band."""

    name: str
    steps: np.ndarray
    values: np.ndarray  # NaN: non-finite
    present: np.ndarray  # the live snapshot carried it
    lo: np.ndarray  # the band (NaN: the baseline has no updates near this one)
    hi: np.ndarray
    outside: np.ndarray  # bool: the live value left the band at this update

    @property
    def latest_outside(self) -> bool:
        return bool(self.outside.size and self.outside[-1])


class Baseline:
    """A loaded known-good run and its bands."""

    def __init__(
        self, trace: RunTrace, half_width: int = BAND_HALF_WIDTH, margin: float = BAND_MARGIN
    ) -> None:
        self.trace = trace
        self.half_width = half_width
        self.margin = margin
        self._by_column = {column: name for name, column in trace.columns.items()}

    @property
    def path(self) -> Path:
        return self.trace.path

    @property
    def names(self) -> list[str]:
        return list(self.trace.series)

    def name_of(self, column: str) -> str | None:
        """The statistic the baseline compares in the live store's ``column`` (None: not covered)."""
        return self._by_column.get(column)

    def band(self, name: str, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The band of series ``name`` at each of ``steps`` (NaN where there is none)."""
        lo = np.full(len(steps), np.nan)
        hi = np.full(len(steps), np.nan)
        values = self.trace.series.get(name)
        if values is None:
            return lo, hi
        base_steps = self.trace.steps
        ok = self.trace.present[name] & np.isfinite(values)
        bs, bv = base_steps[ok], values[ok]
        if bs.size == 0:
            return lo, hi
        order = np.argsort(bs, kind="stable")
        bs, bv = bs[order], bv[order]
        left = np.searchsorted(bs, steps - self.half_width, side="left")
        right = np.searchsorted(bs, steps + self.half_width, side="right")
        for i, (a, b) in enumerate(zip(left.tolist(), right.tolist())):
            if b - a < 2:  # one point is no band
                continue
            window = bv[a:b]
            w_lo, w_hi = float(window.min()), float(window.max())
            pad = self.margin * (w_hi - w_lo) + 1e-9 * max(abs(w_lo), abs(w_hi), 1e-300)
            lo[i], hi[i] = w_lo - pad, w_hi + pad
        return lo, hi

    def live(self, store: TelemetryStore, name: str, n: int) -> LiveBand | None:
        """The last ``n`` updates of the live store's series ``name`` against the band (None: the
        live run does not carry it)."""
        column = self.trace.columns.get(name)
        if column is None or not store.has(column):
            return None
        values = store.series(column, n).astype(np.float64)
        present = store.present(column, n).copy()
        if column == "episodes.return_mean" and store.has("episodes.count"):
            present &= store.series("episodes.count", n) > 0  # no episode finished: no return
        steps = store.steps(n)
        lo, hi = self.band(name, steps)
        has_band = np.isfinite(lo) & np.isfinite(hi)
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore"):
            out_of_range = finite & ((values < lo) | (values > hi))
        outside = present & has_band & (out_of_range | ~finite)
        return LiveBand(name, steps, np.where(finite, values, np.nan), present, lo, hi, outside)

    def outside_now(self, store: TelemetryStore) -> list[str]:
        """The statistics whose latest live value is outside the band at its update."""
        out = []
        for name in self.names:
            lb = self.live(store, name, 1)
            if lb is not None and lb.latest_outside:
                out.append(name)
        return out


def load_baseline(path: str | Path) -> Baseline:
    """ReplayError when the file cannot serve as a baseline (see :func:`simic_tui.compare.load_runs`)."""
    (trace,) = load_runs([path])
    return Baseline(trace)


def fmt_band(lo: float, hi: float) -> str:
    from simic_tui.fmt import fmt_num

    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no band"
    return f"{fmt_num(lo)}…{fmt_num(hi)}"
