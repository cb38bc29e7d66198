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
3. **Build**: ONE persistent C ``pickle.Unpickler`` (subclassed for the
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
No liveness pre-pass is possible, so the memory policy is:

* the reader buffers one *batch* of raw pickle bytes at a time (numpy writes
  1000 elements per APPENDS batch: memory is ~1000 elements' raw bytes plus
  one decoded chunk);
* every memo write of the current batch is kept in a slot while the batch is
  decoded; at the end of each batch the reader keeps only what later batches
  may plausibly read back: classes/functions (globals), numpy dtypes, the
  header's entries, and other values of at most 256 KiB each while the kept
  total stays under 16 MiB and 65,536 entries (``RETAIN_*`` below); the rest
  is released;
* an element that reads back a released object from an earlier batch (e.g.
  the same 2 MB array stored twice, 1000+ elements apart) raises
  :class:`~npystream.errors.UnsupportedError` naming the element, with the
  fix: read the file from a seekable source, where the liveness pass makes
  every back-reference exact.  Elements before it have been yielded.

Coordinates: offsets are byte offsets in the source; ``header.data_offset``
is the first pickle byte.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import pickle
import struct
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream.errors import (
    FormatError,
    NotSeekableError,
    TruncatedError,
    UnsafePickleError,
    UnsupportedError,
)
from npystream.formats.npy import NpyHeader
from npystream.formats.pickle_safety import (
    DONE,
    TOKEN_TYPES,
    ArrayProto,
    PickleDecodeError,
    SafetyPolicy,
    SafeUnpickler,
    _build_array,
    _checked_dtype,
    _real_reconstruct,
    build_arrays_c,
    check_dtype,
    check_load,
    finalize,
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
# limits (each with its reason)

MAX_MARK_DEPTH = 1000  # nesting of MARK-based containers; numpy output needs < 20
MAX_STACK = 1 << 20  # items on one MARK level; a batch is 1000, so only a bomb gets here
MAX_NESTING = 1000  # object nesting depth (containers in containers); Python recursion copes up to here
MEMO_DEPTH_NOTE = 32  # memo entries deeper than this remember their depth (for GET-built nesting)
MAX_LINE = 1 << 16  # text opcodes (protocol 0-2 GLOBAL/INT/PUT...) are short lines
CHUNK_BYTES = 1 << 20  # bytes of pickle per unpickler load (bounds the decoded chunk)
LARGE_ELEMENT_BYTES = 64 << 10  # copying mode: chunks averaging this much per element copy payloads once (see _CopyingView)
STREAM_READ = 1 << 20  # read size for non-mappable sources
RETAIN_MAX = 65536  # streaming: memo values kept across batches, at most
RETAIN_BYTES = 16 << 20  # streaming: ... and at most this many bytes of them
RETAIN_ONE = 256 << 10  # streaming: a single value larger than this is never kept
INDEX_VERSION = 2

# ---------------------------------------------------------------------------
# opcodes as data: argument layout and stack effect per opcode byte

# argument layout codes
A_NONE, A_LINE, A_LINE2 = 0, 100, 200  # fixed sizes 1, 2, 4, 8 are their own codes
A_LEN1, A_LEN4, A_SLEN4, A_LEN8 = -1, -4, -5, -8  # length-prefixed payloads

# stack effect kinds
(
    K_PUSH,
    K_P1,
    K_P2,
    K_P3,
    K_POP1,
    K_POP2,
    K_POP,
    K_MARK,
    K_TOMARK1,
    K_TOMARK0,
    K_PUT,
    K_GET,
    K_DUP,
    K_FRAME,
    K_PROTO,
    K_STOP,
    K_REFUSE,
    K_BAD,
) = range(18)

_OPS: dict[int, tuple[str, int, int]] = {}


def _op(code: bytes, name: str, arg: int, kind: int) -> None:
    _OPS[code[0]] = (name, arg, kind)


_op(b"(", "MARK", A_NONE, K_MARK)
_op(b".", "STOP", A_NONE, K_STOP)
_op(b"0", "POP", A_NONE, K_POP)
_op(b"1", "POP_MARK", A_NONE, K_TOMARK0)
_op(b"2", "DUP", A_NONE, K_DUP)
_op(b"F", "FLOAT", A_LINE, K_PUSH)
_op(b"I", "INT", A_LINE, K_PUSH)
_op(b"J", "BININT", 4, K_PUSH)
_op(b"K", "BININT1", 1, K_PUSH)
_op(b"L", "LONG", A_LINE, K_PUSH)
_op(b"M", "BININT2", 2, K_PUSH)
_op(b"N", "NONE", A_NONE, K_PUSH)
_op(b"P", "PERSID", A_LINE, K_REFUSE)
_op(b"Q", "BINPERSID", A_NONE, K_REFUSE)
_op(b"R", "REDUCE", A_NONE, K_P2)
_op(b"S", "STRING", A_LINE, K_PUSH)
_op(b"T", "BINSTRING", A_SLEN4, K_PUSH)
_op(b"U", "SHORT_BINSTRING", A_LEN1, K_PUSH)
_op(b"V", "UNICODE", A_LINE, K_PUSH)
_op(b"X", "BINUNICODE", A_LEN4, K_PUSH)
_op(b"a", "APPEND", A_NONE, K_POP1)
_op(b"b", "BUILD", A_NONE, K_POP1)
_op(b"c", "GLOBAL", A_LINE2, K_PUSH)
_op(b"d", "DICT", A_NONE, K_TOMARK1)
_op(b"}", "EMPTY_DICT", A_NONE, K_PUSH)
_op(b"e", "APPENDS", A_NONE, K_TOMARK0)
_op(b"g", "GET", A_LINE, K_GET)
_op(b"h", "BINGET", 1, K_GET)
_op(b"i", "INST", A_LINE2, K_TOMARK1)
_op(b"j", "LONG_BINGET", 4, K_GET)
_op(b"l", "LIST", A_NONE, K_TOMARK1)
_op(b"]", "EMPTY_LIST", A_NONE, K_PUSH)
_op(b"o", "OBJ", A_NONE, K_TOMARK1)
_op(b"p", "PUT", A_LINE, K_PUT)
_op(b"q", "BINPUT", 1, K_PUT)
_op(b"r", "LONG_BINPUT", 4, K_PUT)
_op(b"s", "SETITEM", A_NONE, K_POP2)
_op(b"t", "TUPLE", A_NONE, K_TOMARK1)
_op(b")", "EMPTY_TUPLE", A_NONE, K_PUSH)
_op(b"u", "SETITEMS", A_NONE, K_TOMARK0)
_op(b"G", "BINFLOAT", 8, K_PUSH)
_op(b"\x80", "PROTO", 1, K_PROTO)
_op(b"\x81", "NEWOBJ", A_NONE, K_P2)
_op(b"\x82", "EXT1", 1, K_REFUSE)
_op(b"\x83", "EXT2", 2, K_REFUSE)
_op(b"\x84", "EXT4", 4, K_REFUSE)
_op(b"\x85", "TUPLE1", A_NONE, K_P1)
_op(b"\x86", "TUPLE2", A_NONE, K_P2)
_op(b"\x87", "TUPLE3", A_NONE, K_P3)
_op(b"\x88", "NEWTRUE", A_NONE, K_PUSH)
_op(b"\x89", "NEWFALSE", A_NONE, K_PUSH)
_op(b"\x8a", "LONG1", A_LEN1, K_PUSH)
_op(b"\x8b", "LONG4", A_SLEN4, K_PUSH)
_op(b"B", "BINBYTES", A_LEN4, K_PUSH)
_op(b"C", "SHORT_BINBYTES", A_LEN1, K_PUSH)
_op(b"\x8c", "SHORT_BINUNICODE", A_LEN1, K_PUSH)
_op(b"\x8d", "BINUNICODE8", A_LEN8, K_PUSH)
_op(b"\x8e", "BINBYTES8", A_LEN8, K_PUSH)
_op(b"\x8f", "EMPTY_SET", A_NONE, K_PUSH)
_op(b"\x90", "ADDITEMS", A_NONE, K_TOMARK0)
_op(b"\x91", "FROZENSET", A_NONE, K_TOMARK1)
_op(b"\x92", "NEWOBJ_EX", A_NONE, K_P3)
_op(b"\x93", "STACK_GLOBAL", A_NONE, K_P2)
_op(b"\x94", "MEMOIZE", A_NONE, K_PUT)
_op(b"\x95", "FRAME", 8, K_FRAME)
_op(b"\x96", "BYTEARRAY8", A_LEN8, K_PUSH)
_op(b"\x97", "NEXT_BUFFER", A_NONE, K_REFUSE)
_op(b"\x98", "READONLY_BUFFER", A_NONE, K_P1)

OP_NAME = ["?"] * 256
OP_ARG = [A_NONE] * 256
OP_KIND = [K_BAD] * 256
for _code, (_name, _arg, _kind) in _OPS.items():
    OP_NAME[_code] = _name
    OP_ARG[_code] = _arg
    OP_KIND[_code] = _kind
OP_ARG_T = tuple(OP_ARG)
OP_KIND_T = tuple(OP_KIND)
_POPS = {K_P1: 1, K_P2: 2, K_P3: 3, K_POP1: 1, K_POP2: 2}

_u1 = struct.Struct("<B").unpack_from
_u2 = struct.Struct("<H").unpack_from
_u4 = struct.Struct("<I").unpack_from
_s4 = struct.Struct("<i").unpack_from
_u8 = struct.Struct("<Q").unpack_from
_pack_q = struct.Struct("<q").pack
_LEN_READ = {A_LEN1: (1, _u1), A_LEN4: (4, _u4), A_SLEN4: (4, _s4), A_LEN8: (8, _u8)}
_FIX_READ = {1: _u1, 2: _u2, 4: _u4}

OP_MEMOIZE = 0x94
OP_BINPUT = 0x71
OP_LONG_BINPUT = 0x72
OP_BINGET = 0x68
OP_LONG_BINGET = 0x6A
OP_TUPLE = 0x74
OP_BUILD = 0x62
OP_APPEND = 0x61
OP_APPENDS = 0x65
OP_EMPTY_LIST = 0x5D
OP_MARK = 0x28
OP_FRAME = 0x95
_BYTES_OPS = frozenset((0x42, 0x43, 0x8E))  # BINBYTES, SHORT_BINBYTES, BINBYTES8

# scan phases and statuses
PH_PREFIX, PH_BODY, PH_SUFFIX, PH_DONE = 0, 1, 2, 3
ST_MORE, ST_BATCH, ST_DONE = 0, 1, 2
RW_OK, RW_MISSING = 0, 1

_INF = 1 << 62


class ScanError(Exception):
    """Raised by :func:`scan_ops`: ``kind`` in {'format', 'truncated', 'unsafe'}, file offset, element index."""

    def __init__(self, kind: str, message: str, offset: int, index: int | None) -> None:
        super().__init__(kind, message, offset, index)
        self.kind = kind
        self.message = message
        self.offset = offset
        self.index = index


class ScanState:
    """The scanner's state between calls (plain attributes, so the C twin reads and writes them)."""

    __slots__ = (
        "phase",
        "depth",
        "n",
        "marks",
        "memo",
        "memo_base",
        "memo_seen",
        "starts",
        "memo_at",
        "reads",
        "frame_end",
        "data_end",
        "in_batch",
        "done",
        "count",
        "proto",
        "body_start",
        "body_memo",
        "batch_end",
        "status",
        "global_check",
        "dep",
        "memo_depth",
    )

    def __init__(self, count: int, global_check: Any = None) -> None:
        self.phase = PH_PREFIX
        self.depth = 0  # open MARKs
        self.n = 0  # items above the innermost MARK (or above the stack bottom)
        self.marks: list[int] = []  # per open MARK, flat: saved n, mark offset, memo counter
        self.memo = 0  # next memo index
        self.memo_base = 0  # first memo index (1 for Python 2's cPickle)
        self.memo_seen = False
        self.starts = bytearray()  # element-level slot start offsets of the open batch (int64 LE each)
        self.memo_at = bytearray()  # memo counter at each slot start (int64 LE each)
        self.reads: dict[int, int] = {}  # memo index -> offset of its last GET
        self.frame_end = _INF  # file offset where the current FRAME ends
        self.data_end = -1  # file offset of the end of data when known (mapped files), else -1
        self.in_batch = False
        self.done = 0  # elements in closed batches
        self.count = count  # elements the header promises
        self.proto = 0
        self.body_start = -1  # offset just after the element list's EMPTY_LIST
        self.body_memo = -1  # memo counter there
        self.batch_end = -1  # offset of the APPENDS/APPEND closing the last batch
        self.status = ST_MORE
        self.global_check = global_check  # callable(raw GLOBAL/INST argument bytes) -> error text or None
        self.dep: list[int] = []  # nesting depth of every stack item (all levels, bottom first)
        self.memo_depth: dict[int, int] = {}  # memo index -> depth, for entries deeper than MEMO_DEPTH_NOTE


def scan_ops(buf: Any, pos: int, end: int, base: int, st: ScanState) -> int:
    """Walk whole opcodes of ``buf[pos:end]`` (file offset of ``buf[0]`` is ``base``); return the new pos.

    Contract (mirrored exactly by ``npystream._speedups.scan_ops``):

    * Only opcode bytes and length fields are read; payloads are skipped.
    * Stops with ``st.status``: ``ST_MORE`` when the next opcode does not lie
      wholly in ``buf[:end]`` (the returned pos is that opcode's start; the
      caller supplies more bytes or reports truncation); ``ST_BATCH`` just
      after the APPENDS (or single APPEND) that closes a batch of elements
      (``st.starts``/``st.memo_at``, bytearrays of little-endian int64, then
      hold the batch's element start offsets and memo counters, ``st.batch_end`` the closing opcode's
      offset, ``st.done`` counts it; the caller consumes and clears both
      lists before calling again); ``ST_DONE`` after STOP (pos just past it).
    * Tracks stack *counts* (``st.n``, ``st.depth``, ``st.marks``), the memo
      counter ``st.memo``, ``st.reads`` (memo index -> offset of its last
      GET), ``st.frame_end``, ``st.phase`` (prefix, list body, suffix),
      ``st.body_start``/``st.body_memo`` (just after the list's EMPTY_LIST),
      ``st.proto``.  State is written back on every exit, errors included.
    * Raises :class:`ScanError` (kind 'format', 'truncated' or 'unsafe') for
      any violation, with the file offset of the offending opcode and the
      element index it belongs to (None outside the element list).
    """
    phase = st.phase
    depth = st.depth
    n = st.n
    marks = st.marks
    memo = st.memo
    starts = st.starts
    memo_at = st.memo_at
    reads = st.reads
    dep = st.dep
    in_batch = st.in_batch
    done = st.done
    fe = st.frame_end - base if st.frame_end < _INF else _INF
    if phase == PH_BODY:
        td, tbase = (2, 0) if in_batch else (1, 5)
    else:
        td, tbase = -1, 0
    arg_t = OP_ARG_T
    kind_t = OP_KIND_T
    u4 = _u4
    pack_q = _pack_q
    status = ST_MORE

    def fail(kind: str, msg: str, at: int, push: bool = False, batch: bool = False) -> ScanError:
        index = None
        if batch:  # the open batch as a whole is in doubt
            index = done
        elif phase == PH_BODY:
            k = len(starts) >> 3
            cur = k if (depth == td and push) else max(k - 1, 0)
            index = done + cur
        return ScanError(kind, msg, base + at, index)

    try:
        while True:
            lim = end if fe > end else fe
            if pos >= lim:
                if pos == fe:
                    fe = _INF
                    continue
                break
            op = buf[pos]
            if (op == 0x8C or op == 0x43) and in_batch and depth == 2:
                # fast path (pure Python only matters here): a run of elements that are each one
                # short literal + MEMOIZE (a list of strings); same effects as the generic code
                q = pos
                room = min(st.count + 8 - done - (len(starts) >> 3), MAX_STACK - 1 - n)
                offs = []
                while q + 1 < lim and room > 0:
                    nq = q + 2 + buf[q + 1]
                    if nq >= lim or buf[nq] != OP_MEMOIZE:
                        break
                    offs.append(base + q)
                    room -= 1
                    q = nq + 1
                    if q >= lim:
                        break
                    op = buf[q]
                    if op != 0x8C and op != 0x43:
                        break
                if offs:
                    k = len(offs)
                    starts += struct.pack(f"<{k}q", *offs)
                    memo_at += struct.pack(f"<{k}q", *range(memo, memo + k))
                    n += k
                    dep.extend([0] * k)
                    memo += k
                    st.memo_seen = True
                    pos = q
                    continue
                op = buf[pos]
            a = arg_t[op]
            kind = kind_t[op]
            # ---- where the opcode ends ---------------------------------------
            if a == 0:
                npos = pos + 1
            elif 0 < a < 100:
                npos = pos + 1 + a
            elif a < 0:
                la = 1 if a == -1 else (8 if a == -8 else 4)
                if pos + 1 + la > lim:
                    if fe <= end:
                        raise fail("format", f"{OP_NAME[op]} opcode straddles the end of its FRAME", pos)
                    break
                if a == -1:
                    length = buf[pos + 1]
                elif a == -4:
                    length = u4(buf, pos + 1)[0]
                elif a == -5:
                    length = _s4(buf, pos + 1)[0]
                    if length < 0:
                        raise fail("format", f"{OP_NAME[op]} has a negative length {length}", pos, True)
                else:
                    length = _u8(buf, pos + 1)[0]
                npos = pos + 1 + la + length
            else:
                npos = _line_end(buf, pos + 1, lim, 2 if a == A_LINE2 else 1)
                if npos < 0:
                    if npos == -2:
                        raise fail("format", f"{OP_NAME[op]} text argument longer than {MAX_LINE} bytes", pos)
                    if fe <= end:
                        raise fail("format", f"{OP_NAME[op]} opcode straddles the end of its FRAME", pos)
                    break
            if npos > lim:
                if fe <= end:
                    raise fail("format", f"{OP_NAME[op]} opcode straddles the end of its FRAME", pos)
                if st.data_end >= 0 and npos + base > st.data_end:
                    raise fail(
                        "truncated",
                        f"{OP_NAME[op]} needs {npos - pos} bytes, only {st.data_end - base - pos} remain",
                        pos,
                        True,
                    )
                break
            # ---- stack effect --------------------------------------------------
            if kind == K_PUT:
                if n == 0:
                    raise fail("format", f"{OP_NAME[op]} with an empty stack", pos)
                if op != OP_MEMOIZE:
                    if op == OP_BINPUT:
                        idx = buf[pos + 1]
                    elif op == OP_LONG_BINPUT:
                        idx = u4(buf, pos + 1)[0]
                    else:
                        idx = _text_int(buf, pos + 1, npos - 1)
                    if idx != memo:
                        if not st.memo_seen and memo == 0 and idx == 1:
                            memo = 1  # Python 2's cPickle numbers its memo from 1
                            st.memo_base = 1
                        else:
                            raise fail(
                                "format",
                                f"memo index {idx} written where {memo} was expected (memo indices must be "
                                "sequential: a forged index makes unpicklers allocate without bound)",
                                pos,
                            )
                st.memo_seen = True
                if dep[-1] > MEMO_DEPTH_NOTE:
                    st.memo_depth[memo] = dep[-1]
                memo += 1
            elif kind == K_PUSH or kind == K_GET or kind == K_DUP:
                if phase == PH_SUFFIX:
                    raise fail("format", f"{OP_NAME[op]} after the element list; numpy writes TUPLE BUILD STOP", pos)
                if kind == K_GET:
                    if op == OP_BINGET:
                        idx = buf[pos + 1]
                    elif op == OP_LONG_BINGET:
                        idx = u4(buf, pos + 1)[0]
                    else:
                        idx = _text_int(buf, pos + 1, npos - 1)
                    if idx is None or idx >= memo or idx < st.memo_base:
                        raise fail("format", f"memo entry {idx} is read before it was written", pos, True)
                    reads[idx] = base + pos
                    d = st.memo_depth.get(idx, 0) if st.memo_depth else 0
                elif kind == K_DUP:
                    if n == 0:
                        raise fail("format", "DUP with an empty stack", pos, True)
                    d = dep[-1]
                else:
                    d = 0
                if op == OP_EMPTY_LIST and phase == PH_PREFIX and depth == 1 and n == 4:
                    phase = PH_BODY
                    td, tbase = 1, 5
                    n = 5
                    dep.append(0)
                    st.body_start = base + npos
                    st.body_memo = memo
                    pos = npos
                    continue
                elif op == 0x63 and st.global_check is not None:  # GLOBAL: check names at this offset
                    msg = st.global_check(bytes(buf[pos + 1 : npos]))
                    if msg:
                        raise fail("unsafe", msg, pos, True)
                if n >= MAX_STACK:
                    raise fail("format", f"more than {MAX_STACK} items on one stack level", pos, True)
                if depth == td:
                    if done + (len(starts) >> 3) > st.count + 8:
                        raise fail("format", f"the pickle holds more elements than the header's {st.count}", pos, batch=True)
                    starts += pack_q(base + pos)
                    memo_at += pack_q(memo)
                n += 1
                dep.append(d)
            elif kind <= K_POP2:  # K_P1, K_P2, K_P3, K_POP1, K_POP2
                pops = _POPS[kind]
                pushes = 1 if kind <= K_P3 else 0
                need = pops + 1 - pushes  # APPEND/BUILD/SETITEM also need their container (on this MARK level)
                if n < need:
                    raise fail("format", f"{OP_NAME[op]} needs {need} stack items, {n} available", pos)
                if depth == td:
                    if op == OP_APPEND and not in_batch and n == 6:
                        # a batch of one element: "e APPEND"
                        n = 5
                        d = dep.pop() + 1
                        if d > dep[-1]:
                            dep[-1] = d
                        st.batch_end = base + pos
                        done += len(starts) >> 3
                        if done > st.count:
                            raise fail("format", f"the pickle holds more elements than the header's {st.count}", pos)
                        status = ST_BATCH
                        pos = npos
                        break
                    avail = n - tbase
                    if avail < pops + 1 - pushes:
                        raise fail("format", f"{OP_NAME[op]} reaches into the element list", pos)
                    k = len(starts)
                    if pushes:
                        if pops > 1:
                            del starts[k - 8 * (pops - 1) :]
                            del memo_at[k - 8 * (pops - 1) :]
                    else:
                        del starts[k - 8 * pops :]
                        del memo_at[k - 8 * pops :]
                elif phase == PH_SUFFIX:
                    if op != OP_BUILD or n != 2 or depth != 0:
                        raise fail("format", f"{OP_NAME[op]} after the element list; numpy writes TUPLE BUILD STOP", pos)
                n = n - pops + pushes
                d = max(dep[-pops:]) + 1
                del dep[-pops:]
                if pushes:
                    dep.append(d)
                elif d > dep[-1]:
                    dep[-1] = d
                if d > MAX_NESTING:
                    raise fail("format", f"objects nested more than {MAX_NESTING} deep", pos)
            elif kind == K_MARK:
                if phase == PH_SUFFIX:
                    raise fail("format", "MARK after the element list; numpy writes TUPLE BUILD STOP", pos)
                if depth >= MAX_MARK_DEPTH:
                    raise fail("format", f"MARKs nested deeper than {MAX_MARK_DEPTH}", pos, True)
                if depth == 1 and n == 5 and phase == PH_BODY:
                    in_batch = True  # the MARK of an APPENDS batch
                    td, tbase = 2, 0
                marks.append(n)
                marks.append(base + pos)
                marks.append(memo)
                depth += 1
                n = 0
            elif kind == K_TOMARK1 or kind == K_TOMARK0:
                if depth == 0:
                    raise fail("format", f"{OP_NAME[op]} without an open MARK", pos)
                if op == 0x69 and st.global_check is not None:  # INST
                    msg = st.global_check(bytes(buf[pos + 1 : npos]))
                    if msg:
                        raise fail("unsafe", msg, pos)
                inner = n
                if inner:
                    d = max(dep[-inner:]) + 1
                    del dep[-inner:]
                else:
                    d = 1
                if d > MAX_NESTING:
                    raise fail("format", f"objects nested more than {MAX_NESTING} deep", pos)
                mark_memo = marks.pop()
                mark_off = marks.pop()
                n = marks.pop()
                depth -= 1
                if phase == PH_BODY and (depth == 0 or (depth == 1 and in_batch)):
                    if depth == 1:  # closing an APPENDS batch
                        if op != OP_APPENDS:
                            raise fail("format", f"{OP_NAME[op]} closes the element batch; numpy writes APPENDS", pos)
                        in_batch = False
                        td, tbase = 1, 5
                        if d > dep[-1]:
                            dep[-1] = d
                        st.batch_end = base + pos
                        done += len(starts) >> 3
                        if done > st.count:
                            raise fail("format", f"the pickle holds more elements than the header's {st.count}", pos)
                        status = ST_BATCH
                        pos = npos
                        break
                    # depth 0: the TUPLE closing the array state ends the element list
                    if op != OP_TUPLE or inner != 5 or n != 1:
                        raise fail(
                            "format",
                            f"{OP_NAME[op]} with {inner} items ends the array state; numpy writes TUPLE "
                            "after (1, shape, dtype, is_fortran, list)",
                            pos,
                        )
                    phase = PH_SUFFIX
                    td = -1
                    n = 2
                    dep.append(d)
                elif kind == K_TOMARK1:
                    if phase == PH_SUFFIX:
                        raise fail("format", f"{OP_NAME[op]} after the element list", pos)
                    if depth == td:
                        starts += pack_q(mark_off)
                        memo_at += pack_q(mark_memo)
                    n += 1
                    dep.append(d)
                elif op != 0x31:  # APPENDS/SETITEMS/ADDITEMS modify the item below the MARK
                    if n == 0 or (depth == td and n <= tbase):
                        raise fail("format", f"{OP_NAME[op]} has no container below its MARK", pos)
                    if d > dep[-1]:
                        dep[-1] = d
            elif kind == K_POP:
                if phase == PH_SUFFIX:
                    raise fail("format", "POP after the element list", pos)
                if n == 0:
                    if depth == 0:
                        raise fail("format", "POP with an empty stack", pos)
                    marks.pop()
                    marks.pop()
                    n = marks.pop()
                    depth -= 1
                    if phase == PH_BODY and depth <= 1:
                        raise fail("format", "POP removes a MARK of the array state", pos)
                else:
                    if depth == td:
                        if n <= tbase:
                            raise fail("format", "POP reaches into the element list", pos)
                        del starts[-8:]
                        del memo_at[-8:]
                    n -= 1
                    dep.pop()
            elif kind == K_FRAME:
                if fe < _INF and pos < fe:
                    raise fail("format", "FRAME inside another FRAME", pos)
                flen = _u8(buf, pos + 1)[0]
                if st.data_end >= 0 and npos + base + flen > st.data_end:
                    raise fail(
                        "truncated",
                        f"FRAME of {flen} bytes but only {st.data_end - base - npos} bytes remain in the file",
                        pos,
                    )
                if flen > 1 << 48:
                    raise fail("format", f"FRAME length {flen} is absurd", pos)
                fe = npos + flen
                pos = npos
                continue
            elif kind == K_PROTO:
                if phase != PH_PREFIX or n or depth or st.proto or st.memo_seen:
                    raise fail("format", "PROTO opcode in the middle of the pickle", pos)
                p = buf[pos + 1]
                if p > 5:
                    raise fail("format", f"pickle protocol {p} is newer than 5", pos)
                st.proto = p
            elif kind == K_STOP:
                if phase != PH_SUFFIX or depth != 0 or n != 1:
                    if phase == PH_BODY:
                        raise fail("format", f"STOP inside the element list (open MARKs: {depth})", pos)
                    if phase == PH_PREFIX:
                        raise fail(
                            "format",
                            "STOP before any element list: not an object array as np.save writes it",
                            pos,
                        )
                    raise fail("format", f"STOP with {n} stack items and {depth} open MARKs; expected 1 and 0", pos)
                phase = PH_DONE
                status = ST_DONE
                pos = npos
                break
            elif kind == K_REFUSE:
                raise fail(
                    "unsafe",
                    f"{OP_NAME[op]} opcode refused: persistent ids, extension codes and out-of-band buffers "
                    "are never written by np.save",
                    pos,
                    op != 0x51,
                )
            else:
                raise fail("format", f"unknown pickle opcode 0x{op:02x}", pos, True)
            pos = npos
    finally:
        st.phase = phase
        st.depth = depth
        st.n = n
        st.memo = memo
        st.in_batch = in_batch
        st.done = done
        st.frame_end = fe + base if fe < _INF else _INF
        st.status = status
    return pos


def _line_end(buf: Any, start: int, lim: int, lines: int) -> int:
    """Offset just past the ``lines``-th newline from ``start`` below ``lim``; -1 if absent, -2 if too long."""
    pos = start
    for _ in range(lines):
        stop = min(lim, pos + MAX_LINE)
        k = bytes(buf[pos:stop]).find(b"\n")
        if k < 0:
            return -2 if stop - pos >= MAX_LINE else -1
        pos += k + 1
    return pos


def _text_int(buf: Any, start: int, stop: int) -> int | None:
    try:
        return int(bytes(buf[start:stop]).strip())
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# the rewriter


class RewriteState:
    """The rewriter's state between calls (plain attributes, read and written by the C twin too)."""

    __slots__ = (
        "memo",
        "slot_of",
        "live",
        "free",
        "nslots",
        "fresh",
        "freed",
        "zero_copy",
        "free_on_read",
        "missing",
        "status",
    )

    def __init__(self, live: dict[int, int] | None, *, zero_copy: bool = False, free_on_read: bool = True) -> None:
        self.memo = 0  # memo index of the next memo write
        self.slot_of: dict[int, int] = {}  # live memo index -> unpickler memo slot
        self.live = live  # memo index -> offset of its last read; None = every write is kept
        self.free: list[int] = []  # reusable slots
        self.nslots = 0  # slots ever allocated
        self.fresh: list[int] = []  # memo indices given a slot by this run (journal)
        self.freed: list[int] = []  # flat (memo index, slot) pairs released by this run (journal)
        self.zero_copy = zero_copy
        self.free_on_read = free_on_read
        self.missing = -1
        self.status = RW_OK


_PUT_CODES = [b"q" + bytes([s]) for s in range(256)]
_GET_CODES = [b"h" + bytes([s]) for s in range(256)]
_pack_I = struct.Struct("<I").pack


def _memo_op_index(buf: Any, pos: int, op: int, memo: int) -> tuple[int, int]:
    """(memo index written, end of opcode) for a memo-write opcode at ``pos``."""
    if op == OP_MEMOIZE:
        return memo, pos + 1
    if op == OP_BINPUT:
        return buf[pos + 1], pos + 2
    if op == OP_LONG_BINPUT:
        return _u4(buf, pos + 1)[0], pos + 5
    npos = _line_end(buf, pos + 1, len(buf), 1)
    return _text_int(buf, pos + 1, npos - 1) or 0, npos


def _zero_copy_target(buf: Any, q: int, end: int, memo: int, live: dict[int, int] | None) -> bool:
    """After a BINBYTES payload ending at ``q``: is it an ndarray state's raw data (``.. TUPLE .. BUILD``)?"""
    seen_tuple = False
    own_memo = True
    while q < end:
        op = buf[q]
        if op == OP_FRAME:
            q += 9
        elif op == OP_MEMOIZE or op == OP_BINPUT or op == OP_LONG_BINPUT:
            m, q = _memo_op_index(buf, q, op, memo)
            if own_memo and not seen_tuple and (live is None or m in live):
                return False  # the bytes object itself is read again elsewhere: keep it a bytes object
            memo = m + 1
            own_memo = False
        elif op == OP_TUPLE and not seen_tuple:
            seen_tuple = True
            own_memo = False
            q += 1
        elif op == OP_BUILD and seen_tuple:
            return True
        else:
            return False
    return False


def rewrite_ops(buf: Any, pos: int, end: int, base: int, rw: RewriteState, out: bytearray) -> int:
    """Append to ``out`` the opcodes of ``buf[pos:end]`` rewritten for the persistent unpickler.

    Contract (mirrored exactly by ``npystream._speedups.rewrite_ops``):

    * ``buf[pos:end]`` holds whole opcodes already validated by :func:`scan_ops`
      (file offset of ``buf[0]`` is ``base``).  Opcodes are copied verbatim
      except: FRAME is dropped; a memo write of index m (MEMOIZE/PUT/BINPUT/
      LONG_BINPUT; ``rw.memo`` is the index MEMOIZE writes) becomes
      ``BINPUT s``/``LONG_BINPUT s`` for a slot s when ``rw.live is None`` or
      m is in ``rw.live`` (``rw.slot_of[m] = s``, m appended to ``rw.fresh``;
      s comes from ``rw.free`` or is ``rw.nslots``, which then grows) and is
      dropped otherwise; a memo read of m becomes ``BINGET``/``LONG_BINGET``
      of ``rw.slot_of[m]``, and when ``rw.free_on_read`` and this is m's last
      read (``rw.live[m]`` == this opcode's offset) ``m, s`` are appended to
      ``rw.freed`` (the caller drops them from ``slot_of`` and recycles the
      slot after the program ran); with ``rw.zero_copy`` a BINBYTES/SHORT_BINBYTES/
      BINBYTES8 whose payload is an ndarray state's raw data (followed by
      FRAME/memo writes, TUPLE, FRAME/memo writes, BUILD, and whose own memo
      entry is not live) becomes ``LONG1 offset LONG1 length TUPLE2
      BINPERSID`` (offset = file offset of the payload).
    * Returns ``end`` with ``rw.status = RW_OK``, or, when a memo read finds
      no slot, the offset of that opcode with ``rw.status = RW_MISSING`` and
      ``rw.missing = m`` (everything before it has been appended; call again
      from there once the slot exists).  ``rw.memo`` is kept current.
    """
    memo = rw.memo
    slot_of = rw.slot_of
    live = rw.live
    free = rw.free
    fresh = rw.fresh
    freed = rw.freed
    zero_copy = rw.zero_copy
    free_on_read = rw.free_on_read and live is not None
    live_max = None  # computed on first use by the fast path
    arg_t = OP_ARG_T
    kind_t = OP_KIND_T
    run = pos
    status = RW_OK
    while pos < end:
        op = buf[pos]
        if (op == 0x8C or op == 0x43) and not zero_copy:
            # fast path: runs of "short literal + MEMOIZE" whose memo entry nobody reads
            q = pos
            if live_max is None:
                live_max = (max(live) if live else -1) if live is not None and len(live) < 4096 else _INF
            while q + 1 < end:
                nq = q + 2 + buf[q + 1]
                if nq >= end or buf[nq] != OP_MEMOIZE or live is None or (memo <= live_max and memo in live):
                    break
                out += buf[run:nq]
                memo += 1
                run = q = nq + 1
                if q >= end:
                    break
                op = buf[q]
                if op != 0x8C and op != 0x43:
                    break
            if q != pos:
                pos = q
                continue
            op = buf[pos]
        a = arg_t[op]
        if a == 0:
            npos = pos + 1
        elif 0 < a < 100:
            npos = pos + 1 + a
        elif a == -1:
            npos = pos + 2 + buf[pos + 1]
        elif a == -4 or a == -5:
            npos = pos + 5 + _u4(buf, pos + 1)[0]
        elif a == -8:
            npos = pos + 9 + _u8(buf, pos + 1)[0]
        else:
            npos = _line_end(buf, pos + 1, end, 2 if a == A_LINE2 else 1)
            if npos < 0:
                npos = end + 1
        if npos > end:
            raise ScanError(
                "format",
                f"{OP_NAME[op]} at the end of an element runs past it: the offset index does not match this "
                "file (rebuild it)",
                base + pos,
                None,
            )
        kind = kind_t[op]
        if kind == K_PUT:
            if op != OP_MEMOIZE:
                memo = _memo_op_index(buf, pos, op, memo)[0]
            m = memo
            memo += 1
            if run < pos:
                out += buf[run:pos]
            if live is None or m in live:
                if free:
                    s = free.pop()
                else:
                    s = rw.nslots
                    rw.nslots = s + 1
                slot_of[m] = s
                fresh.append(m)
                out += _PUT_CODES[s] if s < 256 else b"r" + _pack_I(s)
            run = npos
        elif kind == K_GET:
            if op == OP_BINGET:
                m = buf[pos + 1]
            elif op == OP_LONG_BINGET:
                m = _u4(buf, pos + 1)[0]
            else:
                m = _text_int(buf, pos + 1, npos - 1) or 0
            s = slot_of.get(m)
            if run < pos:
                out += buf[run:pos]
            run = pos
            if s is None:
                rw.missing = m
                status = RW_MISSING
                break
            out += _GET_CODES[s] if s < 256 else b"j" + _pack_I(s)
            if free_on_read and live.get(m) == base + pos:
                freed.append(m)
                freed.append(s)
            run = npos
        elif kind == K_FRAME:
            if run < pos:
                out += buf[run:pos]
            run = npos
        elif zero_copy and op in _BYTES_OPS and _zero_copy_target(buf, npos, end, memo, live):
            if run < pos:
                out += buf[run:pos]
            hdr = 2 if op == 0x43 else (5 if op == 0x42 else 9)
            out += b"\x8a\x08" + _pack_q(base + pos + hdr) + b"\x8a\x08" + _pack_q(npos - pos - hdr) + b"\x86Q"
            run = npos
        pos = npos
    if status == RW_OK and run < pos:
        out += buf[run:pos]
    rw.memo = memo
    rw.status = status
    return pos


# ---------------------------------------------------------------------------
# choosing the implementation of the two hot loops


def _load_speedups() -> tuple[Any, Any, bool]:
    if os.environ.get("NPYSTREAM_PURE_PYTHON", "").strip() not in ("", "0"):
        return scan_ops, rewrite_ops, False
    try:
        from npystream import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return scan_ops, rewrite_ops, False
    _speedups.setup(ScanError, ScanState, RewriteState, _text_int)
    return _speedups.scan_ops, _speedups.rewrite_ops, True


_scan, _rewrite, _SPEEDUPS = _load_speedups()


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
            batch = _Batch(_take(st.starts), _take(st.memo_at), st.batch_end)
            yield batch
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
    if size is not None and pos != size and not (size == pos + 1 and tail == b"\n"):
        # (one newline is tolerated: numpy 0.x-era writers appended it, see numpy's py2-np0 test file)
        raise FormatError(
            f"{size - pos} trailing bytes after the pickle's STOP; expected the file to end there",
            path=path,
            offset=pos,
        )


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


def _index_from_batches(
    batches: Iterator[_Batch], st: ScanState, header: NpyHeader
) -> tuple[PickleIndex, Exception | None, int]:
    """Collect batches into a PickleIndex; on damage also the error and where tentative elements begin.

    Elements of the batch open at the damage are *tentative*: their extent is
    only certain at the batch's closing APPENDS, so the caller decodes them one
    by one and stops at the first that does not look like a whole element.
    """
    count = header.count
    starts = np.empty(count, dtype=np.int64)
    memo_at = np.empty(count + 1, dtype=np.int64)
    firsts: list[int] = []
    ends: list[int] = []
    k = 0
    error: Exception | None = None
    tentative = -1
    try:
        for batch in batches:
            n = len(batch.starts)
            if not n:
                continue
            starts[k : k + n] = batch.starts
            memo_at[k : k + n] = batch.memo_at
            firsts.append(k)
            ends.append(batch.end)
            k += n
    except (FormatError, UnsafePickleError) as exc:
        error = exc
        tentative = k
        p_starts, p_memo, p_end = _pending(st, exc, count)
        n = len(p_starts)
        if n:
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
        starts=starts[:k] if k < count else starts,
        memo_at=memo_at[: k + 1] if k < count else memo_at,
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
    return FormatError(
        f"the unpickler rejected this element: {type(exc).__name__}: {exc}", path=path, offset=offset, index=index
    )


_RETAIN_TYPES = (type, type(len), np.dtype)
_SPECIAL = frozenset({ArrayProto, *TOKEN_TYPES})
_SPECIAL_PROTOS = _SPECIAL | {list, dict, tuple}


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
_WALK_REACH = frozenset({ArrayProto, list, dict, tuple})


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
        zero_copy: bool,
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
        self.rw = RewriteState(live, zero_copy=zero_copy and view is not None, free_on_read=free_on_read)
        self.proto_op = bytes([0x80, proto]) if proto >= 2 else b""
        self.structured = header.dtype.names is not None
        self.resolver: Any = None  # callable(m, index, offset) making rw.slot_of[m] valid, or raising
        self.retained_bytes = 0

    # -- low level ---------------------------------------------------------------
    def _run_program(self, program: bytearray, elements: bool = True) -> Any:
        self.feed.set(program)
        made = self.ctx.made
        try:
            if made is None:
                return self.unpickler.load()
            made.clear()
            result = self.unpickler.load()
            if made and elements:
                result = self._trusted_rerun(program, result, made)
            return result
        except BaseException:
            # A failed load leaves unread program bytes in the C unpickler's read-ahead
            # buffer, which the next load() would execute: start a fresh unpickler that
            # shares the memo (assigning the memo *proxy* copies it; a dict would not).
            old = self.unpickler
            new = SafeUnpickler(self.feed, old.policy)
            new.ctx = old.ctx
            new.use_protos = old.use_protos
            new._cache = old._cache
            new.memo = old.memo
            self.unpickler = new
            raise
        finally:
            self.feed.set(b"")

    def _trusted_rerun(self, program: bytearray, result: Any, made: list[ArrayProto]) -> Any:
        """Trusted mode: placeholders that escaped into objects the finaliser does not walk.

        Array placeholders reachable through lists, dicts, tuples and object
        arrays are built by the finaliser.  One handed to anything else (a
        class's ``__setstate__``, a constructor) would stay a placeholder, so
        then every array state of this load is checked (FormatError for a
        hostile one) and the program runs once more with numpy's real
        ``_reconstruct``, as ``np.load`` would run it.
        """
        reach: set[int] = set()
        stack = [result]
        while stack:
            obj = stack.pop()
            t = type(obj)
            if t not in _WALK_REACH or id(obj) in reach:
                continue
            reach.add(id(obj))
            if t is dict:
                stack.extend(obj.values())
            else:
                stack.extend(obj)
        if all(id(p) in reach for p in made):
            made.clear()
            return result
        ctx = self.ctx
        check_load(ctx)
        seen: dict[int, Any] = {}
        for p in made:
            _build_array(p, ctx, seen, 0)
        made.clear()
        # arrays of earlier elements may still be placeholders in the memo: hand out the arrays
        # (a placeholder without state is the outer array's, from the prefix)
        old = {
            k: _build_array(v, ctx, seen, 0)
            for k, v in self.unpickler.memo.copy().items()
            if type(v) is ArrayProto and v
        }
        if old:
            self.unpickler.memo = _memo_with(self.unpickler, old)
        ctx.real = True
        try:
            self.feed.set(program)
            return self.unpickler.load()
        finally:
            ctx.real = False

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
                got.extend(self.decode_run(buf, base, starts[j : j + 1], ends[j : j + 1], memos[j : j + 1], first + j))
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

    # -- streaming retention -----------------------------------------------------
    def retain(self, fresh: list[int], pinned: set[int]) -> None:
        """Streaming: keep memo values of a batch that later batches may read back, within a budget.

        Kept: globals (classes, functions), dtypes, and values of at most
        RETAIN_ONE bytes while the total stays under RETAIN_BYTES and
        RETAIN_MAX entries; everything else is released.
        """
        rw = self.rw
        slot_of = rw.slot_of
        cand = [m for m in fresh if m in slot_of and m not in pinned]
        if not cand:
            return
        out = bytearray(b"(")
        for m in cand:
            s = slot_of[m]
            out += _GET_CODES[s] if s < 256 else b"j" + _pack_I(s)
        out += b"t."
        values = self._run_program(out, elements=False)
        for m, v in zip(cand, values):
            keep = False
            if len(pinned) < RETAIN_MAX:
                if isinstance(v, _RETAIN_TYPES) or isinstance(v, TOKEN_TYPES):
                    keep = True
                else:
                    size = _rough_size(v)
                    if size <= RETAIN_ONE and self.retained_bytes + size <= RETAIN_BYTES:
                        self.retained_bytes += size
                        keep = True
            if keep:
                pinned.add(m)
            else:
                rw.free.append(slot_of.pop(m))
        del values


def _rough_size(v: Any) -> int:
    """Bytes a memo value holds, roughly (arrays by nbytes, containers shallowly)."""
    if type(v) is ArrayProto:
        v = v[1] if len(v) == 2 else None
    if isinstance(v, np.ndarray):
        return int(v.nbytes) + 112
    try:
        return sys.getsizeof(v)
    except TypeError:
        return 1 << 30


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
    """The mapped file as the copying mode's persistent-id resolver: a slice is a fresh writeable copy.

    Copying mode on a mapped file, for chunks of large elements: the rewriter
    replaces an array's raw-data BINBYTES by ``(offset, length)`` exactly as
    for zero-copy, and the unpickler's ``persistent_load`` slices this object,
    which copies the payload once from the mapping into a new uint8 array and
    returns its (writeable) memoryview.  ``_build_array`` then makes the
    element with ``np.frombuffer`` on it: writeable, backed by memory it alone
    references (never the mapping), with numpy's dtype/shape/order; byte-swapped
    dtypes still go through ``__setstate__`` like ``np.load``.  One copy
    per payload instead of two (program bytes, then the ``bytes`` numpy keeps).
    """

    __slots__ = ("view",)

    def __init__(self, view: Any) -> None:
        self.view = view

    def __getitem__(self, key: slice) -> memoryview:
        return np.array(self.view[key]).data


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
        zero_copy: bool,
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
                raise _load_error(exc, self.src.name, s, j) from None
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
    zero_copy: bool = False,
    start: int = 0,
    stop: int | None = None,
    _on_close: Any = None,
) -> Iterator[Any]:
    """Elements ``start..stop-1`` of a pickled ``.npy`` in C order, each like ``np.load(...).flat[i]``.

    Arguments are checked now; elements are built lazily.  See the module
    docstring for the memory policy of non-seekable sources.  (``_on_close``
    is called when the generator finishes or is closed: ``iter_objects``
    closes the source it opened that way.)
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
        return _flatten(_iter_stream(src, header, policy, stop), _on_close)
    view = _map_or_none(src)
    if zero_copy and view is None:
        raise NotSeekableError("zero-copy views need a memory-mappable file", path=src.name)
    return _flatten(_iter_indexed(src, header, policy, index, view, zero_copy, start, stop), _on_close)


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
    zero_copy: bool,
    start: int,
    stop: int,
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
    for a, b, ends in _chunks(index, start, certain):
        try:
            items = reader.run(a, b, ends)
        except _Partial as part:
            yield part.items
            raise part.error from None
        yield items
        del items
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
        zero_copy: bool = False,
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
        index = self._reader.index
        k = 0
        while k < len(order):
            a = order[k]
            j = k + 1
            while (
                j < len(order)
                and order[j] == order[j - 1] + 1
                and int(index.starts[order[j]]) - int(index.starts[a]) < CHUNK_BYTES
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
