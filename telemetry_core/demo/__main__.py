"""``python -m telemetry_core.demo``: train the demo PPO under telemetry (see ``cli.py``)."""

import signal
import sys

if __name__ == "__main__":
    # Ctrl-C at any moment ends in status 0. Before main() installs its own handlers (importing the
    # CLI) a signal is noted; after it returns they are ignored, so one that comes while the
    # interpreter shuts down (when CPython puts SIGINT back to its default) cannot turn a finished,
    # summarised run into a death by signal.
    early: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    from telemetry_core.demo.cli import main

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # what main() puts back when it returns
    if early:
        print("interrupted before training started", flush=True)
        sys.exit(0)
    sys.exit(main())
