"""Streaming an object ``.npy`` pickle from a forward-only source (pipes, gzip, deflated zip members).

The policy (see also :mod:`npystream.formats.pickle_walk`, "Streaming from a
non-seekable source"): no liveness pre-pass is possible, so the scanner reads
through a *window* of raw pickle bytes, elements are decoded by the same
:class:`~npystream.formats.pickle_walk._Engine` as on seekable files, and memo
values are kept across batches only within the ``RETAIN_*`` budget.

Exact elements, one batch held (on disk when big)
-------------------------------------------------
numpy writes 1000 elements per ``MARK ... APPENDS`` batch.  Element
boundaries are only *certain* at the batch's closing APPENDS: a later TUPLE2/3,
BUILD, SETITEM, APPEND or REDUCE may still fold the stack slots seen so far
into one element, and np.save writes such elements (``(a, (b, (c, <big
array>)))`` keeps a, b and c pending until after the array's bytes; the
bytes before the folds are the same as those of the elements a, b, c, ...).
No lookahead of bounded length tells them apart, so this reader never
guesses:

* **Batches.**  The open batch's raw bytes are kept; when its APPENDS
  arrives the batch's elements are decoded (in runs of about
  ``CHUNK_BYTES``), yielded, and its bytes dropped.  A file of big elements
  read from a seekable source never holds a batch (its offset index makes
  the bounds known before decoding).
* **Spill.**  While the open batch holds at most ``SPILL_ABOVE`` bytes
  (32 MiB) they stay in the window.  Past that, the bytes the scanner has
  passed move, at every read, to an unlinked temporary file
  (:func:`tempfile.TemporaryFile`, in :func:`tempfile.gettempdir`: ``TMPDIR``
  chooses it), so the window stays small; at the APPENDS the rest follows
  and the batch is decoded exactly as in memory, from a read-only ``mmap``
  of the file (file-backed pages the kernel may drop, released behind the
  decoder with ``MADV_DONTNEED``), then the file is truncated and reused
  for the next big batch.  Elements never view the file: array payloads
  come out as copies (what the in-memory path hands out for all but a
  window-filling payload), so the types and flags are those of the
  in-memory path.  Anonymous memory: about ``SPILL_ABOVE`` plus one element,
  whatever the batch (a 200 MB batch of 200 KB arrays: about 80 MiB,
  against about 275 MiB in memory); disk: one batch.  A temporary file that
  cannot be made, written or mapped (disk full, missing directory) raises
  :class:`~npystream.errors.NpyStreamError` naming the directory and
  ``TMPDIR``.  Do not point ``TMPDIR`` at a tmpfs (``/dev/shm``): its pages
  are memory.  ``SPILL_ABOVE`` is a module constant; raise it to trade
  memory for disk writes.
* **Memo.**  A batch's memo writes go, once decoded, through
  ``_Engine.retain``: globals, dtypes and small values are kept (within the
  ``RETAIN_*`` budget), the rest released.  So back-references within a
  batch are exact; a large object read back from a later batch raises
  :class:`~npystream.errors.UnsupportedError` naming the element and the fix
  (read from a seekable source).
* **Window.**  One buffer (``numpy.empty``: pages cost memory only once
  written) that is compacted in place when its dead prefix is large, grown
  geometrically when live data fills it (up to about ``SPILL_ABOVE``: more
  is spilled), kept while batches spill (a fresh buffer per batch would
  fault in its pages again, and each freed one raises glibc's mmap
  threshold, leaving freed heap untrimmed), and shrunk after a large
  element.
  An opcode longer than the window (a big array's raw bytes) grows it once to
  the exact size its length field announces *after those bytes have
  arrived*: the window grows by what was read, never by a length field
  alone, so a forged length costs nothing before the truncation error.
* **Payloads.**  In runs of large elements (``LARGE_ELEMENT_BYTES`` on
  average) an array's raw-data BINBYTES of ``ZC_MIN`` bytes or more is
  replaced by a persistent id (the rewriter's zero-copy substitution; its
  memo write is dropped: numpy never reads an array's bytes back), resolved by
  :class:`_WindowPayloads`: a payload of ``HAND_OFF`` bytes or more that fills
  most of the window becomes the array's memory itself (the window then moves
  to a fresh buffer), smaller ones are copied once.  So one 300 MB element
  costs about 300 MB, not the 4 copies of window, program, ``bytes`` and array.
  Past ``SPILL_ABOVE`` the big opcode's window is released once its bytes
  are on disk, and the array is one copy from the map: still one element's
  memory at a time.

Reads stay at ``STREAM_READ`` granularity.  Peak anonymous memory is about
the open batch's raw bytes up to ``SPILL_ABOVE``, the largest opcode (one
array's raw bytes), one decoded run (``CHUNK_BYTES``) and the retained memo
(``RETAIN_BYTES``).
"""

from __future__ import annotations

import mmap
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from npystream.errors import FormatError, NpyStreamError, UnsafePickleError, UnsupportedError
from npystream.formats.npy import NpyHeader
from npystream.formats.pickle_ops import (
    _BYTES_OPS,
    A_LINE2,
    K_PUT,
    OP_ARG_T,
    OP_FRAME,
    OP_KIND_T,
    ST_BATCH,
    ST_DONE,
    ScanError,
    ScanState,
    _line_end,
    _zero_copy_target,
)
from npystream.formats.pickle_safety import TOKEN_TYPES, ArrayProto, SafetyPolicy
from npystream.formats.pickle_walk import (
    _RETAIN_TYPES,
    CHUNK_BYTES,
    LARGE_ELEMENT_BYTES,
    RETAIN_BYTES,
    RETAIN_MAX,
    RETAIN_ONE,
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

# limits of the streaming reader (each with its reason)
ZC_MIN = 64 << 10  # array payloads at least this big go through a persistent id (one copy, not three)
HAND_OFF = 16 << 20  # a payload this big that fills most of the window becomes the array's memory
WINDOW_MIN = 4 * STREAM_READ  # smallest window buffer
_ROOM_AFTER_BIG = 2 * STREAM_READ  # room left after a big opcode for the opcodes that follow it
_ALIGN = 64  # a big payload starts at this alignment in its window buffer
# an open batch holding more raw bytes than this moves to a temporary file (memory bound of a stream;
# a batch below it is decoded from memory without a write)
SPILL_ABOVE = 32 << 20
_NO_LIVE: dict[int, int] = {}


class _Window:
    """Raw pickle bytes ``[base + lo, base + hi)`` of a forward-only source, in one buffer."""

    def __init__(self, src: ByteSource, offset: int) -> None:
        self.src = src
        self.mem = np.empty(WINDOW_MIN, dtype=np.uint8)
        self.buf = memoryview(self.mem)
        self.base = offset  # file offset of buf[0]
        self.lo = 0  # bytes before lo are no longer needed
        self.hi = 0  # bytes at and after hi are not read yet
        self.eof = False
        self.donated = False  # part of mem is an array's memory: never write into mem again
        self.peak = 0  # bytes the recent batches needed (decaying): the buffer is not shrunk below them
        self.spilled: tuple[Any, int] | None = None  # (map, file offset of its byte 0) while a spilled batch decodes

    def discard_before(self, offset: int) -> None:
        """Bytes before file ``offset`` are no longer needed."""
        k = offset - self.base
        if k > self.lo:
            self.lo = min(k, self.hi)

    def fill(self, pos: int) -> int:
        """Read up to ``STREAM_READ`` more bytes (0 at the end); ``pos`` (a window index) is the scan position.

        Returns the scan position, which moves when the buffer is compacted or replaced.
        """
        cap = len(self.mem)
        need, payload = _pending_opcode(self.buf, pos, self.hi)
        room = STREAM_READ
        if need:
            # a long opcode: room for all of it and then some, but grown by what has arrived (at most
            # 4x the bytes held): a length field alone never reserves memory (a forged 2**40 costs nothing)
            room = min(max(pos + need - self.hi, 0) + _ROOM_AFTER_BIG, 3 * max(self.hi - self.lo, WINDOW_MIN))
        if self.hi + STREAM_READ > cap or (need and payload % _ALIGN) or self.donated:
            pos = self._rearrange(pos, room, payload)
        n = self.src.readinto(self.buf[self.hi : min(self.hi + STREAM_READ, len(self.mem))])
        if not n:
            self.eof = True
        self.hi += n
        return pos

    def _rearrange(self, pos: int, room: int, payload: int) -> int:
        lo, hi = self.lo, self.hi
        keep = hi - lo
        target = keep + room
        shift = -(payload - lo) % _ALIGN if payload >= 0 else 0  # align the big payload
        cap = len(self.mem)
        # a stream of big batches reuses one buffer (its pages are touched once); after a big batch
        # followed by small ones, the peak decays and the buffer shrinks
        self.peak = max(target + shift, self.peak - self.peak // 4)
        if self.donated or cap > 4 * max(self.peak, WINDOW_MIN):
            new_cap = target + shift if payload >= 0 else 2 * target  # a fresh (or smaller) buffer
        elif target + shift <= cap and (lo >= cap // 4 or payload >= 0):
            new_cap = 0  # compact in place: the dead prefix is large
        else:
            # live data grows: geometric, but not past what the reader holds before it spills (SPILL_ABOVE)
            new_cap = target + shift if payload >= 0 else max(target, min(2 * keep, SPILL_ABOVE + 2 * STREAM_READ))
        if new_cap:
            mem = np.empty(max(new_cap, WINDOW_MIN), dtype=np.uint8)
            buf = memoryview(mem)
            if keep:
                buf[shift : shift + keep] = self.buf[lo:hi]
            self.mem, self.buf = mem, buf  # the old buffer goes when no array views it
            self.donated = False
        elif keep:  # memoryview assignment is a memmove
            self.buf[shift : shift + keep] = self.buf[lo:hi]
        self.base += lo - shift
        self.lo = shift
        self.hi = shift + keep
        return pos - lo + shift

    def shrink(self, pos: int) -> int:
        """Move the live bytes to a fresh small buffer (the big one goes); returns the moved scan position."""
        self.peak = 0
        return self._rearrange(pos, STREAM_READ, -1)

    def after_stop(self, pos: int) -> tuple[int, int, bytes]:
        """After the STOP ending at window index ``pos``: read until two bytes follow it or the data ends.

        Returns the (maybe moved) position, how many bytes follow STOP (all of
        them at the end of the data, else at least two) and the first two, so
        every source applies one rule to what follows STOP (see ``_finish``).
        """
        while self.hi - pos < 2 and not self.eof:
            pos = self.fill(pos)
        return pos, self.hi - pos, bytes(self.buf[pos : min(self.hi, pos + 2)])

    def payload(self, offset: int, n: int) -> memoryview:
        """Bytes ``[offset, offset + n)`` (file offsets) as a writeable buffer no one else uses."""
        if self.spilled is not None:  # a copy: the temporary file is reused for the next batch
            view, base = self.spilled
            a = offset - base
            return np.array(view[a : a + n]).data
        a = offset - self.base
        if n >= HAND_OFF and 2 * n >= len(self.mem):
            self.donated = True  # this buffer is now (mostly) the array: the next fill moves on
            return self.buf[a : a + n]
        return np.array(self.buf[a : a + n]).data


class _WindowPayloads:
    """The persistent-id resolver of the streaming engine: ``[offset:offset + n]`` -> a payload buffer."""

    __slots__ = ("window",)

    def __init__(self, window: _Window) -> None:
        self.window = window

    def __getitem__(self, key: slice) -> memoryview:
        return self.window.payload(key.start, key.stop - key.start)


class _Spill:
    """The open batch's raw bytes ``[base, base + size)`` (file offsets) in an unlinked temporary file.

    Written in order as the scanner passes them, read back through a
    read-only map (file-backed pages the kernel can drop, not anonymous
    memory), then truncated and reused for the next big batch.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: Any = None
        self.base = -1  # file offset of the temporary file's byte 0; -1: nothing spilled
        self.size = 0
        self.map: mmap.mmap | None = None
        self.view: memoryview | None = None

    @property
    def active(self) -> bool:
        return self.base >= 0

    def _fail(self, what: str, exc: OSError) -> NpyStreamError:
        where = tempfile.gettempdir()
        return NpyStreamError(
            f"could not {what} the temporary file that holds a streamed batch in {where!r} ({exc.strerror or exc}); "
            f"a stream keeps a batch of more than {SPILL_ABOVE >> 20} MiB of raw bytes there instead of in memory: "
            "set TMPDIR to a directory on a disk with room for one batch (or read the file from a seekable source, "
            "which needs no batch)",
            path=self.path,
            offset=self.base + self.size if self.active else None,
        )

    def write(self, data: memoryview, offset: int) -> None:
        """Append ``data``, the bytes at file ``offset`` (the first write fixes ``base``)."""
        if not self.active:
            self.base = offset
            self.size = 0
        if offset != self.base + self.size:  # pragma: no cover - reader invariant
            raise RuntimeError(f"spill out of order: {offset} after {self.base + self.size}")
        if not len(data):
            return
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile()
            self.file.write(data)
        except OSError as exc:
            raise self._fail("write", exc) from None
        self.size += len(data)

    def open_view(self) -> tuple[memoryview, int]:
        """(a read-only view of the spilled bytes, the file offset of its byte 0)."""
        if not self.size:
            return memoryview(b""), self.base
        try:
            self.file.flush()
            self.map = mmap.mmap(self.file.fileno(), self.size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise self._fail("map", exc if isinstance(exc, OSError) else OSError(str(exc))) from None
        self.view = memoryview(self.map)
        return self.view, self.base

    def release(self, start: int, end: int) -> None:
        """Decoded bytes ``[start, end)`` (file offsets) are not read again: drop their pages from the map."""
        if self.map is None or not hasattr(self.map, "madvise"):
            return
        a = (start - self.base) // mmap.PAGESIZE * mmap.PAGESIZE
        b = min(end - self.base, self.size)
        if b > a:
            try:
                self.map.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, AttributeError, ValueError):  # pragma: no cover - advice only
                pass

    def reset(self) -> None:
        """Forget the batch: unmap, then truncate the file for the next one (a new file if the map is still in use)."""
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:  # pragma: no cover - an export of the view is alive: the map stays open
                pass
            self.view = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # something still views the map: leave it that file, start a new one
                self.file = None
            self.map = None
        if self.file is not None and self.size:
            try:
                self.file.seek(0)
                self.file.truncate(0)
            except OSError as exc:
                raise self._fail("truncate", exc) from None
        self.base = -1
        self.size = 0

    def close(self) -> None:
        try:
            self.reset()
        finally:
            if self.file is not None:
                self.file.close()
                self.file = None


def _pending_opcode(buf: Any, pos: int, hi: int) -> tuple[int, int]:
    """(total size, payload index) of a length-prefixed opcode at ``buf[pos]`` that is cut off; (0, -1) else."""
    if pos >= hi:
        return 0, -1
    a = OP_ARG_T[buf[pos]]
    if a not in (-4, -5, -8):
        return 0, -1
    la = 8 if a == -8 else 4
    if pos + 1 + la > hi:
        return 0, -1
    length = int.from_bytes(buf[pos + 1 : pos + 1 + la], "little", signed=a == -5)
    total = 1 + la + max(length, 0)
    if total <= STREAM_READ or pos + total <= hi:
        return 0, -1
    return total, pos + 1 + la


def _payload_memos(buf: Any, pos: int, end: int, memo: int) -> tuple[list[int], int]:
    """Memo indices written right after array payloads of ``ZC_MIN`` bytes or more in ``buf[pos:end]``.

    ``buf[pos:end]`` holds whole opcodes the scanner validated and ``memo`` is
    the memo counter at ``pos`` (memo writes are sequential).  Also returns
    the counter at ``end``.
    """
    skip: list[int] = []
    arg_t = OP_ARG_T
    kind_t = OP_KIND_T
    while pos < end:
        op = buf[pos]
        a = arg_t[op]
        if a == 0:
            npos = pos + 1
        elif 0 < a < 100:
            npos = pos + 1 + a
        elif a < 0:
            la = 1 if a == -1 else (8 if a == -8 else 4)
            length = buf[pos + 1] if la == 1 else int.from_bytes(buf[pos + 1 : pos + 1 + la], "little", signed=a == -5)
            npos = pos + 1 + la + length
            if op in _BYTES_OPS and length >= ZC_MIN and _zero_copy_target(buf, npos, end, memo, _NO_LIVE):
                q = npos
                while q < end and buf[q] == OP_FRAME:
                    q += 9
                if q < end and kind_t[buf[q]] == K_PUT:
                    skip.append(memo)
        else:
            npos = _line_end(buf, pos + 1, end, 2 if a == A_LINE2 else 1)
        if kind_t[op] == K_PUT:
            memo += 1
        pos = npos
    return skip, memo


def _deep_size(v: Any) -> int:
    """Bytes a memo value keeps alive, counting what containers hold (``> RETAIN_ONE`` once it is too big).

    A shallow size would miss what containers hold: a pinned ndarray state
    tuple would keep its raw bytes alive uncounted.
    """
    total = 0
    stack = [v]
    seen: set[int] = set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if len(seen) > 4096:
            return RETAIN_ONE + 1
        t = type(x)
        if t is memoryview:
            total += x.nbytes + 184
        elif isinstance(x, np.ndarray):
            total += int(x.nbytes) + 112
            if x.base is not None:
                stack.append(x.base)
        elif t is ArrayProto or t is tuple or t is list or t is set or t is frozenset:
            total += sys.getsizeof(x)
            stack.extend(x)
        elif t is dict:
            total += sys.getsizeof(x)
            stack.extend(x.keys())
            stack.extend(x.values())
        else:
            try:
                total += sys.getsizeof(x)
            except TypeError:
                return RETAIN_ONE + 1
        if total > RETAIN_ONE:
            return total
    return total


def _retain(eng: _Engine, cand: list[int], pinned: set[int]) -> None:
    """``_Engine.retain`` with sizes that count what containers hold (see :func:`_deep_size`).

    Kept: globals (classes, functions), dtypes, and values of at most
    RETAIN_ONE bytes while the total stays under RETAIN_BYTES and RETAIN_MAX
    entries; every other memo slot in ``cand`` is released.
    """
    rw = eng.rw
    slot_of = rw.slot_of
    if len(pinned) >= RETAIN_MAX:
        # nothing more is kept, whatever the values: release the slots without reading them
        # (set operations and map run in C: millions of memoized strings pass through here)
        present = slot_of.keys() & cand
        present -= pinned
        rw.free.extend(map(slot_of.pop, present))
        return
    cand = [m for m in cand if m in slot_of and m not in pinned]
    if not cand:
        return
    values = eng.memo_values(cand)
    for m, v in zip(cand, values):
        keep = False
        if len(pinned) < RETAIN_MAX:
            if isinstance(v, _RETAIN_TYPES) or isinstance(v, TOKEN_TYPES):
                keep = True
            elif eng.retained_bytes < RETAIN_BYTES:
                size = _deep_size(v)
                if size <= RETAIN_ONE and eng.retained_bytes + size <= RETAIN_BYTES:
                    eng.retained_bytes += size
                    keep = True
        if keep:
            pinned.add(m)
        else:
            rw.free.append(slot_of.pop(m))
    del values


class _StreamScan:
    """Scan a forward-only source for its batches only (the index of a seekable, unmappable file).

    The bytes before the scan position are dropped at every pause: the
    consumer of :meth:`batches` reads offsets, never the window.
    """

    def __init__(self, src: ByteSource, header: NpyHeader, st: ScanState, path: str) -> None:
        self.header = header
        self.st = st
        self.path = path
        self.win = _Window(src, header.data_offset)
        self.pos = 0

    def batches(self) -> Iterator[_Batch]:
        st = self.st
        win = self.win
        while True:
            try:
                self.pos = _scan(win.buf, self.pos, win.hi, win.base, st)
            except ScanError as err:
                raise _scan_exc(err, self.path) from None
            if st.status == ST_BATCH:
                yield _Batch(_take(st.starts), _take(st.memo_at), st.batch_end)
            elif st.status == ST_DONE:
                end = win.base + self.pos
                self.pos, extra, tail = win.after_stop(self.pos)
                _finish(st, self.header, self.path, end, end + extra, tail)
                return
            else:
                if win.eof:
                    raise _truncated(self.path, win.base + self.pos, st)
                win.discard_before(win.base + self.pos)
                self.pos = win.fill(self.pos)
                if win.eof:
                    st.data_end = win.base + win.hi


class _StreamReader:
    """One streaming pass: scan through the window, decode each batch when it closes."""

    def __init__(self, src: ByteSource, header: NpyHeader, policy: SafetyPolicy, stop: int) -> None:
        from npystream.formats.pickle_safety import make_global_check

        self.src = src
        self.header = header
        self.policy = policy
        self.stop = stop
        self.path = src.name
        self.st = ScanState(header.count, make_global_check(policy))
        self.win = _Window(src, header.data_offset)
        self.spill = _Spill(self.path)  # the open batch's bytes once they exceed SPILL_ABOVE
        self.pos = 0  # scan position (window index)
        self.engine: _Engine | None = None
        self.pinned: set[int] = set()
        self.held: list[int] = []  # memo indices decoded but not yet given to the retention policy
        self.first = 0  # index of the open batch's first element
        self.yielded = 0  # elements handed out
        self.failed = False

    # -- the engine --------------------------------------------------------------
    def _unsupported(self, m: int, index: int | None, offset: int) -> None:
        raise UnsupportedError(
            f"element {index} reads back an object (memo entry {m}) from earlier in the stream that streaming has "
            "released to bound memory; read the file from a seekable source (the liveness pass makes every "
            "back-reference exact)",
            path=self.path,
            offset=offset,
            index=index,
        )

    def _start_engine(self, buf: Any, base: int) -> _Engine:
        """The engine, made on first use from the prefix bytes in ``buf`` (``buf[0]`` is at file offset ``base``)."""
        if self.engine is None:
            win = self.win
            eng = _Engine(
                self.path,
                self.header,
                self.policy,
                live=None,
                view=_WindowPayloads(win),
                zero_copy=True,
                free_on_read=False,
                proto=self.st.proto,
            )
            eng.resolver = self._unsupported
            eng.decode_prefix(buf, base, self.header.data_offset, self.st.body_start)
            self.pinned.update(eng.rw.slot_of)
            self.engine = eng
        return self.engine

    # -- decoding ------------------------------------------------------------------
    def _decode(
        self, buf: Any, base: int, starts: np.ndarray, ends: np.ndarray, memos: np.ndarray, first: int, memo_end: int
    ) -> Iterator[list[Any]]:
        """Decode elements ``first ..`` (``[starts[j], ends[j])`` of ``buf``, whose byte 0 is at file offset ``base``)
        in runs of about ``CHUNK_BYTES``; yield the lists."""
        eng = self._start_engine(buf, base)
        spill = self.spill if self.spill.map is not None else None
        rw = eng.rw
        k = min(len(starts), self.stop - first)
        i = 0
        while i < k:
            j = int(np.searchsorted(starts, starts[i] + CHUNK_BYTES, side="left"))
            j = min(max(j, i + 1), k)
            a, b = int(starts[i]), int(ends[j - 1])
            m_lo = int(memos[i])
            m_hi = int(memos[j]) if j < len(starts) else memo_end
            live = None
            if (b - a) >= LARGE_ELEMENT_BYTES * (j - i):
                skip, _ = _payload_memos(buf, a - base, b - base, m_lo)
                if skip:
                    live = dict.fromkeys(range(m_lo, m_hi), -1)
                    for m in skip:
                        del live[m]
            rw.live = live
            try:
                items = eng.decode_run(buf, base, starts[i:j], ends[i:j], memos[i:j], first + i)
            except _Partial as part:
                self.yielded += len(part.items)
                self.failed = True  # an element failed to build: no tentative elements after it
                yield part.items
                raise part.error from None
            finally:
                rw.live = None
            if spill is not None:
                spill.release(a, b)
            self.held.extend(range(m_lo, m_hi))
            self._retain(b)
            self.yielded += len(items)
            yield items
            del items
            i = j

    def _retain(self, decoded_to: int) -> None:
        """Memo writes decoded so far: keep those a later GET already seen reads, the rest by the budget."""
        held = self.held
        if not held:
            return
        reads = self.st.reads
        # the memo entries read again after decoded_to (reads.keys() & held runs in C)
        later = sorted(m for m in reads.keys() & held if reads[m] >= decoded_to) if reads else []
        if len(later) < len(held):
            if later:
                keep = set(later)
                now = [m for m in held if m not in keep]
            else:
                now = held
            assert self.engine is not None
            _retain(self.engine, now, self.pinned)
        self.held = later

    def _close_batch(self, starts: np.ndarray, memo_at: np.ndarray, end: int, memo_end: int) -> Iterator[list[Any]]:
        """Decode the batch that just closed (its element bounds are certain now), then drop its bytes."""
        k = len(starts)
        if k and self.yielded < self.stop:
            ends = np.empty(k, dtype=np.int64)
            ends[:-1] = starts[1:]
            ends[-1] = end
            buf, base = self._batch_bytes(end)
            try:
                yield from self._decode(buf, base, starts, ends, memo_at, self.first, memo_end)
            finally:
                del buf
                self._end_spill()
        self._retain(end)
        self.first += k
        self._end_spill()
        self.win.discard_before(end)

    # -- the spill file ------------------------------------------------------------------
    def _spill_scanned(self) -> None:
        """The scanner is past ``pos``: move the open batch's bytes before it from the window to the spill file."""
        win = self.win
        self.spill.write(win.buf[win.lo : self.pos], win.base + win.lo)
        win.discard_before(win.base + self.pos)
        if len(win.mem) > SPILL_ABOVE + 4 * STREAM_READ and win.hi - win.lo <= STREAM_READ:
            self.pos = win.shrink(self.pos)  # a big opcode grew the window; its bytes are on disk now
        else:  # keep the buffer for the next big batch (its pages are touched once, not per batch)
            win.peak = max(win.peak, len(win.mem))

    def _batch_bytes(self, end: int) -> tuple[Any, int]:
        """(buffer, file offset of its byte 0) holding the open batch up to file offset ``end``."""
        win = self.win
        spill = self.spill
        if not spill.active:
            return win.buf, win.base
        if spill.view is not None:  # mapped already (the engine's prefix came from it)
            return spill.view, spill.base
        stop = min(max(end - win.base, win.lo), win.hi)
        spill.write(win.buf[win.lo : stop], win.base + win.lo)
        win.discard_before(win.base + stop)
        buf, base = spill.open_view()
        win.spilled = (buf, base)
        return buf, base

    def _end_spill(self) -> None:
        self.win.spilled = None
        if self.spill.active:
            self.spill.reset()

    # -- the pass ----------------------------------------------------------------------
    def _scan_all(self) -> Iterator[list[Any]]:
        st = self.st
        win = self.win
        path = self.path
        while True:
            try:
                self.pos = _scan(win.buf, self.pos, win.hi, win.base, st)
            except ScanError as err:
                raise _scan_exc(err, path) from None
            if st.status == ST_BATCH:
                if self.engine is None:
                    self._start_engine(*self._batch_bytes(st.batch_end))
                starts = _take(st.starts)
                memo_at = _take(st.memo_at)
                yield from self._close_batch(starts, memo_at, st.batch_end, st.memo)
            elif st.status == ST_DONE:
                end = win.base + self.pos
                self.pos, extra, tail = win.after_stop(self.pos)
                _finish(st, self.header, path, end, end + extra, tail)
                if self.engine is None:
                    try:  # validates the header part of an empty array
                        self._start_engine(*self._batch_bytes(end))
                    finally:
                        self._end_spill()
                return
            else:
                if self.yielded >= self.stop and self.engine is not None:
                    win.discard_before(win.base + self.pos)  # nothing more to decode: keep what the scanner needs
                elif self.spill.active or win.hi - win.lo > SPILL_ABOVE:
                    self._spill_scanned()  # the open batch is big: its scanned bytes go to disk
                if win.eof:
                    raise _truncated(path, win.base + self.pos, st)
                self.pos = win.fill(self.pos)
                if win.eof:
                    st.data_end = win.base + win.hi

    def run(self) -> Iterator[list[Any]]:
        try:
            yield from self._scan_all()
        except (FormatError, UnsafePickleError) as exc:
            if not self.failed:  # damage the scanner found: the elements before it whose extent is certain
                yield from self._tentative(exc)
            raise
        finally:
            self.win.spilled = None
            self.spill.close()

    def _tentative(self, exc: Exception) -> Iterator[list[Any]]:
        """After damage inside a batch: the elements before it whose extent is certain, one by one."""
        st = self.st
        if st.body_start < 0 or self.yielded >= self.stop:
            return
        p_starts, p_memo, p_end = _pending(st, exc, self.header.count)
        if not len(p_starts):
            return
        buf, base = self._batch_bytes(p_end)
        eng = self._start_engine(buf, base)
        p_ends = np.append(p_starts[1:], p_end)
        for j in range(len(p_starts)):  # tentative: one by one, stop at the first doubtful one
            if self.first + j >= self.stop:
                return
            try:
                item = eng.decode_run(buf, base, p_starts[j : j + 1], p_ends[j : j + 1], p_memo[j : j + 1], self.first + j)[0]
            except _Partial:
                return
            if _looks_partial(item):
                return
            self.yielded += 1
            yield [item]


def _iter_stream(src: ByteSource, header: NpyHeader, policy: SafetyPolicy, stop: int) -> Iterator[list[Any]]:
    """Lists of decoded elements (in order, ``stop`` at most) of a pickled ``.npy`` read forward only."""
    return _StreamReader(src, header, policy, stop).run()
