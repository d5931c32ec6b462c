"""simic-tui command line: attach | replay | export | demo."""

from __future__ import annotations

import argparse
import sys

from simic_tui import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simic-tui", description="Live PPO training-health dashboard")
    parser.add_argument("--version", action="version", version=f"simic-tui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("attach", help="attach to a running trainer (HOST:PORT)")
    sub.add_parser("replay", help="replay a recording")
    sub.add_parser("export", help="export a recording")
    sub.add_parser("demo", help="train a recurrent PPO under telemetry and watch it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"simic-tui {args.command}: not built yet in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
