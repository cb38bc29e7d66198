"""A forward-only, short-read file object for the streaming tests (a pipe without a process)."""

from __future__ import annotations

import io


class ShortReads(io.RawIOBase):
    """Reads ``data`` forward only, at most ``step`` bytes per read, like a pipe."""

    def __init__(self, data: bytes, step: int = 7777) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n
