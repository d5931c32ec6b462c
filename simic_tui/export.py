"""``simic-tui export``: a recording as JSON lines, one object per snapshot.

Each line is the snapshot's fields plus ``session`` and ``seq`` from its envelope, encoded by
msgspec. JSON has no NaN or infinity, so non-finite numbers become ``null`` (as do undefined
statistics, which are None already): a reader cannot tell NaN from "not defined" in the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import msgspec

from simic_tui.replay import LoadedRecording, load_recording

__all__ = ["export_jsonl"]

_ENCODER = msgspec.json.Encoder()


def export_jsonl(path: str | Path, out: IO[bytes]) -> LoadedRecording:
    """Write every readable snapshot of ``path`` to ``out``; return what was read (and skipped)."""
    loaded = load_recording(path)
    for env, snap in loaded.frames:
        record = msgspec.to_builtins(snap)
        record = {"session": env.session, "seq": env.seq, **record}
        out.write(_ENCODER.encode(record))
        out.write(b"\n")
    return loaded
