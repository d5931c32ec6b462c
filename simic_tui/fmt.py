"""Number and time formatting: honest about missing and non-finite values, compact for a terminal.

``None`` (a statistic that is undefined, e.g. explained variance of constant returns) prints as "—";
NaN prints as "NaN" and infinities as "inf"/"-inf": never a crash, never a silent zero.
"""

from __future__ import annotations

import math
import time

import numpy as np

__all__ = [
    "EMPTY",
    "MISSING",
    "SPARK_BLOCKS",
    "chart",
    "chart_row",
    "clip_words",
    "fmt_clock",
    "fmt_count",
    "fmt_limit",
    "fmt_num",
    "fmt_pct",
    "is_finite",
    "sparkline",
]

MISSING = "—"
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
EMPTY = "·"  # an update with nothing to measure (no episode finished), distinct from NaN "×"


def is_finite(value: float | int | None) -> bool:
    return value is not None and math.isfinite(value)


def _nonfinite(value: float | None) -> str | None:
    if value is None:
        return MISSING
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def fmt_num(value: float | int | None, digits: int = 3) -> str:
    """Up to ``digits`` significant digits; scientific for very small or very large magnitudes."""
    special = _nonfinite(None if value is None else float(value))
    if special is not None:
        return special
    assert value is not None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return fmt_count(int(value))
    v = float(value)
    if v == 0.0:
        return "0"
    mag = abs(v)
    if mag >= 10 ** (digits + 2) or mag < 1e-3:
        return f"{v:.{max(digits - 2, 0)}e}".replace("e-0", "e-").replace("e+0", "e")
    decimals = max(digits - 1 - math.floor(math.log10(mag)), 0)
    return f"{v:.{decimals}f}"


def fmt_pct(value: float | None, decimals: int = 0) -> str:
    """A share in [0, 1] as a percentage."""
    special = _nonfinite(value)
    if special is not None:
        return special
    assert value is not None
    return f"{100.0 * value:.{decimals}f}%"


def fmt_count(value: int | None) -> str:
    if value is None:
        return MISSING
    if abs(value) >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 10_000:
        return f"{value / 1e3:.1f}k"
    return str(value)


def fmt_clock(wall_time: float | None) -> str:
    """Local wall-clock time of day of a trainer timestamp."""
    if wall_time is None or not math.isfinite(wall_time):
        return MISSING
    return time.strftime("%H:%M:%S", time.localtime(wall_time))


def sparkline(
    values: np.ndarray,
    width: int,
    present: np.ndarray | None = None,
    empty: np.ndarray | None = None,
    scale: tuple[float, float] | None = None,
) -> str:
    """The last ``width`` values as block characters, scaled to their own finite min/max (or to
    ``scale``, widened to take them in: a baseline's band drawn behind shares the axis).

    A NaN or infinite value prints as "×", so a NaN gradient is visible in the history rather than
    silently skipped (as W&B does); an update that did not carry the metric at all (``present``
    False, e.g. a MINIMAL-level snapshot) prints as a blank; one with nothing to measure
    (``empty`` True: no episode finished, so no mean return) prints as "·", never as a NaN.
    """
    if width <= 0:
        return ""
    vals = np.asarray(values, dtype=np.float64)[-width:]
    if vals.size == 0:
        return ""
    have = np.ones(vals.size, dtype=bool) if present is None else np.asarray(present, dtype=bool)[-width:]
    none = _mask(empty, vals.size)
    finite = np.isfinite(vals) & have & ~none
    lo = float(vals[finite].min()) if finite.any() else math.inf
    hi = float(vals[finite].max()) if finite.any() else -math.inf
    if scale is not None and math.isfinite(scale[0]) and math.isfinite(scale[1]):
        lo, hi = min(lo, scale[0]), max(hi, scale[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo = hi = 0.0
    span = hi - lo
    out = []
    top = len(SPARK_BLOCKS) - 1
    for v, ok, here, nothing in zip(vals.tolist(), finite.tolist(), have.tolist(), none.tolist()):
        if not here:
            out.append(" ")
        elif nothing:
            out.append(EMPTY)
        elif not ok:
            out.append("×")
        elif span <= 0:
            out.append(SPARK_BLOCKS[top // 2])
        else:
            out.append(SPARK_BLOCKS[round((v - lo) / span * top)])
    return "".join(out)


def _mask(empty: np.ndarray | None, size: int) -> np.ndarray:
    """``empty`` aligned to the last ``size`` values (all False when not given)."""
    if empty is None or size == 0:
        return np.zeros(size, dtype=bool)
    tail = np.asarray(empty, dtype=bool)[-size:]
    return np.concatenate([np.zeros(size - tail.size, dtype=bool), tail])


def fmt_limit(value: float | None) -> str:
    """A threshold as the trainer wrote it (0.05, not 0.0500)."""
    special = _nonfinite(value)
    if special is not None:
        return special
    return f"{value:g}"


def chart(
    values: np.ndarray,
    width: int,
    height: int,
    present: np.ndarray | None = None,
    marks: dict[float, str] | None = None,
    empty: np.ndarray | None = None,
    extra: np.ndarray | None = None,
) -> tuple[list[str], float, float]:
    """A ``height``-row bar chart of the last ``width`` values, top row first.

    Returns the rows and the (low, high) range they span. ``marks`` draws a dotted line at each
    given level (a threshold) where no bar covers it, so the eye sees how close the series runs.
    NaN/inf columns show "×" on the bottom row, updates with nothing to measure (``empty``) "·";
    unmeasured ones stay blank. ``extra``: levels the range must take in (a baseline's band).
    """
    vals = np.asarray(values, dtype=np.float64)[-width:] if width > 0 else np.zeros(0)
    have = np.ones(vals.size, dtype=bool) if present is None else np.asarray(present, dtype=bool)[-width:]
    none = _mask(empty, vals.size)
    finite = np.isfinite(vals) & have & ~none
    levels = [m for m in (marks or {}) if math.isfinite(m)]
    more = np.zeros(0) if extra is None else np.asarray(extra, dtype=np.float64).ravel()
    pool = np.concatenate([vals[finite], np.asarray(levels, dtype=np.float64), more[np.isfinite(more)]])
    lo = float(min(pool.min(), 0.0)) if pool.size else 0.0
    hi = float(pool.max()) if pool.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    steps = height * 8
    grid = [[" "] * vals.size for _ in range(height)]
    for x, (v, ok, here, nothing) in enumerate(
        zip(vals.tolist(), finite.tolist(), have.tolist(), none.tolist())
    ):
        if not here:
            continue
        if nothing:
            grid[height - 1][x] = EMPTY
            continue
        if not ok:
            grid[height - 1][x] = "×"
            continue
        level = round((v - lo) / (hi - lo) * steps)
        for r in range(height):
            fill = level - (height - 1 - r) * 8
            if fill >= 8:
                grid[r][x] = "█"
            elif fill > 0:
                grid[r][x] = SPARK_BLOCKS[fill - 1]
    for level in levels:
        row = height - 1 - min(int((level - lo) / (hi - lo) * height), height - 1)
        for x in range(vals.size):
            if grid[row][x] == " ":
                grid[row][x] = "┈"
    return ["".join(r) for r in grid], lo, hi


def chart_row(level: float, lo: float, hi: float, height: int) -> int:
    """The row (top first) of a :func:`chart` spanning ``lo..hi`` in ``height`` rows that holds ``level``."""
    if hi <= lo:
        return height - 1
    return height - 1 - max(0, min(int((level - lo) / (hi - lo) * height), height - 1))


def clip_words(text: str, width: int) -> str:
    """Prose in at most ``width`` cells, cut after a whole word and marked `` …``.

    For messages a detail view shows whole: a number or a name is never left half-printed (a cut
    inside ``0.902`` would read as a different number)."""
    if len(text) <= width:
        return text
    if width < 2:
        return "…"[:width]
    head = text[: width - 1]
    cut = head.rsplit(" ", 1)[0].rstrip(",;:") if " " in head else ""
    return f"{cut} …" if cut else "…"
