"""Private log files in the runtime directory: the demo trainer's output and crash reports.

Both are opened with ``O_NOFOLLOW`` (a symlink planted at the name by another user is refused, not
followed) and mode 0600 (trainer output and tracebacks can quote paths, run names and keys' file
names), in the user's 0700 runtime directory rather than the shared temporary directory.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from telemetry_core.protocol import connection_dir

__all__ = ["open_private", "write_crash_log"]


def open_private(path: Path, *, append: bool = False) -> int:
    """Open ``path`` for writing, mode 0600, never through a symlink; returns the descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode on open: make sure
    return fd


def write_crash_log(error: BaseException) -> Path | None:
    """The traceback of a crash, written to a private file (never to the screen); its path or None."""
    try:
        path = connection_dir() / f"crash-{os.getpid()}-{int(time.time())}.log"
        fd = open_private(path)
    except OSError:
        return None
    with os.fdopen(fd, "w") as out:
        out.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path
