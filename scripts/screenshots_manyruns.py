"""Regenerate the many-runs screenshots: compare, the sweep table and the baseline overlay.

    python scripts/screenshots_manyruns.py

Drawn headless by the real apps from the committed recordings (tests/fixtures/cmp_*.simrec and
ppo_run.simrec) with frozen clocks, the same states the snapshot tests pin (tests/test_compare.py,
tests/fixtures/sweep_states.py, tests/test_baseline.py), so the same command gives the same pictures.
Writes SVGs, and PNGs too when cairosvg is installed (see scripts/screenshots.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path[:0] = [str(ROOT), str(FIXTURES), str(Path(__file__).parent)]

import sweep_states  # noqa: E402

from screenshots import to_png  # noqa: E402
from simic_tui.baseline import load_baseline  # noqa: E402
from simic_tui.compare import build_comparison, load_runs  # noqa: E402
from simic_tui.replay import load_recording  # noqa: E402
from simic_tui.screens.baseline import BaselineApp  # noqa: E402
from simic_tui.screens.compare import CompareApp  # noqa: E402
from simic_tui.store import TelemetryStore  # noqa: E402

OUT = ROOT / "screenshots"
FOUR = [FIXTURES / f"cmp_{n}.simrec" for n in ("healthy", "klspike", "entropy", "nangrad")]


def baseline_app() -> BaselineApp:
    """The kl-spike run, 20 updates in, over the healthy run's band."""
    store = TelemetryStore(clock=lambda: sweep_states.FROZEN)
    for env, snap in load_recording(FIXTURES / "cmp_klspike.simrec").frames[:20]:
        store.ingest(env, snap, quiet=True)
    store.drain_events()
    return BaselineApp(store, baseline=load_baseline(FOUR[0]), clock=lambda: sweep_states.FROZEN)


async def shoot(app, size: tuple[int, int], press: tuple[str, ...], title: str) -> str:  # type: ignore[no-untyped-def]
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press(*press)
        await pilot.pause()
        return app.export_screenshot(title=title)


def main() -> int:
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ.pop("NO_COLOR", None)
    OUT.mkdir(exist_ok=True)
    jobs = [
        (
            "compare",
            lambda: CompareApp(build_comparison(load_runs(FOUR))),
            (160, 48),
            (),
            "simic-tui compare — four demo runs",
        ),
        ("sweep", sweep_states.build, (120, 30), (), "simic-tui attach --scan — a sweep of five trainers"),
        (
            "baseline",
            baseline_app,
            (120, 40),
            ("b",),
            "simic-tui attach --baseline — the live run over a good run's band",
        ),
    ]
    for stem, make, size, press, title in jobs:
        svg = asyncio.run(shoot(make(), size, press, title))
        (OUT / f"{stem}.svg").write_text(svg)
        png = to_png(svg, OUT / f"{stem}.png")
        print(f"screenshots/{stem}.svg{' + .png' if png else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
