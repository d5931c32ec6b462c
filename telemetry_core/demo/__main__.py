"""``python -m telemetry_core.demo``: train the demo PPO under telemetry (see ``cli.py``)."""

import sys

from telemetry_core.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
