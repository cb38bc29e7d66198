"""The opcode walker: stream an object-dtype ``.npy`` pickle element by element with bounded memory.

What numpy writes
-----------------
``np.save`` of an object array (or a structured array with object fields)
writes the ``.npy`` header and then ONE pickle of the whole array::

    PROTO p [FRAME n]
    _reconstruct, (ndarray, (0,), b'b') REDUCE                 -> the array
    MARK 1, shape, dtype(...) [BUILD dtype state], is_fortran, EMPTY_LIST [memo]
         MARK e0 e1 ... e999 APPENDS  MARK e1000 ... APPENDS  ...   (or one e + APPEND)
    TUPLE [memo] BUILD STOP

The list is the array's items in C order (numpy's ``.flat``); every element
``e_i`` is the opcodes that push exactly one object.  numpy 2.x writes
protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL), numpy 1.x protocol 3 (BINPUT),
Python 2 protocol 2 (GLOBAL, SHORT_BINSTRING; memo indices from 1).

Design (and why)
----------------
1. **Scan** (:func:`scan_ops`, the hot loop; a C twin in ``npystream._speedups``):
   one pass over the opcodes that *skips payloads by their length fields*,
   simulating only stack *counts* and MARKs.  It records where every element
   starts (the opcode that pushes its bottom stack slot: element boundaries are
   only certain when the batch's APPENDS arrives, because a later BUILD,
   SETITEM or APPEND may still fold the next slot into the current element),
   the memo counter at each element start, and for every memo index that is
   ever *read* (GET) the offset of its last read: the **liveness table**.
   numpy memoizes ~6 objects per element, payloads included, but only a
   handful are read back (the globals, ``b'b'``, the dtype built inside
   element 0 and referenced by every later element); any reader that keeps
   the pickle memo keeps the whole file, so liveness is what bounds memory.
   The scan also enforces the hostile-input rules: lengths checked against the
   bytes that remain (nothing is allocated from a length field), memo indices
   strictly sequential (a 137-byte file can otherwise make CPython allocate
   gigabytes), FRAMEs that end on an opcode boundary, MARK depth and stack
   height caps, the exact envelope numpy writes (one list, STOP with one
   object, no trailing bytes, element count == header count), no persistent
   ids / extension codes / out-of-band buffers.
2. **Rewrite** (:func:`rewrite_ops`, the other hot loop, also in C): copies
   the opcodes of a run of elements into a small program for the C
   unpickler, dropping memo writes nobody reads, remapping live memo indices
   to a few reusable *slots* (a slot is freed after the entry's last read),
   stripping FRAMEs (the C unpickler silently misreads bytes that straddle a
   frame end once lengths change) and, for zero-copy, replacing an array's
   raw-data BINBYTES by a persistent id ``(offset, length)`` that resolves to
   a read-only view of the mapped file.  The copying mode on a mapped file
   does the same for chunks whose elements average >= 64 KiB
   (``LARGE_ELEMENT_BYTES``), resolving the id to a fresh writeable copy
   (:class:`_CopyingView`): one copy per payload instead of two (into the
   program, then into the ``bytes`` numpy's ``__setstate__`` keeps).
3. **Direct** (:mod:`npystream.formats.pickle_direct`, C twin in
   ``npystream._speedups``): the element kinds numpy writes most -- a plain
   ndarray (``_reconstruct`` + BUILD of ``(1, shape, dtype, fortran, raw)``,
   ~25 opcodes of fixed shape) and a one-opcode scalar (short ``str``,
   ``bytes``, ``int``, ``float``, ``None``, ``bool``) -- are recognised in
   the bytes and built straight away (numpy's ``_reconstruct`` +
   ``__setstate__`` with a ``bytes`` payload, exactly what the unpickler
   would end up doing; a read-only view in zero-copy mode), when the memo
   entries they read are known to be the checked globals, ``b'b'`` and a
   checked dtype (``_Engine.roles``, learnt from the memo on first use), they
   write no entry anybody reads, and they hold no entry's last read.  Only
   the other elements are rewritten and unpickled.  This removes the
   unpickler, the rewriter and the placeholder pass from the common path
   (workload 2: 2.3 s -> 1.4 s).  Needs the liveness table, so not used when
   streaming from a forward-only source.
4. **Build**: ONE persistent C ``pickle.Unpickler`` (subclassed for the
   safety policy, see :mod:`npystream.formats.pickle_safety`) loads each
   program ``PROTO MARK <elements> TUPLE STOP`` of ~1 MiB of elements
   (within one APPENDS batch).  Elements come out of ``itertools.chain`` over
   the decoded chunks, so the per-element cost of iteration is C-level.  Its
   memo survives across ``load()`` calls (a CPython fact we rely on: only the
   stack is reset), so slots written by earlier programs are still there;
   assigning a dict to ``Unpickler.memo`` would empty it (CPython issue
   111066).  The input file object offers ``peek`` so the C unpickler reads
   in 128 KiB blocks instead of one Python call per opcode.  A failed
   ``load()`` leaves unread bytes in the unpickler's read-ahead buffer, so
   after an error a fresh unpickler takes over the memo (assigning the memo
   *proxy* copies it correctly).

On a seekable source the scan runs first over the whole file (an index: 16
bytes per element), then elements are decoded in ~1 MiB chunks; on a mapped
file the scan touches only opcode pages, never array payload pages.  A
damaged file still yields the elements before the damage, then raises.

Streaming from a non-seekable source (pipes, gzip, deflated zip members)
--------------------------------------------------------------------------
No liveness pre-pass is possible; :mod:`npystream.formats.pickle_stream`
holds the design.  In short: the scanner reads through one reusable window
of raw bytes that holds the open batch; when the batch's APPENDS makes its
element bounds certain, its elements are decoded and its bytes dropped (no
bounded lookahead could tell an element from the pending first parts of a
nested one, so nothing is decoded before); memo values are kept across batches only within a budget (globals,
dtypes, small values), and an element that reads back a released object
raises :class:`~npystream.errors.UnsupportedError` naming the element and the
fix (read the file from a seekable source, where the liveness pass makes
every back-reference exact).  Elements before it have been yielded.

A standalone pickle (an element of a ragged store of kind "object") is
checked by the same scanner and limits before it is unpickled:
:func:`load_pickle` scans it as element 0 of a one-element envelope.

Coordinates: offsets are byte offsets in the source; ``header.data_offset``
is the first pickle byte.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import os
import pickle
import struct
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream.errors import (
    FormatError,
    NotSeekableError,
    NpyStreamError,
    TruncatedError,
    UnsafePickleError,
    UnsupportedError,
)
from npystream.formats.npy import NpyHeader
from npystream.formats.pickle_direct import _DIRECT_FIRST, ROLE_DTYPE
from npystream.formats.pickle_direct import direct_run as _py_direct_run
from npystream.formats.pickle_direct import role_of as _role_of
from npystream.formats.pickle_ops import (  # noqa: F401 - re-exported for tests and the C twin
    _GET_CODES,
    _INF,
    PH_BODY,
    PH_PREFIX,
    RW_OK,
    ST_BATCH,
    ST_DONE,
    RewriteState,
    ScanError,
    ScanState,
    _pack_I,
    _text_int,
    rewrite_ops,
    scan_ops,
)
from npystream.formats.pickle_safety import (
    _SPECIAL_TYPES,
    _SWAPPED,
    _WALK,
    DONE,
    TOKEN_TYPES,
    ArrayProto,
    DtypeProto,
    PickleDecodeError,
    SafetyPolicy,
    SafeUnpickler,
    _build_array,
    _checked_dtype,
    _real_reconstruct,
    aligned_copy,
    build_arrays_c,
    check_dtype,
    check_load,
    check_made,
    finalize,
    load_one,
    make_global_check,
    placeholders_escaped,
)
from npystream.sources import ByteSource

__all__ = [
    "SafetyPolicy",
    "PickleIndex",
    "ScanState",
    "RewriteState",
    "ScanError",
    "scan_ops",
    "rewrite_ops",
    "scan_index",
    "iter_elements",
    "ElementDecoder",
    "speedups_active",
]

# ---------------------------------------------------------------------------
# limits of the walker (each with its reason)
CHUNK_BYTES = 1 << 20  # bytes of pickle per unpickler load (bounds the decoded chunk)
VIEW_RUN_BYTES = 64 << 20  # the same for zero-copy views of a mapped file (nothing is copied)
# A seekable file of more elements than this is read front to back without the offset index
# (16 bytes per element: 256 MB here), unless an index, zero_copy or a start is asked for.  The
# stream costs time: 6 million short strings 2.57 s (50 MiB) vs 1.20 s (116 MiB) with the index,
# np.load 1.11 s (537 MiB); so only where the index would outgrow what np.load's own objects
# make reasonable.  (npystream convert streams from 4 million on: its bound is 200 MB.)
STREAM_ABOVE = 16_000_000
RELEASE_STEP = 32 << 20  # iter_elements(release_behind=True): map pages dropped behind the reader in these steps
LARGE_ELEMENT_BYTES = 64 << 10  # copying mode: chunks averaging this much per element copy payloads once (see _CopyingView)
STREAM_READ = 1 << 20  # read size for non-mappable sources
RETAIN_MAX = 65536  # streaming: memo values kept across batches, at most
RETAIN_BYTES = 16 << 20  # streaming: ... and at most this many bytes of them
RETAIN_ONE = 256 << 10  # streaming: a single value larger than this is never kept
INDEX_VERSION = 2
INDEX_FIRST = 1 << 16  # offset-index slots reserved before the scan finds elements (grown by doubling)

# ---------------------------------------------------------------------------
# choosing the implementation of the two hot loops


def _load_speedups() -> tuple[Any, Any, bool]:
    from npystream._accel import speedups

    _speedups = speedups()
    if _speedups is None:
        return scan_ops, rewrite_ops, False
    _speedups.setup(ScanError, ScanState, RewriteState, _text_int)
    return _speedups.scan_ops, _speedups.rewrite_ops, True


_scan, _rewrite, _SPEEDUPS = _load_speedups()
if _SPEEDUPS:
    from npystream import _speedups as _sp  # type: ignore[attr-defined]

    _sp.direct_setup(_real_reconstruct, np.ndarray)
    _direct_run = _sp.direct_run
else:
    _direct_run = _py_direct_run
_NO_INTS = np.zeros(0, dtype=np.int64)
_MISS = object()  # direct_one: not an element direct decoding builds
_DIRECT = os.environ.get("NPYSTREAM_NO_DIRECT", "").strip() in ("", "0")  # off: every element via the unpickler


def speedups_active() -> bool:
    """True when the C accelerator runs the hot loops (False under ``NPYSTREAM_PURE_PYTHON=1``)."""
    return _SPEEDUPS


# ---------------------------------------------------------------------------
# the offset index


@dataclass(frozen=True)
class PickleIndex:
    """Where every element of an object ``.npy`` pickle starts and ends, and which memo entries live.

    16 bytes per element (``starts``, ``memo_at``) plus 16 per APPENDS batch
    and per live memo entry; ``ends`` is derived (``end_of(i)`` for one).
    """

    count: int
    starts: np.ndarray  # int64[count]: offset of element i's first opcode
    memo_at: np.ndarray  # int64[count+1]: memo counter where element i starts; [count]: at the list's end
    batch_first: np.ndarray  # int64[nbatches+1]: first element of each APPENDS batch; last == count
    batch_ends: np.ndarray  # int64[nbatches]: offset of the APPENDS/APPEND closing each batch
    body_start: int
    body_memo: int
    live_memo: np.ndarray  # int64[k]: memo indices ever read (sorted)
    live_last: np.ndarray  # int64[k]: offset of the last read of each
    proto: int

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays."""
        return int(
            self.starts.nbytes
            + self.memo_at.nbytes
            + self.batch_first.nbytes
            + self.batch_ends.nbytes
            + self.live_memo.nbytes
            + self.live_last.nbytes
        )

    @functools.cached_property
    def ends(self) -> np.ndarray:
        """int64[count]: offset one past element i's last opcode (computed on first use)."""
        e = np.empty(self.count, dtype=np.int64)
        if self.count:
            e[:-1] = self.starts[1:]
            e[self.batch_first[1:] - 1] = self.batch_ends
        return e

    def end_of(self, i: int) -> int:
        """Offset one past element ``i``'s last opcode."""
        b = int(np.searchsorted(self.batch_first, i, side="right")) - 1
        if i + 1 < int(self.batch_first[b + 1]):
            return int(self.starts[i + 1])
        return int(self.batch_ends[b])

    def split_by_bytes(self, nbytes: int) -> np.ndarray:
        """Element boundaries ``[0, b1, ..., count]`` cutting the pickle into runs of about ``nbytes``.

        Run ``k`` is elements ``[b[k], b[k+1])``; a run ends at the first
        element starting ``nbytes`` or more after the run's target start, so
        an element larger than ``nbytes`` is a run of its own.  For splitting
        a file into independent partitions (each decoded through this index).
        """
        if self.count == 0:
            return np.zeros(1, dtype=np.int64)
        first = int(self.starts[0])
        total = int(self.batch_ends[-1]) - first
        targets = first + np.arange(1, -(-total // nbytes), dtype=np.int64) * nbytes
        cuts = np.searchsorted(self.starts, targets, side="left")
        return np.unique(np.concatenate(([0], cuts, [self.count])).astype(np.int64))

    def batch_of(self, i: int) -> int:
        """The APPENDS batch holding element ``i``."""
        return int(np.searchsorted(self.batch_first, i, side="right")) - 1

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain int64 arrays (``np.savez``-able); inverse of :meth:`from_arrays`."""
        meta = np.array([INDEX_VERSION, self.count, self.body_start, self.body_memo, self.proto], dtype=np.int64)
        return {
            "meta": meta,
            "starts": self.starts,
            "memo_at": self.memo_at,
            "batch_first": self.batch_first,
            "batch_ends": self.batch_ends,
            "live_memo": self.live_memo,
            "live_last": self.live_last,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], header: NpyHeader) -> PickleIndex:
        """Rebuild from :meth:`to_arrays` output; FormatError when it does not fit ``header``."""
        try:
            meta = np.asarray(arrays["meta"], dtype=np.int64)
            got = {k: np.ascontiguousarray(arrays[k], dtype=np.int64) for k in _INDEX_KEYS}
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"saved pickle index is incomplete or malformed ({exc}); rebuild it") from None
        count = header.count
        starts, memo_at = got["starts"], got["memo_at"]
        bf, be = got["batch_first"], got["batch_ends"]
        lm, ll = got["live_memo"], got["live_last"]
        ok = (
            meta.shape == (5,)
            and int(meta[0]) == INDEX_VERSION
            and int(meta[1]) == count
            and starts.shape == (count,)
            and memo_at.shape == (count + 1,)
            and bf.ndim == 1
            and bf.size >= 1
            and be.shape == (bf.size - 1,)
            and lm.ndim == 1
            and lm.shape == ll.shape
            and int(meta[2]) >= header.data_offset
        )
        if ok:
            ok = bool(int(bf[0]) == 0 and int(bf[-1]) == count and np.all(np.diff(bf) > 0 if count else True))
        if ok and count:
            last = bf[1:] - 1
            ok = bool(
                starts[0] >= meta[2]
                and np.all(np.diff(starts) > 0)
                and np.all(be > starts[last])
                and np.all(starts[bf[1:-1]] > be[:-1])
                and np.all(np.diff(memo_at) >= 0)
            )
        if ok and lm.size:
            ok = bool(np.all(np.diff(lm) > 0) and lm[0] >= 0)
        if not ok:
            raise FormatError(
                f"saved pickle index does not match this file (version {int(meta[0]) if meta.size else '?'}, "
                f"expected {INDEX_VERSION}, {count} elements); rebuild it"
            )
        return cls(
            count=count,
            starts=starts,
            memo_at=memo_at,
            batch_first=bf,
            batch_ends=be,
            body_start=int(meta[2]),
            body_memo=int(meta[3]),
            live_memo=lm,
            live_last=ll,
            proto=int(meta[4]),
        )


_INDEX_KEYS = ("starts", "memo_at", "batch_first", "batch_ends", "live_memo", "live_last")


# ---------------------------------------------------------------------------
# errors with path, offset and element index


def _scan_exc(err: ScanError, path: str) -> Exception:
    cls = {"truncated": TruncatedError, "unsafe": UnsafePickleError}.get(err.kind, FormatError)
    return cls(err.message, path=path, offset=err.offset, index=err.index)


def _truncated(path: str, offset: int, st: ScanState) -> TruncatedError:
    if st.phase == PH_PREFIX:
        what = "before the element list"
        index = None
    elif st.phase == PH_BODY:
        what = "inside the element list"
        index = st.done + max((len(st.starts) >> 3) - 1, 0)
    else:
        what = "before the pickle's STOP"
        index = None
    return TruncatedError(
        f"file ends {what} (an opcode or its payload is cut short); the file was truncated",
        path=path,
        offset=offset,
        index=index,
    )


# ---------------------------------------------------------------------------
# scanning drivers


class _Batch:
    __slots__ = ("starts", "memo_at", "end")

    def __init__(self, starts: np.ndarray, memo_at: np.ndarray, end: int) -> None:
        self.starts = starts
        self.memo_at = memo_at
        self.end = end


def _take(raw: bytearray) -> np.ndarray:
    """The int64 values packed in ``raw`` (a copy); empties ``raw``."""
    out = np.frombuffer(raw, dtype="<i8").astype(np.int64)
    raw.clear()
    return out


def _pending(st: ScanState, exc: Exception, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Elements of the open batch before the damage (their extent is certain), and where the last ends."""
    starts = np.frombuffer(st.starts, dtype="<i8").astype(np.int64)
    memo_at = np.frombuffer(st.memo_at, dtype="<i8").astype(np.int64)
    bad = getattr(exc, "index", None)
    k = max(0, bad - st.done) if bad is not None else max(len(starts) - 1, 0)
    if isinstance(exc, TruncatedError):
        # cut inside an element: its first slots may look like whole elements (a REDUCE's
        # callable and args, a SETITEM's dict, key and value): leave out two more slots
        k -= 2
    k = max(0, min(k, len(starts), count - st.done))
    end = int(starts[k]) if k < len(starts) else int(getattr(exc, "offset", 0) or 0)
    return starts[:k], memo_at[:k], end


def _scan_view(view: Any, header: NpyHeader, st: ScanState, path: str) -> Iterator[_Batch]:
    """Scan a mapped source: yields batches; raises at damage (after the batches before it)."""
    size = len(view)
    st.data_end = size
    pos = header.data_offset
    if pos > size:
        raise TruncatedError("file ends before the pickle starts", path=path, offset=size)
    while True:
        try:
            pos = _scan(view, pos, size, 0, st)
        except ScanError as err:
            raise _scan_exc(err, path) from None
        if st.status == ST_BATCH:
            # views of the scanner's buffers, no copies: the consumer copies them before asking
            # for the next batch (a view kept longer makes clear() raise BufferError, never garbage)
            batch = _Batch(np.frombuffer(st.starts, dtype="<i8"), np.frombuffer(st.memo_at, dtype="<i8"), st.batch_end)
            yield batch
            del batch
            st.starts.clear()
            st.memo_at.clear()
        elif st.status == ST_DONE:
            _finish(st, header, path, pos, size, bytes(view[pos : pos + 1]))
            return
        else:
            raise _truncated(path, pos, st)


def _finish(st: ScanState, header: NpyHeader, path: str, pos: int, size: int | None, tail: bytes = b"") -> None:
    if st.done != header.count:
        raise FormatError(
            f"the pickle holds {st.done} elements but the header's shape {header.shape} says {header.count}",
            path=path,
            offset=st.batch_end if st.batch_end >= 0 else pos,
        )
    if size is not None and size - pos < 2 and _INF > st.frame_end > size:
        # the FRAME holding STOP claims bytes the data does not have: np.load (and the scan of a
        # file whose size is known, at the FRAME itself) refuses it, so every source does
        raise TruncatedError(
            f"the pickle's last FRAME ends at byte {st.frame_end}, {st.frame_end - size} bytes past the end of the data",
            path=path,
            offset=size,
        )
    if size is not None and pos != size and not (size == pos + 1 and tail == b"\n"):
        # (one newline is tolerated: numpy 0.x-era writers appended it, see numpy's py2-np0 test file)
        raise FormatError(
            f"{size - pos} trailing bytes after the pickle's STOP; expected the file to end there",
            path=path,
            offset=pos,
        )


def _index_from_batches(
    batches: Iterator[_Batch], st: ScanState, header: NpyHeader
) -> tuple[PickleIndex, Exception | None, int]:
    """Collect batches into a PickleIndex; on damage also the error and where tentative elements begin.

    Elements of the batch open at the damage are *tentative*: their extent is
    only certain at the batch's closing APPENDS, so the caller decodes them one
    by one and stops at the first that does not look like a whole element.
    """
    count = header.count
    # sized by what the scan finds, never by the header's count alone (a 250-byte file may claim
    # 2**40 elements): start small, double up to the count as batches arrive
    cap = min(count, INDEX_FIRST)
    starts = np.empty(cap, dtype=np.int64)
    memo_at = np.empty(cap + 1, dtype=np.int64)
    firsts: list[int] = []
    ends: list[int] = []
    k = 0
    error: Exception | None = None
    tentative = -1

    def grow(need: int) -> None:
        nonlocal starts, memo_at
        if need > len(starts):
            new = min(max(need, 2 * len(starts)), max(count, need))
            starts = np.concatenate((starts[:k], np.empty(new - k, dtype=np.int64)))
            memo_at = np.concatenate((memo_at[:k], np.empty(new + 1 - k, dtype=np.int64)))

    try:
        for batch in batches:
            n = len(batch.starts)
            if n:
                grow(k + n)
                starts[k : k + n] = batch.starts
                memo_at[k : k + n] = batch.memo_at
                firsts.append(k)
                ends.append(batch.end)
                k += n
            del batch  # _scan_view's batches are views of the scanner's buffers
    except (FormatError, UnsafePickleError) as exc:
        error = exc
        tentative = k
        p_starts, p_memo, p_end = _pending(st, exc, count)
        n = len(p_starts)
        if n:
            grow(k + n)
            starts[k : k + n] = p_starts
            memo_at[k : k + n] = p_memo
            firsts.append(k)
            ends.append(p_end)
            k += n
    memo_at[k] = st.memo
    reads = st.reads
    live_memo = np.array(sorted(reads), dtype=np.int64)
    live_last = np.array([reads[m] for m in live_memo.tolist()], dtype=np.int64)
    index = PickleIndex(
        count=k,
        starts=starts[:k] if k < len(starts) else starts,
        memo_at=memo_at[: k + 1] if k + 1 < len(memo_at) else memo_at,
        batch_first=np.array([*firsts, k], dtype=np.int64),
        batch_ends=np.array(ends, dtype=np.int64),
        body_start=st.body_start,
        body_memo=st.body_memo,
        live_memo=live_memo,
        live_last=live_last,
        proto=st.proto,
    )
    return index, error, tentative


def _map_or_none(src: ByteSource) -> Any:
    if not src.seekable:
        return None
    try:
        return src.map()
    except (NotSeekableError, OSError, ValueError):
        return None


def _build_index(
    src: ByteSource, header: NpyHeader, policy: SafetyPolicy
) -> tuple[PickleIndex, Exception | None, Any, int]:
    from npystream.formats.pickle_safety import make_global_check

    path = src.name
    st = ScanState(header.count, make_global_check(policy))
    view = _map_or_none(src)
    if view is not None:
        batches = _scan_view(view, header, st, path)
    else:
        src.seek(header.data_offset)
        from npystream.formats.pickle_stream import _StreamScan

        batches = _StreamScan(src, header, st, path).batches()
    index, error, tentative = _index_from_batches(batches, st, header)
    return index, error, view, tentative


def scan_index(src: ByteSource, header: NpyHeader, policy: SafetyPolicy) -> PickleIndex:
    """Build the offset index of a seekable object ``.npy`` in one pass over its opcodes.

    Raises the first damage found anywhere in the pickle (FormatError,
    TruncatedError, UnsafePickleError with path, offset and element index).
    """
    if not src.seekable:
        raise NotSeekableError(
            "an offset index needs a seekable file; this source can only be streamed (use iteration)",
            path=src.name,
        )
    if not header.pickled:
        raise ValueError(f"dtype {header.dtype} is not pickled; there is no object index to build")
    index, error, _, _ = _build_index(src, header, policy)
    if error is not None:
        raise error
    return index


# ---------------------------------------------------------------------------
# building objects: one persistent C unpickler fed small rewritten programs


class _Feed:
    """The unpickler's input file: one program at a time; ``peek`` lets the C unpickler read in blocks."""

    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        self.data: Any = b""
        self.pos = 0

    def set(self, data: Any) -> None:
        self.data = data
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        p = self.pos
        e = len(self.data) if n is None or n < 0 else min(p + n, len(self.data))
        self.pos = e
        return bytes(self.data[p:e])

    def readinto(self, b: Any) -> int:
        p = self.pos
        k = min(len(b), len(self.data) - p)
        b[:k] = self.data[p : p + k]
        self.pos = p + k
        return k

    def readline(self) -> bytes:
        p = self.pos
        k = self.data.find(b"\n", p)
        e = len(self.data) if k < 0 else k + 1
        self.pos = e
        return bytes(self.data[p:e])

    def peek(self, n: int = 0) -> bytes:
        return bytes(self.data[self.pos : self.pos + max(n, 1 << 17)])


class _Partial(Exception):
    """A run failed at one element: the elements before it, and the error to raise after them."""

    def __init__(self, items: list[Any], error: Exception) -> None:
        super().__init__(error)
        self.items = items
        self.error = error


def _load_error(exc: BaseException, path: str, offset: int | None, index: int | None) -> BaseException:
    if isinstance(exc, (UnsafePickleError, FormatError, UnsupportedError)) and not isinstance(exc, PickleDecodeError):
        if exc.path is not None and exc.offset is not None:
            return exc
        return type(exc)(exc.message, path=path, offset=offset, index=index)
    if isinstance(exc, PickleDecodeError):
        return exc
    if isinstance(exc, UnicodeDecodeError):
        return PickleDecodeError(
            f"a Python 2 string cannot be decoded as {exc.encoding} ({exc.reason}); pass encoding='latin1' "
            "(or 'bytes') like np.load for files written by Python 2",
            path=path,
            offset=offset,
            index=index,
        )
    if isinstance(exc, ImportError):
        return exc
    if isinstance(exc, (MemoryError, RecursionError)):
        return FormatError(f"element too large or too deep to build ({type(exc).__name__})", path=path, offset=offset, index=index)
    return FormatError(f"the unpickler rejected this element: {_scrubbed(exc)}", path=path, offset=offset, index=index)


# npystream's placeholders as a foreign exception may name them (they never reach a user)
_INTERNAL_NAMES = (("ArrayProto", "unchecked array"), ("DtypeProto", "unchecked dtype"), ("_NdarrayToken", "ndarray"))


def _scrubbed(exc: BaseException) -> str:
    """``Type: message`` of a foreign exception, without the names of npystream's placeholders."""
    text = f"{type(exc).__name__}: {exc}"
    for internal, public in _INTERNAL_NAMES:
        text = text.replace(internal, public)
    return text


_RETAIN_TYPES = (type, type(len), np.dtype, DtypeProto)
_SPECIAL = frozenset(_SPECIAL_TYPES)  # placeholders and wrappers: finalised whenever present
_SPECIAL_PROTOS = frozenset(_WALK)  # ... and containers, once placeholders exist


class _MemoWriter(pickle.Unpickler):
    """Puts given objects into memo slots (assigning a dict to ``Unpickler.memo`` loses it in CPython 3.11)."""

    def __init__(self, program: bytes, values: list[Any]) -> None:
        super().__init__(io.BytesIO(program))
        self.values = values

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        return self.values[int(name)]


def _memo_with(unpickler: Any, updates: dict[int, Any]) -> Any:
    """A memo proxy equal to ``unpickler.memo`` with ``updates`` (slot -> object) applied."""
    program = bytearray()
    for i, k in enumerate(updates):
        program += b"cx\n%d\n" % i + b"r" + struct.pack("<I", k) + b"0"
    program += b"N."
    w = _MemoWriter(bytes(program), list(updates.values()))
    w.memo = unpickler.memo
    w.load()
    return w.memo


class _Engine:
    """Rewrite runs of elements into programs and build them with one persistent unpickler."""

    def __init__(
        self,
        path: str,
        header: NpyHeader,
        policy: SafetyPolicy,
        *,
        live: dict[int, int] | None,
        view: Any,
        zero_copy: bool | str,
        free_on_read: bool,
        proto: int,
        copy_view: Any = None,
    ) -> None:
        self.path = path
        self.header = header
        self.feed = _Feed()
        # copy_view (copying mode on a mapped file): persistent ids resolve to fresh writeable
        # copies instead of views; the rewriter emits them only while rw.zero_copy is switched on
        self.unpickler = SafeUnpickler(self.feed, policy, zero_copy_view=view if zero_copy else copy_view)
        self.ctx = self.unpickler.ctx
        self.ctx.copy_unaligned = zero_copy is True  # views of aligned payloads only ("always": all)
        self.rw = RewriteState(live, zero_copy=zero_copy and view is not None, free_on_read=free_on_read)
        self.proto_op = bytes([0x80, proto]) if proto >= 2 else b""
        self.structured = header.dtype.names is not None
        self.resolver: Any = None  # callable(m, index, offset) making rw.slot_of[m] valid, or raising
        self.retained_bytes = 0
        # direct decoding (pickle_direct) of plain ndarray/scalar elements: needs the liveness table
        self.direct = live is not None and not self.structured and _DIRECT
        self.roles: dict[int, tuple[int, Any]] = {}  # memo index -> (role, object) for direct decoding
        self.role_src: dict[int, tuple[Any, str, Any]] = {}  # dtype roles: (memo value, its str, names)
        self.direct_fn = _direct_run
        self.live_keys = np.array(sorted(live) if live else [], dtype=np.int64)
        self.live_offsets = np.sort(np.fromiter(live.values(), dtype=np.int64, count=len(live))) if live else None
        self.zc_views = zero_copy and view is not None
        self.live_offsets_list = self.live_offsets.tolist() if self.live_offsets is not None else []
        self._one = np.zeros(3, dtype=np.int64)  # direct_one's start, end, memo counter
        self._one_parts = (self._one[0:1], self._one[1:2], self._one[2:3])
        self._vf_buf: Any = None
        self._vf: Any = None
        self.memo_protos = False  # a load made placeholders that the memo may hold (see _realise_memo)

    # -- low level ---------------------------------------------------------------
    def _run_program(self, program: bytearray, elements: bool = True) -> Any:
        self.feed.set(program)
        made = self.ctx.made
        try:
            if made is None:
                return self.unpickler.load()
            made.clear()
            if elements and self.memo_protos:
                self._realise_memo()
            try:
                result = self.unpickler.load()
            except Exception as exc:
                self.memo_protos = self.memo_protos or bool(made)
                if not (elements and made) or isinstance(exc, NpyStreamError):
                    raise
                # code of a class the policy resolved (trusted, or allowed by name) failed on a placeholder
                self._fresh_unpickler()
                return self._rerun_failed(program, made, exc)
            self.memo_protos = self.memo_protos or bool(made)
            if made and elements:
                result = self._trusted_rerun(program, result, made)
            return result
        except BaseException:
            # dtypes the failed load made are not the next load's to check (nor to blame)
            if self.ctx.dtypes:
                self.ctx.dtypes.clear()
            self._fresh_unpickler()
            raise
        finally:
            self.feed.set(b"")

    def _fresh_unpickler(self) -> None:
        """After a failed load: a new unpickler sharing the memo.

        A failed load leaves unread program bytes in the C unpickler's
        read-ahead buffer, which the next load() would execute; assigning the
        memo *proxy* copies it (a dict would not).
        """
        old = self.unpickler
        new = SafeUnpickler(self.feed, old.policy)
        new.ctx = old.ctx
        new.use_protos = old.use_protos
        new._cache = old._cache
        new.memo = old.memo
        self.unpickler = new

    def _rerun_failed(self, program: bytearray, made: list[Any], exc: Exception) -> Any:
        """A load failed inside code that received an array or dtype placeholder (pandas, np.matrix ...).

        trusted=True: the states recorded so far are checked and the program
        runs again with numpy's real ``_reconstruct`` and dtypes, as
        ``np.load(allow_pickle=True)`` runs it.  Safe mode cannot hand real
        arrays to such code before every state is checked, so it says that
        only trusted=True reads these objects.
        """
        if not self.ctx.trusted:
            made.clear()
            raise UnsafePickleError(
                f"this element cannot be built in safe mode ({_scrubbed(exc)}): an object of a class named in "
                "allowed_globals that builds itself from arrays or dtypes while it is unpickled (pandas "
                "objects do) would need them before safe mode has checked them; pass trusted=True for a file "
                "you trust"
            ) from None
        return self._trusted_rerun(program, None, made, failed=True)

    def _trusted_rerun(self, program: bytearray, result: Any, made: list[ArrayProto], failed: bool = False) -> Any:
        """Trusted mode, and safe mode with allowed_globals: placeholders that escaped into objects the finaliser does not walk.

        Array placeholders reachable through lists, dicts, tuples and object
        arrays are built by the finaliser.  One handed to anything else (a
        class's ``__setstate__``, a constructor) would stay a placeholder, so
        then every array state of this load is checked (FormatError for a
        hostile one) and the program runs once more with numpy's real
        ``_reconstruct``, as ``np.load`` would run it.
        """
        if not failed and not placeholders_escaped(result, made):
            made.clear()
            return result
        ctx = self.ctx
        check_made(ctx, made, failed)
        self._realise_memo()
        ctx.real = True
        try:
            self.feed.set(program)
            return self.unpickler.load()
        finally:
            ctx.real = False

    def _realise_memo(self) -> None:
        """Put real arrays and dtypes in the memo in place of earlier loads' placeholders (every state is checked).

        trusted=True and allowed_globals only: a later element may hand a
        memoized array or dtype to code that is not ours (a slice, a class's
        ``__setstate__``), which must receive the real object.  A placeholder
        without state is the outer array's, from the prefix: left alone.
        """
        self.memo_protos = False
        memo = self.unpickler.memo.copy()
        if not any(type(v) is DtypeProto or (type(v) is ArrayProto and v) for v in memo.values()):
            return
        ctx = self.ctx
        check_load(ctx)
        seen: dict[int, Any] = {}
        real = {
            k: (_build_array(v, ctx, seen, 0) if type(v) is ArrayProto else check_dtype(v))
            for k, v in memo.items()
            if (type(v) is ArrayProto and v) or type(v) is DtypeProto
        }
        self.unpickler.memo = _memo_with(self.unpickler, real)

    def rewrite_all(self, buf: Any, start: int, end: int, base: int, out: bytearray, index: int | None) -> None:
        """Rewrite ``[start, end)`` (file offsets) of ``buf`` into ``out``, resolving missing memo entries."""
        rw = self.rw
        pos = start - base
        stop = end - base
        depth = 0
        while True:
            pos = _rewrite(buf, pos, stop, base, rw, out)
            if rw.status == RW_OK:
                return
            depth += 1
            if self.resolver is None or depth > 10_000:
                raise UnsupportedError(
                    f"memo entry {rw.missing} is not available here", path=self.path, offset=base + pos, index=index
                )
            self.resolver(rw.missing, index, base + pos)
            if rw.missing in rw.slot_of:
                rw.status = RW_OK
            else:  # pragma: no cover - resolver contract
                raise FormatError(f"memo entry {rw.missing} could not be resolved", path=self.path, offset=base + pos, index=index)

    def _commit(self) -> None:
        rw = self.rw
        freed = rw.freed
        if freed:
            slot_of = rw.slot_of
            for k in range(0, len(freed), 2):
                m, s = freed[k], freed[k + 1]
                if slot_of.get(m) == s:
                    del slot_of[m]
                    rw.free.append(s)
            freed.clear()

    def _rollback(self) -> None:
        rw = self.rw
        for m in rw.fresh:
            s = rw.slot_of.pop(m, None)
            if s is not None:
                rw.free.append(s)
        rw.fresh.clear()
        rw.freed.clear()

    # -- the array header ------------------------------------------------------
    def decode_prefix(self, buf: Any, base: int, start: int, end: int) -> None:
        """Run the pickle up to the element list and check it describes the header's array."""
        rw = self.rw
        rw.memo = 0
        rw.fresh.clear()
        out = bytearray()
        self.rewrite_all(buf, start, end, base, out, None)
        out += b"t."
        try:
            state = self._run_program(out, elements=False)  # the outer array's placeholder stays unbuilt
            check_load(self.ctx)
        except Exception as exc:
            raise _load_error(exc, self.path, start, None) from None
        self._commit()
        rw.fresh.clear()
        h = self.header
        ok = type(state) is tuple and len(state) == 5 and state[0] == 1 and state[4] == []
        if ok:
            dtype = state[2]
            try:
                check_dtype(dtype)
            except UnsafePickleError as exc:
                raise UnsafePickleError(exc.message, path=self.path, offset=start) from None
            ok = state[1] == h.shape and dtype == h.dtype and bool(state[3]) == h.fortran_order
        if not ok:
            got = state[:4] if type(state) is tuple else type(state).__name__
            raise FormatError(
                f"the pickled array is {got!r}; the .npy header says shape {h.shape}, dtype {h.dtype}, "
                f"fortran_order {h.fortran_order}",
                path=self.path,
                offset=start,
            )

    # -- elements ------------------------------------------------------------------
    def decode_run(self, buf: Any, base: int, starts: Any, ends: Any, memos: Any, first: int) -> list[Any]:
        """Build the elements ``first .. first+len(starts)-1``: element j is ``[starts[j], ends[j])``.

        Plain ndarray and scalar elements are built directly (see
        :mod:`npystream.formats.pickle_direct`); the others, and all of them
        when there is no liveness table, through the unpickler
        (:meth:`decode_program`).  Raises :class:`_Partial` when an element
        fails (the elements before it are built).
        """
        if not self.direct:
            return self.decode_program(buf, base, starts, ends, memos, first)
        k = len(starts)
        lo = self.live_offsets
        if lo is not None:
            a, b = np.searchsorted(lo, (starts[0], ends[k - 1]))
            hot = lo[a:b]
        else:
            hot = _NO_INTS
        sl = np.ascontiguousarray(starts, dtype=np.int64)
        el = np.ascontiguousarray(ends, dtype=np.int64)
        ml = np.ascontiguousarray(memos, dtype=np.int64)
        view_fn = self._view_fn(buf) if self.zc_views else None
        roles = self.roles
        out: list[Any] = []
        i = 0
        programs = 0
        while i < k:
            try:
                j, m = self.direct_fn(buf, base, sl, el, ml, i, k, roles, self.live_keys, hot, view_fn, out)
            except Exception as exc:  # numpy refusing a state the checks let through
                j = len(out)
                raise _Partial(out, _load_error(exc, self.path, int(starts[j]), first + j)) from None
            if j >= k:
                break
            if m >= 0 and m not in roles and self._classify(m):
                i = j
                continue
            # the unpickler takes element j and the following ones that cannot be direct
            nxt = j + 1
            programs += 1
            if programs > 16 and programs * 8 > j:  # a chunk of mostly other kinds: the rest in one program
                nxt = k
            else:
                while nxt < k and not self._candidate(buf, int(starts[nxt]) - base):
                    nxt += 1
            try:
                got = self.decode_program(buf, base, starts[j:nxt], ends[j:nxt], memos[j:nxt], first + j)
            except _Partial as part:
                raise _Partial(out + part.items, part.error) from None
            out.extend(got)
            self._refresh_roles()
            i = nxt
        return out

    def direct_one(self, buf: Any, base: int, s: int, e: int, memo: int, index: int) -> Any:
        """Random access: element ``index`` (file bytes ``[s, e)``) built directly, or ``_MISS``."""
        lo = self.live_offsets
        hot = _NO_INTS
        if lo is not None:
            offs = self.live_offsets_list
            a = bisect.bisect_left(offs, s)
            if a < len(offs) and offs[a] < e:
                hot = lo[a : bisect.bisect_left(offs, e)]
        one = self._one
        one[0] = s
        one[1] = e
        one[2] = memo
        view_fn = None
        if self.zc_views:
            if self._vf_buf is not buf:
                self._vf_buf = buf
                self._vf = self._view_fn(buf)
            view_fn = self._vf
        out: list[Any] = []
        for _ in range(2):
            try:
                j, m = self.direct_fn(buf, base, *self._one_parts, 0, 1, self.roles, self.live_keys, hot, view_fn, out)
            except Exception as exc:
                raise _load_error(exc, self.path, s, index) from None
            if j == 1:
                return out[0]
            if m < 0 or m in self.roles or not self._classify(m):
                break
        return _MISS

    @staticmethod
    def _candidate(buf: Any, p: int) -> bool:
        op = buf[p]
        while op == 0x95:
            p += 9
            op = buf[p]
        return op in _DIRECT_FIRST

    def memo_values(self, ms: list[int]) -> tuple[Any, ...]:
        """The values of memo entries ``ms`` (each must hold a slot), read through the unpickler."""
        slot_of = self.rw.slot_of
        out = bytearray(b"(")
        for m in ms:
            s = slot_of[m]
            out += _GET_CODES[s] if s < 256 else b"j" + _pack_I(s)
        out += b"t."
        return self._run_program(out, elements=False)

    def _classify(self, m: int) -> bool:
        """Learn the role of memo entry ``m`` (False if it has no slot here)."""
        if m not in self.rw.slot_of:
            return False
        value = self.memo_values([m])[0]
        if type(value) is DtypeProto:
            value = value.dtype
        ctx = self.ctx
        role = _role_of(value, lambda d: _checked_dtype(ctx, d))
        roles = self.roles
        if len(roles) > 4096:
            roles.clear()
            self.role_src.clear()
        roles[m] = role
        if role[0] == ROLE_DTYPE:
            self.role_src[m] = (value, value.str, value.names)
        return True

    def _refresh_roles(self) -> None:
        """After the unpickler ran: forget dtype roles whose memo value a BUILD changed."""
        src = self.role_src
        if src:
            for m, (d, text, names) in list(src.items()):
                if d.str != text or d.names != names:
                    del src[m]
                    self.roles.pop(m, None)

    def _view_fn(self, buf: Any) -> Any:
        """Zero-copy arrays for direct decoding, exactly as ``_build_array`` makes them from a view."""

        aligned = self.ctx.copy_unaligned

        def view(a: int, b: int, shape: tuple[int, ...], d: np.dtype, fortran: bool) -> Any:
            raw = buf[a:b]
            if d.byteorder == _SWAPPED:
                arr = _real_reconstruct(np.ndarray, (0,), b"b")
                arr.__setstate__((1, shape, d, fortran, bytes(raw)))
                return arr
            arr = np.frombuffer(raw, dtype=d, count=(b - a) // d.itemsize)
            if aligned and not arr.flags.aligned:  # like np.load: an aligned array (a copy)
                arr = aligned_copy(raw, d)
            if len(shape) == 1:
                return arr
            return arr.reshape(shape, order="F" if fortran else "C")

        return view

    def decode_program(self, buf: Any, base: int, starts: Any, ends: Any, memos: Any, first: int) -> list[Any]:
        """Build the elements ``first .. first+len(starts)-1`` through the unpickler.

        ``memos[j]`` is the memo counter where element j starts.  Elements
        contiguous in the file (one APPENDS batch) are rewritten as one run;
        a run may span batches.  Raises :class:`_Partial` when an element
        fails (the elements before it are built).
        """
        k = len(starts)
        rw = self.rw
        rw.fresh.clear()
        rw.freed.clear()
        out = bytearray(self.proto_op)
        out += b"("
        s0 = int(starts[0])
        try:
            if k > 1:
                cuts = (np.flatnonzero(ends[:-1] != starts[1:]) + 1).tolist()
            else:
                cuts = []
            a = 0
            for b in [*cuts, k]:
                rw.memo = int(memos[a])
                self.rewrite_all(buf, int(starts[a]), int(ends[b - 1]), base, out, first + a)
                a = b
            out += b"t."
            items = self._run_program(out)
            check_load(self.ctx)
            if type(items) is not tuple or len(items) != k:  # pragma: no cover - scanner guarantees it
                raise FormatError(f"run decoded to {len(items)} objects, expected {k}")
        except Exception as exc:
            self._rollback()
            if k == 1:
                raise _Partial([], _load_error(exc, self.path, s0, first)) from None
            return self._one_by_one(buf, base, starts, ends, memos, first)
        self._commit()
        return self._post(items, starts, first)

    def _one_by_one(self, buf: Any, base: int, starts: Any, ends: Any, memos: Any, first: int) -> list[Any]:
        got: list[Any] = []
        for j in range(len(starts)):
            try:
                got.extend(self.decode_program(buf, base, starts[j : j + 1], ends[j : j + 1], memos[j : j + 1], first + j))
            except _Partial as part:
                raise _Partial(got + part.items, part.error) from None
        return got

    def _post(self, items: tuple[Any, ...], starts: Any, first: int) -> list[Any]:
        ctx = self.ctx
        structured = self.structured
        if not structured:
            kinds = set(map(type, items))
            if kinds.isdisjoint(_SPECIAL_PROTOS if ctx.protos else _SPECIAL):
                return list(items)  # nothing to finalise: plain values (the common case)
            if len(kinds) == 1 and ArrayProto in kinds:  # every element an array (the other common case)
                seen: dict[int, Any] = {}
                out = []
                try:
                    if build_arrays_c is not None:
                        build_arrays_c(
                            items,
                            out,
                            ArrayProto,
                            DONE,
                            lambda d: _checked_dtype(ctx, d),
                            _real_reconstruct,
                            np.ndarray,
                            lambda p: _build_array(p, ctx, seen, 0),
                        )
                        return out
                    for item in items:
                        out.append(_build_array(item, ctx, seen, 0))
                except Exception as exc:
                    j = len(out)
                    raise _Partial(out, _load_error(exc, self.path, int(starts[j]), first + j)) from None
                return out
        seen = {}
        out = []
        for j, item in enumerate(items):
            try:
                item = finalize(item, ctx, seen)
                if structured:
                    item = self._record(item)
            except Exception as exc:
                raise _Partial(out, _load_error(exc, self.path, int(starts[j]), first + j)) from None
            out.append(item)
        return out

    def _record(self, item: Any) -> Any:
        arr = _real_reconstruct(np.ndarray, (0,), b"b")
        arr.__setstate__((1, (1,), self.header.dtype, False, [item]))
        return arr[0]


# ---------------------------------------------------------------------------
# public entry points


def _chunks(index: PickleIndex, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split elements [start, stop) into (a, b, ends[a:b]) runs of ~CHUNK_BYTES of pickle."""
    starts = index.starts
    bf = index.batch_first
    be = index.batch_ends
    i = start
    while i < stop:
        j = int(np.searchsorted(starts, starts[i] + CHUNK_BYTES, side="left"))
        j = min(max(j, i + 1), stop)
        e = np.empty(j - i, dtype=np.int64)
        e[:-1] = starts[i + 1 : j]
        e[-1] = starts[j] if j < index.count else be[-1]
        # the last element of each batch ends at the batch's APPENDS, not at the next start
        b0 = int(np.searchsorted(bf, i, side="right")) - 1
        b1 = int(np.searchsorted(bf, j, side="left"))
        for b in range(b0, b1):
            last = int(bf[b + 1]) - 1
            if i <= last < j:
                e[last - i] = be[b]
        yield i, j, e
        i = j


class _CopyingView:
    """The mapped file as the copying mode's persistent-id resolver: a slice is a fresh ``bytes`` copy.

    Copying mode on a mapped file, for chunks of large elements that are not
    decoded directly (see :mod:`npystream.formats.pickle_direct`): the
    rewriter replaces an array's raw-data BINBYTES by ``(offset, length)``
    exactly as for zero-copy, and the unpickler's ``persistent_load`` slices
    this object, which copies the payload once from the mapping into a new
    ``bytes``; ``_build_array`` hands it to numpy's ``__setstate__``, which
    keeps large aligned payloads without copying them again.  The array is
    what ``np.load`` makes (same flags, same kind of base), with one copy per
    payload instead of two (program bytes, then the ``bytes`` numpy keeps).
    """

    __slots__ = ("view",)

    def __init__(self, view: Any) -> None:
        self.view = view

    def __getitem__(self, key: slice) -> bytes:
        return bytes(self.view[key])


def _fetcher(src: ByteSource, view: Any) -> Any:
    if view is not None:
        return lambda s, e: (view, 0)

    def fetch(s: int, e: int) -> tuple[Any, int]:
        data = src.read_at(s, e - s)
        if len(data) != e - s:
            raise TruncatedError(f"file ends after {len(data)} of {e - s} bytes", path=src.name, offset=s + len(data))
        return data, s

    return fetch


class _IndexedReader:
    """Decode elements of a seekable source through its index (sequential runs or random access)."""

    def __init__(
        self,
        src: ByteSource,
        header: NpyHeader,
        policy: SafetyPolicy,
        index: PickleIndex,
        view: Any,
        *,
        zero_copy: bool | str,
        sequential: bool,
        copy_large: bool = False,
    ) -> None:
        if index.count != header.count and index.count > header.count:
            raise FormatError("index does not match the header", path=src.name)
        self.src = src
        self.header = header
        self.index = index
        self.view = view
        self.sequential = sequential
        self.fetch = _fetcher(src, view)
        live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
        # copying mode, mapped file, safe mode (whose array placeholders the copies go through):
        # chunks of large elements reference payloads by offset and copy them once (_CopyingView)
        self.copy_large = copy_large and not zero_copy and view is not None and not policy.trusted
        self.engine = _Engine(
            src.name,
            header,
            policy,
            live=live,
            view=view,
            zero_copy=zero_copy,
            free_on_read=sequential,
            proto=index.proto,
            copy_view=_CopyingView(view) if self.copy_large else None,
        )
        self.engine.resolver = self._resolve
        self.pinned: dict[int, int] = {}  # random access: memo index -> slot (LRU order)
        self.position = header.data_offset
        buf, base = self.fetch(header.data_offset, index.body_start)
        self.engine.decode_prefix(buf, base, header.data_offset, index.body_start)
        self.prefix_slots = set(self.engine.rw.slot_of)

    def _resolve(self, m: int, index: int | None, offset: int) -> None:
        """Make memo entry ``m`` (defined by an earlier element) available in a slot."""
        idx = self.index
        j = int(np.searchsorted(idx.memo_at[: idx.count], m, side="right")) - 1
        if j < 0 or m < idx.body_memo:
            raise FormatError(
                f"memo entry {m} belongs to the array's header part and is not something an element may read",
                path=self.src.name,
                offset=offset,
                index=index,
            )
        eng = self.engine
        rw = eng.rw
        saved = (rw.memo, rw.fresh, rw.freed, rw.free_on_read)
        rw.fresh, rw.freed = [], []
        rw.free_on_read = False  # reads inside an earlier element are not "last reads" from here
        try:
            s, e = int(idx.starts[j]), idx.end_of(j)
            buf, base = self.fetch(s, e)
            out = bytearray(eng.proto_op)
            out += b"("
            rw.memo = int(idx.memo_at[j])
            eng.rewrite_all(buf, s, e, base, out, j)
            out += b"t."
            try:
                eng._run_program(out)
                check_load(eng.ctx)
            except Exception as exc:
                eng._rollback()
                self._resolve_part(m, j, s, e, buf, base, index, offset, _load_error(exc, self.src.name, s, j))
            eng._commit()
            # keep m; in sequential mode also what later elements still read
            for k in rw.fresh:
                if k == m:
                    continue
                if self.sequential and rw.live is not None and rw.live.get(k, -1) >= offset:
                    continue
                slot = rw.slot_of.pop(k, None)
                if slot is not None:
                    rw.free.append(slot)
            if not self.sequential and m in rw.slot_of:
                self.pinned[m] = rw.slot_of[m]
                while len(self.pinned) > 4096:
                    old = next(iter(self.pinned))
                    slot = self.pinned.pop(old)
                    if rw.slot_of.get(old) == slot:
                        del rw.slot_of[old]
                        rw.free.append(slot)
        finally:
            rw.memo, rw.fresh, rw.freed, rw.free_on_read = saved

    def _resolve_part(
        self, m: int, j: int, s: int, e: int, buf: Any, base: int, index: int | None, offset: int, err: BaseException
    ) -> None:
        """Element ``j`` failed to build: build only its opcodes up to the write of memo ``m``, or blame ``index``.

        The element asked for (``index``) may read back only an early part of
        ``j`` (a module name, a class) that does not need what ``j`` failed on
        (a refused global further on).  That part is kept only if it is a value
        complete when memoized (strings, numbers, globals, tuples of them): a
        container or an object filled later in ``j`` would be read back
        half-built.  Otherwise the error is raised for ``index``, naming what
        it needs through ``j``.
        """
        eng = self.engine
        rw = eng.rw
        memo_at = int(self.index.memo_at[j])
        cut = _memo_write_end(buf, s - base, e - base, memo_at, m)
        if cut is None:
            raise _blame(err, index, offset, j) from None
        pos, marks = cut
        rw.fresh, rw.freed = [], []
        out = bytearray(eng.proto_op)
        out += b"("
        rw.memo = memo_at
        try:
            eng.rewrite_all(buf, s, base + pos, base, out, j)
            out += b"t" * (marks + 1) + b"."
            eng._run_program(out, elements=False)
            check_load(eng.ctx)
            if m not in rw.slot_of or not _complete_value(eng.memo_values([m])[0], 0):
                raise err
        except Exception as exc:
            eng._rollback()
            raise _blame(_load_error(exc, self.src.name, s, j), index, offset, j) from None

    def one(self, i: int) -> Any:
        """Element ``i`` alone (random access: the shortest path through rewrite, load and finalise)."""
        idx = self.index
        s = idx.starts.item(i)
        e = idx.ends.item(i)
        eng = self.engine
        rw = eng.rw
        rw.fresh.clear()
        rw.freed.clear()
        buf, base = self.fetch(s, e)
        if eng.direct:
            got = eng.direct_one(buf, base, s, e, idx.memo_at.item(i), i)
            if got is not _MISS:
                return got
        out = bytearray(eng.proto_op)
        out += b"("
        try:
            try:
                rw.memo = idx.memo_at.item(i)
                eng.rewrite_all(buf, s, e, base, out, i)
                out += b"t."
                items = eng._run_program(out)
                check_load(eng.ctx)
            except Exception as exc:
                eng._rollback()
                raise _load_error(exc, self.src.name, s, i) from None
            eng._commit()
            item = items[0] if type(items) is tuple and len(items) == 1 else None
            if type(item) is ArrayProto:
                try:
                    return _build_array(item, eng.ctx, {}, 0)
                except Exception as exc:
                    raise _load_error(exc, self.src.name, s, i) from None
            try:
                return eng._post(items, idx.starts[i : i + 1], i)[0]
            except _Partial as part:
                raise part.error from None
        finally:
            if not self.sequential and rw.fresh:
                for k in rw.fresh:
                    if k in self.pinned or k in self.prefix_slots:
                        continue
                    slot = rw.slot_of.pop(k, None)
                    if slot is not None:
                        rw.free.append(slot)
                rw.fresh.clear()

    def run(self, a: int, b: int, ends: np.ndarray | None = None) -> list[Any]:
        """Elements a..b-1 (consecutive; they may span APPENDS batches)."""
        idx = self.index
        starts = idx.starts[a:b]
        if ends is None:
            ends = idx.ends[a:b]
        buf, base = self.fetch(int(starts[0]), int(ends[-1]))
        eng = self.engine
        if self.copy_large:  # per chunk: large elements copy their payloads once (see _CopyingView)
            eng.rw.zero_copy = int(ends[-1]) - int(starts[0]) >= LARGE_ELEMENT_BYTES * len(starts)
        try:
            return eng.decode_run(buf, base, starts, ends, idx.memo_at[a:b], a)
        finally:
            if not self.sequential:
                rw = eng.rw
                for k in rw.fresh:
                    if k in self.pinned or k in self.prefix_slots:
                        continue
                    slot = rw.slot_of.pop(k, None)
                    if slot is not None:
                        rw.free.append(slot)
                rw.fresh.clear()


def _memo_write_end(buf: Any, pos: int, stop: int, memo: int, m: int) -> tuple[int, int] | None:
    """Where the opcode writing memo entry ``m`` ends in ``buf[pos:stop]`` and how many MARKs are open there.

    ``memo`` is the memo counter at ``pos`` (memo indices are sequential,
    which the scan enforces).  None if ``m`` is not written in that range.
    """
    import pickletools

    data = io.BytesIO(buf[pos:stop])
    marks = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                k = memo if op.name == "MEMOIZE" else arg
                memo += 1
                if k == m:
                    return pos + data.tell(), marks
            marks += op.stack_after.count(pickletools.markobject) - op.stack_before.count(pickletools.markobject)
    except ValueError:  # the element's end (no STOP in the range)
        return None
    return None


_COMPLETE_TYPES = frozenset({str, bytes, int, float, complex, bool, type(None), *TOKEN_TYPES})


def _complete_value(value: Any, depth: int) -> bool:
    """A value that is whole when memoized: nothing later in its element can change it."""
    t = type(value)
    if t in _COMPLETE_TYPES or isinstance(value, (type, types.BuiltinFunctionType, types.FunctionType)):
        return True
    if (t is tuple or t is frozenset) and depth < 32:
        return all(_complete_value(x, depth + 1) for x in value)
    return False


def _blame(err: BaseException, index: int | None, offset: int, j: int) -> BaseException:
    """``err`` (raised building element ``j``) as the error of element ``index``, which reads back an object of ``j``."""
    if index is None or index == j or not isinstance(err, (UnsafePickleError, FormatError, UnsupportedError)):
        return err
    return type(err)(
        f"{err.message} (element {index} reads back an object that element {j} writes, at byte {err.offset})",
        path=err.path,
        offset=offset,
        index=index,
    )


def _check_range(header: NpyHeader, start: int, stop: int | None) -> tuple[int, int]:
    count = header.count
    if type(start) is not int or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if stop is None:
        stop = count
    elif type(stop) is not int or stop < 0:
        raise ValueError(f"stop must be a non-negative int or None, got {stop!r}")
    return min(start, count), min(stop, count)


def iter_elements(
    src: ByteSource,
    header: NpyHeader,
    policy: SafetyPolicy,
    *,
    index: PickleIndex | None = None,
    zero_copy: bool | str = False,
    start: int = 0,
    stop: int | None = None,
    release_behind: bool = False,
    stream_above: int | None = None,
    _on_close: Any = None,
) -> Iterator[Any]:
    """Elements ``start..stop-1`` of a pickled ``.npy`` in C order, each like ``np.load(...).flat[i]``.

    Arguments are checked now; elements are built lazily.  See the module
    docstring for the memory policy of non-seekable sources; a seekable file
    of more than ``stream_above`` (default ``STREAM_ABOVE``, 16 million)
    elements is read the same way (no offset index, whose 16 bytes per
    element would grow with the file) unless ``index``, ``zero_copy`` or
    ``start`` is given.
    ``zero_copy=True`` returns plain array elements whose payload is aligned
    for their dtype as read-only views of the mapped file (the others as
    aligned copies, like ``np.load``); ``zero_copy="always"`` views them all.
    ``release_behind=True`` (for consumers that are done with each element
    before the next, like a converter copying it) drops the map's pages
    behind the reader every 32 MiB (``ByteSource.release_pages``): views
    stay valid, and the map's teardown at the end stays small (about 60 ms
    for a 2 GB file otherwise).  (``_on_close`` is called when the generator
    finishes or is closed: ``iter_objects`` closes the source it opened that
    way.)
    """
    if not isinstance(policy, SafetyPolicy):
        raise TypeError(f"policy must be a SafetyPolicy, got {type(policy).__name__}")
    if not header.pickled:
        raise ValueError(f"dtype {header.dtype} is not pickled; read it with iter_batches or open()")
    start, stop = _check_range(header, start, stop)
    if not src.seekable:
        if index is not None or start:
            raise NotSeekableError(
                "this source can only be streamed from its first element (no index, no start offset); "
                "save it to a seekable file for random access",
                path=src.name,
            )
        if zero_copy:
            raise NotSeekableError("zero-copy views need a memory-mappable file", path=src.name)
    elif index is None and not zero_copy and not start and header.count > (
        STREAM_ABOVE if stream_above is None else stream_above
    ):
        src.seek(header.data_offset)  # the offset index would cost 16 bytes per element
    else:
        view = _map_or_none(src)
        if zero_copy and view is None:
            raise NotSeekableError("zero-copy views need a memory-mappable file", path=src.name)
        chunks = _iter_indexed(src, header, policy, index, view, zero_copy, start, stop, release_behind)
        return _flatten(chunks, _on_close)
    # read front to back, like a pipe
    from npystream.formats.pickle_stream import _iter_stream

    return _flatten(_iter_stream(src, header, policy, stop), _on_close)

def _flatten(chunks: Iterator[list[Any]], on_close: Any) -> Iterator[Any]:
    """Elements of the decoded chunks, iterated at C speed (itertools.chain), closing the source at the end."""
    if on_close is not None:
        inner = chunks

        def closing() -> Iterator[list[Any]]:
            try:
                yield from inner
            finally:
                on_close()

        chunks = closing()
    return itertools.chain.from_iterable(chunks)


def _iter_indexed(
    src: ByteSource,
    header: NpyHeader,
    policy: SafetyPolicy,
    index: PickleIndex | None,
    view: Any,
    zero_copy: bool | str,
    start: int,
    stop: int,
    release_behind: bool = False,
) -> Iterator[list[Any]]:
    error: Exception | None = None
    tentative = -1
    if index is None:
        index, error, view2, tentative = _build_index(src, header, policy)
        view = view if view is not None else view2
        if error is not None and index.body_start < 0:
            raise error
    stop = min(stop, index.count)
    certain = stop if tentative < 0 else min(stop, tentative)
    reader = _IndexedReader(src, header, policy, index, view, zero_copy=zero_copy, sequential=True, copy_large=True)
    released = int(index.starts[start]) if release_behind and start < certain else -1
    for a, b, ends in _chunks(index, start, certain):
        try:
            items = reader.run(a, b, ends)
        except _Partial as part:
            yield part.items
            raise part.error from None
        yield items
        del items
        if released >= 0 and int(ends[-1]) - released >= RELEASE_STEP:  # the consumer is done with them
            src.release_pages(released, int(ends[-1]))
            released = int(ends[-1])
    for i in range(max(certain, start), stop):  # elements of the batch open at the damage
        try:
            item = reader.run(i, i + 1)[0]
        except _Partial:
            break
        if _looks_partial(item):
            break
        yield [item]
    if error is not None:
        raise error


def _looks_partial(item: Any) -> bool:
    """A tentative element that may be the first stack slot of an unfinished one.

    Bare callables (a REDUCE not yet applied) and mutable containers (which a
    later SETITEM/APPENDS/BUILD may still fill) are not handed out from the
    batch open at the damage: better to stop early than to yield a wrong value.
    """
    return isinstance(
        item, (type, types.BuiltinFunctionType, types.FunctionType, np.ufunc, dict, list, set, bytearray, *TOKEN_TYPES)
    )


class ElementDecoder:
    """Random access to the elements of a seekable object ``.npy`` through its :class:`PickleIndex`.

    Memo back-references to earlier elements are resolved by decoding the
    defining element once and keeping the referenced object (up to 4096 such
    entries, least recently resolved dropped first).  Not thread-safe.
    """

    def __init__(
        self,
        src: ByteSource,
        header: NpyHeader,
        policy: SafetyPolicy,
        index: PickleIndex,
        *,
        zero_copy: bool | str = False,
    ) -> None:
        if not isinstance(policy, SafetyPolicy):
            raise TypeError(f"policy must be a SafetyPolicy, got {type(policy).__name__}")
        if not src.seekable:
            raise NotSeekableError("random access needs a seekable file; this source can only be streamed", path=src.name)
        view = _map_or_none(src)
        if zero_copy and view is None:
            raise NotSeekableError("zero-copy views need a memory-mappable file", path=src.name)
        self.count = index.count
        self._reader = _IndexedReader(src, header, policy, index, view, zero_copy=zero_copy, sequential=False)

    def _check(self, i: Any) -> int:
        if type(i) is not int:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"element index must be an int, got {type(i).__name__}")
            i = int(i)
        if not 0 <= i < self.count:
            raise IndexError(f"element {i} out of range for {self.count} elements")
        return i

    def decode(self, i: int) -> Any:
        """Element ``i`` (flat C-order index)."""
        return self._reader.one(self._check(i))

    def decode_many(self, indices: Sequence[int] | range) -> list[Any]:
        """Elements at ``indices`` in the given order (contiguous runs are decoded together)."""
        if isinstance(indices, range) and indices.step == 1:
            wanted = list(indices)
            order = wanted
        else:
            wanted = [self._check(i) for i in indices]
            order = sorted(set(wanted))
        for i in order[:1] + order[-1:]:
            self._check(i)
        got: dict[int, Any] = {}
        reader = self._reader
        index = reader.index
        # A run's bytes are fetched (copied) unless the file is mapped; zero-copy views of a
        # map cost nothing per byte, so their runs are bounded only by VIEW_RUN_BYTES.
        limit = VIEW_RUN_BYTES if reader.engine.zc_views else CHUNK_BYTES
        k = 0
        while k < len(order):
            a = order[k]
            j = k + 1
            while (
                j < len(order)
                and order[j] == order[j - 1] + 1
                and int(index.starts[order[j]]) - int(index.starts[a]) < limit
            ):
                j += 1
            try:
                items = self._reader.run(a, order[j - 1] + 1)
            except _Partial as part:
                raise part.error from None
            for off, item in enumerate(items):
                got[a + off] = item
            k = j
        return [got[i] for i in wanted]

    def close(self) -> None:
        """Drop the unpickler and its memo (views already handed out stay valid)."""
        self._reader = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------
# one standalone pickle (a ragged store's "object" element) through the same walker

_ONE_PREFIX = (  # numpy's envelope for a one-element object array, without memo writes (memo starts at 0)
    b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01K\x01\x85"
    b"cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
    b"\x89](("
)
_ONE_SUFFIX = b"etb."
_ONE_HEADS: dict[int, bytes] = {}  # PROTO + prefix, per protocol
_ONE_CHECK: tuple[Any, ...] = (None, None, {})  # the last policy, its GLOBAL checker, scan states after the envelope
_SCAN_SLOTS = ScanState.__slots__


def load_pickle(data: Any, policy: SafetyPolicy, *, name: str = "<pickle>") -> Any:
    """The one object of a standalone pickle, checked by the same scanner, limits and safe unpickler as ``.npy`` elements.

    The pickle (``PROTO p ... STOP``, as ``pickle.dumps`` or cloudpickle write
    it) is first scanned as the insides of a tuple that is element 0 of
    numpy's envelope for a one-element object array (``MARK MARK <pickle>
    TUPLE APPENDS``), its STOP replaced by that TUPLE (same length, so its
    FRAMEs still end on opcode boundaries; the tuple keeps the pickle's own
    pushes off the element level, where a deeply nested list would count as
    many elements).  The scanner enforces what it enforces for ``.npy``
    files: lengths checked against the bytes present, sequential memo
    indices (the envelope writes none), nesting and stack limits, the
    allow-list, nothing after STOP.  Only then is ``data`` itself unpickled by
    :class:`SafeUnpickler` and finalised, and it must leave one object.
    Errors carry offsets into ``data``.
    """
    view = memoryview(data).cast("B")
    if len(view) < 2 or view[-1] != 0x2E:  # STOP
        raise FormatError(
            f"a pickle ends with STOP ('.'), this one ends with {bytes(view[-8:])!r} "
            "(cut short, or bytes after its STOP)",
            path=name,
            offset=len(view),
        )
    if view[0] == 0x80:
        proto, skip = view[1], 2
    else:
        proto, skip = 2, 0
    head = _ONE_HEADS.get(proto)
    if head is None:
        head = _ONE_HEADS[proto] = b"\x80" + bytes([max(proto, 2)]) + _ONE_PREFIX
    base = len(head) - skip  # offset in the envelope of data[0]
    wrapped = b"".join((head, view[skip:-1], b"t", _ONE_SUFFIX))
    global _ONE_CHECK
    cached = _ONE_CHECK  # one read: another thread may replace it meanwhile
    if cached[0] is not policy:
        cached = _ONE_CHECK = (policy, make_global_check(policy), {})
    done_head = cached[2].get(proto)  # the state after the envelope: scanned once per policy and protocol
    if done_head is None:
        done_head = ScanState(1, cached[1])
        _scan(head, 0, len(head), 0, done_head)
        cached[2][proto] = done_head
    st = ScanState.__new__(ScanState)
    for slot in _SCAN_SLOTS:
        value = getattr(done_head, slot)
        setattr(st, slot, value.copy() if isinstance(value, (list, dict, bytearray)) else value)
    st.data_end = len(wrapped)
    pos = len(head)
    try:
        while True:
            pos = _scan(wrapped, pos, len(wrapped), 0, st)
            if st.status == ST_BATCH:
                st.starts.clear()
                st.memo_at.clear()
            elif st.status == ST_DONE:
                break
            else:
                raise TruncatedError("the pickle is cut short (an opcode or its payload)", path=name,
                                     offset=len(view))
        if st.done != 1 or pos != len(wrapped):  # pragma: no cover - the envelope makes both certain
            raise FormatError("the pickle is not one object followed by STOP", path=name, offset=len(view))
    except ScanError as err:
        exc = _scan_exc(err, name)
        raise type(exc)(exc.message, path=name, offset=min(max(err.offset - base, 0), len(view))) from None
    # unpickled as scanned, inside the tuple: the pickle must leave exactly one object
    inner = b"".join((head[:2], memoryview(wrapped)[len(head) - 1 : -len(_ONE_SUFFIX)], b"."))
    try:
        obj = load_one(inner, policy)  # unpickled, checked and finalised like an element (trusted reruns too)
        if type(obj) is not tuple or len(obj) != 1:
            raise FormatError(
                f"the pickle leaves {len(obj) if type(obj) is tuple else '?'} objects on its stack at STOP, expected 1",
                path=name,
            )
        return obj[0]
    except NpyStreamError:
        raise
    except Exception as exc:
        raise FormatError(f"the unpickler rejected this pickle ({type(exc).__name__}: {exc})", path=name) from exc
