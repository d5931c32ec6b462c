"""The last snapshot frames sent, kept for late joiners ("Clone" pattern), bounded in count and bytes."""

from __future__ import annotations

import collections
from collections.abc import Iterator

__all__ = ["HistoryRing"]


class HistoryRing:
    """``(seq, frame)`` pairs, oldest first; the oldest go once ``max_frames`` or ``max_bytes`` is passed.

    Written and read by the publisher thread only.
    """

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return len(self._frames)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self._frames)

    @property
    def size(self) -> int:
        """Bytes held (frames only)."""
        return self._size

    def remember(self, seq: int, frame: bytes) -> None:
        if self.max_frames == 0:
            return
        frames = self._frames
        frames.append((seq, frame))
        self._size += len(frame)
        while frames and (len(frames) > self.max_frames or self._size > self.max_bytes):
            self._size -= len(frames.popleft()[1])

    def chunks(self, since: int, chunk_bytes: int, frame_limit: int) -> list[list[tuple[int, bytes]]]:
        """Frames newer than ``since``, cut into chunks of about ``chunk_bytes`` (always at least one).

        A frame over ``frame_limit`` bytes would not fit a reply and is left out.
        """
        chunks: list[list[tuple[int, bytes]]] = [[]]
        size = 0
        for seq, frame in self._frames:
            if seq <= since or len(frame) > frame_limit:
                continue
            if chunks[-1] and size + len(frame) > chunk_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append((seq, frame))
            size += len(frame) + 8
        return chunks
