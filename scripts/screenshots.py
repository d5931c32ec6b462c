"""Regenerate screenshots/ from the fixture recording: one SVG (and PNG when cairosvg is installed)
per main state of the dashboard.

    python scripts/screenshots.py            # 120x40, plus the compact 80x24 of the key states
    python scripts/screenshots.py --only kl_spike --size 200x60

The states are the ones the snapshot tests pin (tests/fixtures/states.py), drawn headless by the real
app with frozen clocks, so the same command always gives the same pictures. PNGs need cairosvg (and
libcairo); the SVG text is redrawn in DejaVu Sans Mono, whose block and box glyphs fill a cell.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT))

import states  # noqa: E402

OUT = ROOT / "screenshots"
MAIN = (
    "healthy",
    "entropy_collapse",
    "kl_spike",
    "nan",
    "debug",
    "debug_screen",
    "stale",
    "incompatible",
    "help",
)
MORE = (
    "thresholds",
    "anomaly_log",
    "incident_detail",
    "kl_spike_after",
    "disconnected",
    "connecting",
    "zoom",
    "waiting",
    "finished",
    "replay_finished",
    "lease",
    "telemetry_errors",
)
COMPACT = ("healthy", "entropy_collapse", "debug_screen")


async def shoot(name: str, size: tuple[int, int]) -> str:
    app = states.build(name)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press(*states.STATES[name].press)
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()
        return app.export_screenshot(title=f"simic-tui — {states.STATES[name].description}")


def to_png(svg: str, path: Path) -> bool:
    try:
        import cairosvg
    except ImportError:
        return False
    svg = svg.replace("Fira Code, monospace", "DejaVu Sans Mono").replace('"Fira Code"', '"DejaVu Sans Mono"')
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(path), output_width=1280)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(states.STATES), help="just these states")
    parser.add_argument("--size", default=None, help="WxH for --only (default 120x40)")
    parser.add_argument("--no-png", action="store_true", help="write SVGs only")
    args = parser.parse_args(argv)
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ.pop("NO_COLOR", None)
    # the palette follows the terminal's depth (simic_tui.palette): draw for a 256-colour terminal
    os.environ["TERM"] = "xterm-256color"
    os.environ.pop("COLORTERM", None)
    OUT.mkdir(exist_ok=True)
    if args.only:
        w, h = (int(x) for x in (args.size or "120x40").split("x"))
        jobs = [(name, (w, h), f"{name}-{w}x{h}") for name in args.only]
    else:
        jobs = [(name, (120, 40), name) for name in (*MAIN, *MORE)]
        jobs += [(name, (80, 24), f"{name}-80x24") for name in COMPACT]
        jobs += [("kl_spike", (200, 60), "kl_spike-200x60")]
    pngs = 0
    for name, size, stem in jobs:
        svg = asyncio.run(shoot(name, size))
        (OUT / f"{stem}.svg").write_text(svg)
        if not args.no_png and to_png(svg, OUT / f"{stem}.png"):
            pngs += 1
        print(
            f"screenshots/{stem}.svg{' + .png' if pngs and not args.no_png else ''}  {states.STATES[name].description}"
        )
    if not args.no_png and not pngs:
        print("PNGs skipped: pip install cairosvg (needs libcairo) to convert the SVGs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
