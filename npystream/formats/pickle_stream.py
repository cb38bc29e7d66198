"""Streaming an object ``.npy`` pickle from a forward-only source (pipes, gzip, deflated zip members).

The policy (see :mod:`npystream.formats.pickle_walk`, "Streaming from a
non-seekable source"): no liveness pre-pass is possible, so the scanner
reads through a window of raw pickle bytes, elements are decoded by the same
:class:`~npystream.formats.pickle_walk._Engine` as on seekable files, and
memo values are kept across batches only within the ``RETAIN_*`` budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from npystream.errors import FormatError, UnsafePickleError, UnsupportedError
from npystream.formats.npy import NpyHeader
from npystream.formats.pickle_ops import ST_BATCH, ST_DONE, ScanError, ScanState
from npystream.formats.pickle_safety import SafetyPolicy
from npystream.formats.pickle_walk import (
    CHUNK_BYTES,
    STREAM_READ,
    _Batch,
    _Engine,
    _finish,
    _looks_partial,
    _Partial,
    _pending,
    _scan,
    _scan_exc,
    _take,
    _truncated,
)
from npystream.sources import ByteSource


class _StreamScan:
    """Scan a forward-only source through a window holding the current batch's raw bytes."""

    def __init__(self, src: ByteSource, header: NpyHeader, st: ScanState, path: str) -> None:
        self.src = src
        self.header = header
        self.st = st
        self.path = path
        self.window = bytearray()
        self.wbase = header.data_offset  # file offset of window[0]
        self.pos = 0  # scan position in the window
        self.eof = False

    def _fill(self) -> bool:
        chunk = self.src.read(STREAM_READ)
        if not chunk:
            self.eof = True
            self.st.data_end = self.wbase + len(self.window)
            return False
        self.window += chunk
        return True

    def discard_before(self, offset: int) -> None:
        """Drop window bytes before file ``offset`` (already decoded)."""
        k = offset - self.wbase
        if k > 0:
            del self.window[:k]
            self.wbase = offset
            self.pos -= k

    def batches(self) -> Iterator[_Batch]:
        st = self.st
        while True:
            try:
                self.pos = _scan(self.window, self.pos, len(self.window), self.wbase, st)
            except ScanError as err:
                raise _scan_exc(err, self.path) from None
            if st.status == ST_BATCH:
                batch = _Batch(_take(st.starts), _take(st.memo_at), st.batch_end)
                yield batch
            elif st.status == ST_DONE:
                end = self.wbase + self.pos
                extra = len(self.window) - self.pos
                while not extra and not self.eof:
                    if self._fill():
                        extra = len(self.window) - self.pos
                _finish(st, self.header, self.path, end, end + extra, bytes(self.window[self.pos : self.pos + 2]))
                return
            elif not self._fill():
                raise _truncated(self.path, self.wbase + self.pos, st)


def _iter_stream(src: ByteSource, header: NpyHeader, policy: SafetyPolicy, stop: int) -> Iterator[list[Any]]:
    from npystream.formats.pickle_safety import make_global_check

    path = src.name
    st = ScanState(header.count, make_global_check(policy))
    scan = _StreamScan(src, header, st, path)
    engine: _Engine | None = None
    pinned: set[int] = set()
    produced = 0

    def unsupported(m: int, index: int | None, offset: int) -> None:
        raise UnsupportedError(
            f"element {index} reads back an object (memo entry {m}) from an earlier batch that streaming has "
            "released to bound memory; read the file from a seekable source (the liveness pass makes every "
            "back-reference exact)",
            path=path,
            offset=offset,
            index=index,
        )

    def start_engine() -> _Engine:
        eng = _Engine(path, header, policy, live=None, view=None, zero_copy=False, free_on_read=False, proto=st.proto)
        eng.resolver = unsupported
        eng.decode_prefix(scan.window, scan.wbase, header.data_offset, st.body_start)
        pinned.update(eng.rw.slot_of)
        return eng

    def run_batch(starts: np.ndarray, memo_at: np.ndarray, end: int, first: int) -> Iterator[list[Any]]:
        eng = engine
        assert eng is not None
        s_arr = np.asarray(starts, dtype=np.int64)
        e_arr = np.empty_like(s_arr)
        e_arr[:-1] = s_arr[1:]
        e_arr[-1] = end
        fresh: list[int] = []
        i = 0
        k = len(starts)
        while i < k:
            j = int(np.searchsorted(s_arr, s_arr[i] + CHUNK_BYTES, side="left"))
            j = min(max(j, i + 1), k)
            try:
                items = eng.decode_run(scan.window, scan.wbase, s_arr[i:j], e_arr[i:j], memo_at[i:j], first + i)
            except _Partial as part:
                yield part.items
                raise part.error from None
            fresh.extend(eng.rw.fresh)
            yield items
            del items
            i = j
        eng.retain(fresh, pinned)

    batches = scan.batches()
    while True:
        try:
            batch = next(batches, None)
        except (FormatError, UnsafePickleError) as exc:
            p_starts, p_memo, p_end = _pending(st, exc, header.count)
            if len(p_starts) and st.body_start >= 0 and produced < stop:
                if engine is None:
                    engine = start_engine()
                p_ends = np.append(p_starts[1:], p_end)
                for j in range(len(p_starts)):  # tentative: one by one, stop at the first doubtful one
                    try:
                        item = engine.decode_run(
                            scan.window, scan.wbase, p_starts[j : j + 1], p_ends[j : j + 1], p_memo[j : j + 1], produced + j
                        )[0]
                    except _Partial:
                        break
                    if _looks_partial(item):
                        break
                    yield [item]
            raise
        if batch is None:
            break
        if engine is None:
            engine = start_engine()
        if produced < stop:
            yield from run_batch(batch.starts, batch.memo_at, batch.end, produced)
        produced += len(batch.starts)
        scan.discard_before(batch.end)
    if engine is None:
        start_engine()  # validates the header part of an empty array
