"""The two hot loops of the object stream in pure Python: the opcode scanner and the rewriter.

:func:`scan_ops` walks whole opcodes, skipping payloads by their length
fields, and records element starts and memo liveness; :func:`rewrite_ops`
turns runs of elements into programs for the persistent unpickler.  Both
are the specification and the pure-Python fallback of their C twins in
``npystream._speedups`` (chosen in :mod:`npystream.formats.pickle_walk`,
which also explains the design); their states are plain attribute objects
so either implementation can continue what the other started.

The generic opcode-by-opcode loops are the specification.  For speed
without the C twin, both recognise the element shapes numpy writes (an
ndarray's reduce/state opcodes, str/bytes literals with their memo write)
with precompiled ``re`` patterns, or numpy over the raw bytes, and apply a
whole element's -- or a run of elements' -- net effect at once; anything
else falls back to the generic loop (see "fast paths" below;
``FAST_PATHS = False`` switches them off, and the tests compare both).
Measured on issue 3's files (scan_index, pure Python): 1M small int32
arrays 12.2 s -> 0.6 s, 3M short strings 0.97 s -> 0.3 s of CPU.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------
# limits (each with its reason)

MAX_MARK_DEPTH = 1000  # nesting of MARK-based containers; numpy output needs < 20
MAX_STACK = 1 << 20  # items on one MARK level; a batch is 1000, so only a bomb gets here
# Object nesting depth (containers in containers, a REDUCE's argument tuple counting as a level):
# deeper elements are refused with a FormatError naming this limit.  numpy itself has none (the
# unpickler is not recursive), but everything that walks such an object (repr, ==, copy, our own
# checks) recurses once per level, and Python's default recursion limit is 1000.  Read when a scan
# starts (ScanState.max_nesting), by the C scanner too: raise it for deeper data, together with
# sys.setrecursionlimit.
MAX_NESTING = 1000
# Element-level slots pending beyond the header's count.  An element built without MARKs (a dict of one
# item holding a dict of one item ..., a list of one item ..., nested TUPLE1-3s and REDUCE/BUILD
# around them) leaves its unfinished outer objects on the element level: the pickler keeps at most
# 4 of them per nesting level (NEWOBJ_EX: class, args, then a one-item kwargs dict and its key), so
# this bound lets every element up to max_nesting deep through and still stops a pickle pushing
# items without bound early (16 bytes of bookkeeping per slot).
PENDING_PER_LEVEL = 4
MEMO_DEPTH_NOTE = 32  # memo entries deeper than this remember their depth (for GET-built nesting)
MAX_LINE = 1 << 16  # text opcodes (protocol 0-2 GLOBAL/INT/PUT...) are short lines

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
        "max_nesting",
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
        self.max_nesting = MAX_NESTING  # object nesting refused beyond this depth



# ---------------------------------------------------------------------------
# fast paths of the pure-Python scanner and rewriter (the C twins need none)
#
# Inside an APPENDS batch (phase PH_BODY, ``in_batch``, depth 2) numpy writes
# each element as one of a few fixed opcode shapes.  Precompiled ``re``
# patterns recognise whole elements at the current position and the scanner
# applies their *net* effect on the state at once; the effect of such a
# self-contained opcode sequence does not depend on what lies below it on the
# stack, so it equals what the generic loop would do opcode by opcode.
# Anything unusual (a FRAME inside an element, the end of the buffer or
# frame, a memo write out of sequence, a GET before its PUT, the element
# limits, recorded memo depths) makes the fast path take nothing, and the
# generic loop handles it (and raises, if it must).  ``FAST_PATHS = False``
# switches them off (the tests compare both).

FAST_PATHS = True

# an ndarray element (numpy's ``__reduce__``):
#   GET _reconstruct, GET ndarray, BININT1 0, TUPLE1, PUT, GET b'b', TUPLE3, PUT, REDUCE, PUT,
#   MARK, BININT1 1, <shape: 1-3 ints + TUPLEn, or MARK 4-64 ints TUPLE>, PUT, GET dtype,
#   NEWFALSE|NEWTRUE, SHORT_BINBYTES|BINBYTES|BINBYTES8 payload, PUT, TUPLE, PUT, BUILD
# (PUT: MEMOIZE in protocol 4, BINPUT/LONG_BINPUT in protocol 3; GET: BINGET/LONG_BINGET)
_RX_GET = rb"(h.|j....)"
_RX_PUT = rb"(\x94|q.|r....)"
_RX_INT = rb"(?:K.|M..|J....)"
_RX_SHAPE = (
    rb"(?:" + _RX_INT + rb"\x85|" + _RX_INT + rb"{2}\x86|" + _RX_INT + rb"{3}\x87|\(" + _RX_INT + rb"{4,64}t)"
)
_ARR_HEAD = re.compile(
    _RX_GET + _RX_GET + rb"K\x00\x85" + _RX_PUT + _RX_GET + rb"\x87" + _RX_PUT + rb"R" + _RX_PUT
    + rb"\(K\x01" + _RX_SHAPE + _RX_PUT + _RX_GET + rb"[\x88\x89](C.|B....|\x8e.{8})",
    re.DOTALL,
).match
_ARR_TAIL = re.compile(_RX_PUT + rb"t" + _RX_PUT + rb"b", re.DOTALL).match
_ARR_TAIL4 = b"\x94t\x94b"
_ARR_MEMO = 6  # memo writes per ndarray element
_ARR_DEP = 3  # nesting depth the generic loop records for an ndarray element
_ARR_RUNS: dict[bytes, Any] = {}  # GET bytes of (_reconstruct, ndarray, b'b', dtype) -> matcher of "tail + next head"


def _arr_run_matcher(gets: bytes, r: bytes, nd: bytes, b: bytes, dt: bytes) -> Any:
    """Matcher of the previous element's protocol-4 tail followed by the next element's head up to its length byte
    (group 1: the shape's opcodes)."""
    m = _ARR_RUNS.get(gets)
    if m is None:
        if len(_ARR_RUNS) >= 64:
            _ARR_RUNS.clear()
        m = re.compile(
            re.escape(_ARR_TAIL4 + r + nd) + rb"K\x00\x85\x94" + re.escape(b) + rb"\x87\x94R\x94\(K\x01"
            + rb"(" + _RX_SHAPE + rb")\x94" + re.escape(dt) + rb"[\x88\x89]C.",
            re.DOTALL,
        ).match
        _ARR_RUNS[gets] = m
    return m


_ARR_RUNS3: dict[bytes, Any] = {}
_PACK6 = struct.Struct("<6I").pack


def _arr_run_matcher3(gets: bytes, r: bytes, nd: bytes, b: bytes, dt: bytes) -> Any:
    """Protocol 3 (LONG_BINPUT) twin of :func:`_arr_run_matcher`; groups 1-6: the six memo indices written
    (the previous element's last two, then this element's first four)."""
    m = _ARR_RUNS3.get(gets)
    if m is None:
        if len(_ARR_RUNS3) >= 64:
            _ARR_RUNS3.clear()
        m = re.compile(
            rb"r(....)tr(....)b" + re.escape(r + nd) + rb"K\x00\x85r(....)" + re.escape(b) + rb"\x87r(....)Rr(....)\(K\x01"
            + _RX_SHAPE + rb"r(....)" + re.escape(dt) + rb"[\x88\x89]C.",
            re.DOTALL,
        ).match
        _ARR_RUNS3[gets] = m
    return m


def _get_index(g: bytes) -> int:
    return g[1] if g[0] == OP_BINGET else _u4(g, 1)[0]


def _put_ok(g: bytes, memo: int) -> bool:
    """Does the memo write ``g`` (MEMOIZE/BINPUT/LONG_BINPUT bytes) write index ``memo``, as the scanner requires?"""
    if g[0] == OP_MEMOIZE:
        return True
    return (g[1] if g[0] == OP_BINPUT else _u4(g, 1)[0]) == memo


def _fast_arrays(buf: Any, pos: int, lim: int, base: int, st: ScanState, memo: int, n: int, done: int) -> Any:
    """A run of whole ndarray elements at ``pos`` (below ``lim``): applies their effect, returns (pos, k) or None.

    Updates ``st.starts``/``memo_at``/``dep``/``reads``/``memo_seen``; the
    caller adds ``k`` to its stack count and ``6 * k`` to its memo counter.
    """
    if st.memo_depth:
        return None
    starts = st.starts
    # the generic loop's limits: at most 4 stack items of an element are on the batch level at
    # once (checks "n >= MAX_STACK" and "done + slots > max_slots" before each push)
    room = min(st.count + 5 - done - (len(starts) >> 3), MAX_STACK - 4 - n)
    reads = st.reads
    mb = st.memo_base
    offs: list[int] = []
    q = pos
    mm = memo
    while len(offs) < room:
        m = _ARR_HEAD(buf, q, lim)
        if m is None:
            break
        r, nd, p1, b, p2, p3, p4, dt, ph = m.groups()
        ri = _get_index(r)
        ndi = _get_index(nd)
        bi = _get_index(b)
        dti = _get_index(dt)
        if not (mb <= ri < mm and mb <= ndi < mm and mb <= bi <= mm and mb <= dti < mm + 4):
            break
        if not (_put_ok(p1, mm) and _put_ok(p2, mm + 1) and _put_ok(p3, mm + 2) and _put_ok(p4, mm + 3)):
            break
        e = m.end()
        pop = ph[0]
        te = e + (ph[1] if pop == 0x43 else (_u4(ph, 1)[0] if pop == 0x42 else _u8(ph, 1)[0]))
        if te > lim:
            break
        t = _ARR_TAIL(buf, te, lim)
        if t is None:
            break
        p5, p6 = t.groups()
        if not (_put_ok(p5, mm + 4) and _put_ok(p6, mm + 5)):
            break
        # the element's GETs, in the generic loop's order
        reads[ri] = base + q
        reads[ndi] = base + m.start(2)
        reads[bi] = base + m.start(4)
        reads[dti] = base + m.start(8)
        offs.append(base + q)
        mm += _ARR_MEMO
        q = t.end()
        if pop != 0x43 or len(offs) >= room:
            continue
        if p1[0] == p2[0] == p3[0] == p4[0] == p5[0] == p6[0] == OP_LONG_BINPUT:
            # protocol 3 with short payloads, memo indices >= 256: one match per element, its six
            # memo indices checked as one 24-byte string
            run = _arr_run_matcher3(r + nd + b + dt, r, nd, b, dt)
            lr = len(r)
            b_at = lr + len(nd) + 8
            dt_back = 3 + len(dt)
            te = q - 12  # where this element's tail starts
            mp = mm - _ARR_MEMO  # memo counter at the start of the element whose tail is at te
            k0 = len(offs)
            pend = last = last_dt = pend_dt = -1
            while True:
                m = run(buf, te, lim)
                if m is None or b"".join(m.groups()) != _PACK6(mp + 4, mp + 5, mp + 6, mp + 7, mp + 8, mp + 9):
                    break
                if pend >= 0:
                    offs.append(base + pend)
                    last = pend
                    last_dt = pend_dt
                    q = te + 12
                    if len(offs) >= room:
                        pend = -1
                        break
                pend = te + 12
                e = m.end()
                pend_dt = e - dt_back
                te = e + buf[e - 1]
                mp += _ARR_MEMO
            if pend >= 0:
                t = _ARR_TAIL(buf, te, lim)
                if t is not None and t.groups() == (b"r" + _pack_I(mp + 4), b"r" + _pack_I(mp + 5)):
                    offs.append(base + pend)
                    last = pend
                    last_dt = pend_dt
                    q = t.end()
            if last >= 0:
                mm += _ARR_MEMO * (len(offs) - k0)
                reads[ri] = base + last
                reads[ndi] = base + last + lr
                reads[bi] = base + last + b_at
                reads[dti] = base + last_dt
            continue
        if (p1 + p2 + p3 + p4 + p5 + p6) != b"\x94\x94\x94\x94\x94\x94":
            continue
        # protocol 4 with short payloads: the following elements with the same GETs, one match each
        # (the previous element's tail + this element's head up to its payload length byte)
        run = _arr_run_matcher(r + nd + b + dt, r, nd, b, dt)
        lr = len(r)
        b_at = lr + len(nd) + 4
        dt_back = 3 + len(dt)
        te = q - 4  # this element's tail: each match checks one tail, and the head after it
        k0 = len(offs)
        pend = last = last_dt = pend_dt = -1
        while True:
            m = run(buf, te, lim)
            if m is None:
                break
            if pend >= 0:  # its tail is right: the pending element is whole
                offs.append(base + pend)
                last = pend
                last_dt = pend_dt
                q = te + 4
                if len(offs) >= room:
                    pend = -1
                    break
            pend = te + 4
            e = m.end()
            pend_dt = e - dt_back
            te = e + buf[e - 1]
        if pend >= 0 and te + 4 <= lim and buf[te : te + 4] == _ARR_TAIL4:
            offs.append(base + pend)
            last = pend
            last_dt = pend_dt
            q = te + 4
        if last >= 0:
            mm += _ARR_MEMO * (len(offs) - k0)
            reads[ri] = base + last
            reads[ndi] = base + last + lr
            reads[bi] = base + last + b_at
            reads[dti] = base + last_dt
    k = len(offs)
    if not k:
        return None
    starts += struct.pack(f"<{k}q", *offs)
    st.memo_at += struct.pack(f"<{k}q", *range(memo, memo + _ARR_MEMO * k, _ARR_MEMO))
    st.dep.extend([_ARR_DEP] * k)
    st.memo_seen = True
    return q, k


# a string or bytes element of protocol 4: SHORT_BINUNICODE|SHORT_BINBYTES len data MEMOIZE
_STR_RUN = re.compile(
    rb"(?:[\x8cC](?:" + b"|".join(re.escape(bytes([k])) + b".{%d}" % k for k in range(256)) + rb")\x94){1,4096}",
    re.DOTALL,
).match
_STR_LENS = re.compile(
    rb"[\x8cC](?=([\x00-\xff]))(?:" + b"|".join(re.escape(bytes([k])) + b".{%d}" % k for k in range(256)) + rb")\x94",
    re.DOTALL,
).findall


def _fast_strings(buf: Any, pos: int, lim: int, base: int, st: ScanState, memo: int, n: int, done: int) -> Any:
    """A run of short literal + MEMOIZE elements at ``pos``: applies their effect, returns (pos, k) or None."""
    room = min(_max_slots(st) - done - (len(st.starts) >> 3), MAX_STACK - 1 - n)
    span = lim - pos
    if room <= 0 or span < 3:
        return None
    # 1. numpy on the next bytes (about the rest of a batch of 1000, the size numpy writes): candidate
    # elements end at the 0x94 bytes; a candidate is an element when it starts with a short literal
    # opcode whose length byte leads exactly to that 0x94.  Checked from the first element on, the
    # candidates before the first failure are exactly the true elements (each ends at the first 0x94
    # after its start, which its own length confirms).  A payload holding a 0x94 byte stops it.
    want = min(room, 1000 - (len(st.starts) >> 3) % 1000)
    size = min(span, max(2048, want * (3 + buf[pos + 1]) * 2))
    a = np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos)
    ends = np.flatnonzero(a == OP_MEMOIZE)
    k = len(ends)
    if k:
        rel = np.empty(k, dtype=np.int64)
        rel[0] = 0
        rel[1:] = ends[:-1] + 1
        op = a[rel]
        ok = (rel + 2 + a[np.minimum(rel + 1, size - 1)] == ends) & ((op == 0x8C) | (op == 0x43))
        if not ok[0]:
            k = 0
        elif not ok.all():
            k = int(np.argmin(ok))
    del a
    if not k:
        # 2. re: a run of whole elements (any payload bytes), then each one's length
        m = _STR_RUN(buf, pos, lim)
        if m is None:
            return None
        e = m.end()
        lens = np.frombuffer(b"".join(_STR_LENS(buf, pos, e)), dtype=np.uint8).astype(np.int64) + 3
        ends = np.cumsum(lens) - 1
        rel = ends - (lens - 1)
        k = len(rel)
    if k > room:
        k = room
    st.starts += (rel[:k] + (base + pos)).astype("<i8").tobytes()
    st.memo_at += np.arange(memo, memo + k, dtype="<i8").tobytes()
    st.dep.extend([0] * k)
    st.memo_seen = True
    return pos + int(ends[k - 1]) + 1, k


_LEN4_OPS = (0x58, 0x42)  # BINUNICODE, BINBYTES
_LIT_LEN = {0x58: 4, 0x42: 4, 0x43: 1, 0x8C: 1}  # literal opcode -> size of its length field


def _fast_literals_p3(buf: Any, pos: int, lim: int, base: int, st: ScanState, memo: int, n: int, done: int) -> Any:
    """A run of "literal + memo write" elements at ``pos`` (protocol 3 str/bytes with BINPUT/LONG_BINPUT, and
    BINUNICODE/BINBYTES + MEMOIZE of protocol 4): applies their effect, returns (pos, k) or None.

    BINPUT/LONG_BINPUT must write ``memo, memo + 1, ...`` as the generic loop requires.
    """
    room = min(_max_slots(st) - done - (len(st.starts) >> 3), MAX_STACK - 1 - n)
    if room <= 0:
        return None
    rel: Any = None
    k = 0
    span = lim - pos
    top = (memo >> 24) & 0xFF
    want = min(room, 1000 - (len(st.starts) >> 3) % 1000)
    if buf[pos] in _LEN4_OPS and span > 10 and memo >= 256 and ((memo + want) >> 24) & 0xFF == top:
        # numpy: candidate ends are LONG_BINPUT opcodes ("r", then an index whose top byte is known);
        # from the first element on, each start's opcode and length must lead exactly to the next
        # candidate, whose index must be the next memo index -- so the verified prefix is exact
        size = min(span, 1 << 20, max(4096, want * (10 + _u4(buf, pos + 1)[0]) * 2))  # bounded copy below
        a = np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos)
        cand = np.flatnonzero((a[: size - 4] == OP_LONG_BINPUT) & (a[4:] == top))
        del a
        if len(cand):
            w = np.frombuffer(bytes(buf[pos : pos + size]) + bytes(8), dtype=np.uint8).astype(np.int64)
            starts_rel = np.empty(len(cand), dtype=np.int64)
            starts_rel[0] = 0
            starts_rel[1:] = cand[:-1] + 5
            s1 = starts_rel + 1
            length = w[s1] | (w[s1 + 1] << 8) | (w[s1 + 2] << 16) | (w[s1 + 3] << 24)
            c1 = cand + 1
            index = w[c1] | (w[c1 + 1] << 8) | (w[c1 + 2] << 16) | (w[c1 + 3] << 24)
            op = w[starts_rel]
            ok = (
                ((op == 0x58) | (op == 0x42))
                & (starts_rel + 5 + length == cand)
                & (index == np.arange(memo, memo + len(cand), dtype=np.int64))
            )
            k = len(ok) if ok.all() else int(np.argmin(ok))
            if k:
                rel = starts_rel[:k]
                q = pos + int(cand[k - 1]) + 5
    if not k:
        # one element at a time
        offs = []
        q = pos
        mm = memo
        while len(offs) < room and q < lim:
            op = buf[q]
            if offs and mm >= 256 and op in _LEN4_OPS:
                break  # the numpy pass can take the following ones
            la = _LIT_LEN.get(op)
            if la is None or q + 1 + la > lim:
                break
            p = q + 1 + la + (buf[q + 1] if la == 1 else _u4(buf, q + 1)[0])
            if p + 2 > lim:
                break
            pop = buf[p]
            if pop == OP_BINPUT and buf[p + 1] == mm:
                nq = p + 2
            elif pop == OP_LONG_BINPUT and p + 5 <= lim and _u4(buf, p + 1)[0] == mm:
                nq = p + 5
            elif pop == OP_MEMOIZE and la == 4:  # short literals + MEMOIZE are _fast_strings' runs
                nq = p + 1
            else:
                break
            offs.append(q - pos)
            mm += 1
            q = nq
        k = len(offs)
        if not k:
            return None
        rel = np.array(offs, dtype=np.int64)
    elif k > room:
        k = room
        rel = rel[:k]
        q = pos + int(cand[k - 1]) + 5
    st.starts += (rel + (base + pos)).astype("<i8").tobytes()
    st.memo_at += np.arange(memo, memo + k, dtype="<i8").tobytes()
    st.dep.extend([0] * k)
    st.memo_seen = True
    return q, k


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
    fast = FAST_PATHS
    max_nesting = st.max_nesting
    max_slots = _max_slots(st)
    count = st.count  # (read by fail(); st itself stays a fast local of the loop)

    def fail(kind: str, msg: str, at: int, push: bool = False, batch: bool = False) -> ScanError:
        index = None
        if batch:  # the open batch as a whole is in doubt
            index = done
        elif phase == PH_BODY:
            if td == 1:  # outside an APPENDS batch every slot belongs to the one element `e APPEND` adds
                index = done
            else:  # a slot is an element or a pending part of the last one: never past the header's count
                k = len(starts) >> 3
                cur = k if (depth == td and push) else max(k - 1, 0)
                index = min(done + cur, max(count - 1, done))
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
            if in_batch and fast and depth == 2:
                if op == 0x68 or op == 0x6A:
                    got = _fast_arrays(buf, pos, lim, base, st, memo, n, done)
                    if got is not None:
                        pos, k = got
                        n += k
                        memo += _ARR_MEMO * k
                        continue
                elif op == 0x8C or op == 0x43:
                    got = _fast_strings(buf, pos, lim, base, st, memo, n, done)
                    if got is None:
                        got = _fast_literals_p3(buf, pos, lim, base, st, memo, n, done)
                    if got is not None:
                        pos, k = got
                        n += k
                        memo += k
                        continue
                elif op == 0x58 or op == 0x42:
                    got = _fast_literals_p3(buf, pos, lim, base, st, memo, n, done)
                    if got is not None:
                        pos, k = got
                        n += k
                        memo += k
                        continue
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
                    if done + (len(starts) >> 3) > max_slots:
                        raise fail("format", _too_many(st), pos, batch=True)
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
                if d > max_nesting:
                    raise fail("format", _too_deep(st), pos)
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
                if d > max_nesting:
                    raise fail("format", _too_deep(st), pos)
                mark_memo = marks.pop()
                mark_off = marks.pop()
                n = marks.pop()
                depth -= 1
                if phase == PH_BODY and depth == 1 and in_batch and kind == K_TOMARK1:
                    # The MARK taken for an APPENDS batch was the first opcode of a single element that
                    # numpy appends alone (`e APPEND`: a 0-d or one-element array, or a batch of one
                    # after 1000s) and that starts with a MARK (a frozenset, a tuple of 4+ items): its
                    # slots were that element's insides; it is one element-level slot now.
                    in_batch = False
                    td, tbase = 1, 5
                    del starts[:]
                    del memo_at[:]
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


def _max_slots(st: ScanState) -> int:
    """Element-level slots allowed at once: the header's count, plus the pending parts of a nested element."""
    return st.count + 8 + PENDING_PER_LEVEL * st.max_nesting


def _too_many(st: ScanState) -> str:
    """The message when element-level slots outrun :func:`_max_slots`."""
    return (
        f"the pickle holds more elements than the header's {st.count}, or an element nests deeper than "
        f"MAX_NESTING={st.max_nesting} levels ({_max_slots(st) - st.count} objects pending on the element list)"
    )


def _too_deep(st: ScanState) -> str:
    """The message when an object nests deeper than ``st.max_nesting``."""
    return (
        f"objects nested more than {st.max_nesting} deep (npystream.formats.pickle_ops.MAX_NESTING; raise it, "
        "and sys.setrecursionlimit, for deeper data)"
    )


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



def _rw_array(buf: Any, pos: int, end: int, base: int, rw: RewriteState, out: bytearray, run: int, memo: int) -> Any:
    """Rewrite one whole ndarray element at ``pos`` (see :func:`_fast_arrays`) as the generic loop would.

    Returns (pos after it, memo counter after it) having appended ``buf[run:pos]``
    and the element's rewrite to ``out``, or None (nothing done) when the
    element is not whole before ``end`` or reads a memo entry without a slot.
    """
    m = _ARR_HEAD(buf, pos, end)
    if m is None:
        return None
    r, nd, p1, b, p2, p3, p4, dt, ph = m.groups()
    slot_of = rw.slot_of
    gets = (_get_index(r), _get_index(nd), _get_index(b), _get_index(dt))
    for g in gets:
        if g >= memo or g not in slot_of:  # a missing slot (or one this element would write): generic loop
            return None
    pop = ph[0]
    e = m.end()
    te = e + (ph[1] if pop == 0x43 else (_u4(ph, 1)[0] if pop == 0x42 else _u8(ph, 1)[0]))
    if te > end:
        return None
    t = _ARR_TAIL(buf, te, end)
    if t is None:
        return None
    p5, p6 = t.groups()
    puts = []
    mm = memo
    for p in (p1, p2, p3, p4, p5, p6):
        if p[0] != OP_MEMOIZE:
            mm = p[1] if p[0] == OP_BINPUT else _u4(p, 1)[0]
        puts.append(mm)
        mm += 1
    live = rw.live
    free = rw.free
    fresh = rw.fresh
    freed = rw.freed
    free_on_read = rw.free_on_read and live is not None

    def get(k: int, at: int) -> None:
        g = gets[k]
        s = slot_of[g]
        out.extend(_GET_CODES[s] if s < 256 else b"j" + _pack_I(s))
        if free_on_read and live.get(g) == base + at:
            freed.append(g)
            freed.append(s)

    def put(k: int) -> None:
        w = puts[k]
        if live is None or w in live:
            if free:
                s = free.pop()
            else:
                s = rw.nslots
                rw.nslots = s + 1
            slot_of[w] = s
            fresh.append(w)
            out.extend(_PUT_CODES[s] if s < 256 else b"r" + _pack_I(s))

    if run < pos:
        out += buf[run:pos]
    get(0, pos)
    get(1, m.start(2))
    out += b"K\x00\x85"
    put(0)
    get(2, m.start(4))
    out += b"\x87"
    put(1)
    out += b"R"
    put(2)
    out += buf[m.end(6) : m.start(7)]  # MARK BININT1 1 <shape>
    put(3)
    get(3, m.start(8))
    ps = m.start(9)
    out += buf[ps - 1 : ps]  # NEWFALSE / NEWTRUE
    if rw.zero_copy and live is not None and puts[4] not in live:  # the payload is the state's raw data
        hdr = len(ph)
        out += b"\x8a\x08" + _pack_q(base + ps + hdr) + b"\x8a\x08" + _pack_q(te - ps - hdr) + b"\x86Q"
    else:
        out += buf[ps:te]
    put(4)
    out += b"t"
    put(5)
    out += b"b"
    q = t.end()
    if pop != 0x43 or (p1 + p2 + p3 + p4 + p5 + p6) != b"\x94\x94\x94\x94\x94\x94":
        return q, mm
    if live is None:
        return _rw_array_run_keep(buf, q, end, rw, out, mm, r, nd, b, dt, gets)
    # protocol 4 with short payloads: the following elements with the same GETs, as long as none of
    # their memo writes is live (all dropped), none of their GETs is a last read (no journal entry)
    # and the slots stay (nothing is allocated or freed meanwhile)
    run = _arr_run_matcher(r + nd + b + dt, r, nd, b, dt)
    codes = [_GET_CODES[s] if s < 256 else b"j" + _pack_I(s) for s in (slot_of[g] for g in gets)]
    pre = codes[0] + codes[1] + b"K\x00\x85" + codes[2] + b"\x87R(K\x01"
    dtc = codes[3]
    stop = _INF
    if free_on_read:
        for g in gets:
            v = live.get(g)
            if v is not None and base + q <= v < stop:
                stop = v
    zc = rw.zero_copy
    keys = live.keys()
    te = q - 4
    while True:
        m = run(buf, te, end)
        if m is None:
            break
        e = m.end()
        nte = e + buf[e - 1]
        if nte + 4 > end or base + nte + 4 > stop or buf[nte : nte + 4] != _ARR_TAIL4:
            break
        if not keys.isdisjoint(range(mm, mm + _ARR_MEMO)):
            break
        out += pre
        out += buf[m.start(1) : m.end(1)]
        out += dtc
        if zc:
            out += buf[e - 3 : e - 2]
            out += b"\x8a\x08" + _pack_q(base + e) + b"\x8a\x08" + _pack_q(nte - e) + b"\x86Q"
        else:
            out += buf[e - 3 : nte]
        out += b"tb"
        mm += _ARR_MEMO
        te = nte
        q = nte + 4
    return q, mm


def _rw_array_run_keep(
    buf: Any, q: int, end: int, rw: RewriteState, out: bytearray, mm: int, r: bytes, nd: bytes, b: bytes, dt: bytes,
    gets: tuple[int, ...],
) -> tuple[int, int]:
    """Without a liveness table (streaming) every memo write is kept: the protocol-4 elements following the
    one just rewritten (same GETs, short payloads), each memo write given a slot in order; (pos, memo)."""
    slot_of = rw.slot_of
    free = rw.free
    fresh = rw.fresh
    run = _arr_run_matcher(r + nd + b + dt, r, nd, b, dt)
    codes = [_GET_CODES[s] if s < 256 else b"j" + _pack_I(s) for s in (slot_of[g] for g in gets)]
    g_head = codes[0] + codes[1] + b"K\x00\x85"
    g_b = codes[2] + b"\x87"
    dtc = codes[3]
    te = q - 4
    while True:
        m = run(buf, te, end)
        if m is None:
            break
        e = m.end()
        nte = e + buf[e - 1]
        if nte + 4 > end or buf[nte : nte + 4] != _ARR_TAIL4:
            break
        puts = []
        for w in range(mm, mm + _ARR_MEMO):
            if free:
                s = free.pop()
            else:
                s = rw.nslots
                rw.nslots = s + 1
            slot_of[w] = s
            puts.append(_PUT_CODES[s] if s < 256 else b"r" + _pack_I(s))
        fresh.extend(range(mm, mm + _ARR_MEMO))
        out += g_head + puts[0] + g_b + puts[1] + b"R" + puts[2] + b"(K\x01"
        out += buf[m.start(1) : m.end(1)]
        out += puts[3] + dtc
        out += buf[e - 3 : nte]
        out += puts[4] + b"t" + puts[5] + b"b"
        mm += _ARR_MEMO
        te = nte
        q = nte + 4
    return q, mm


def _rw_strings(buf: Any, pos: int, end: int, rw: RewriteState, out: bytearray, run: int, memo: int) -> Any:
    """A long run of "short literal + MEMOIZE" elements rewritten with numpy, as the generic loop would:
    memo writes nobody reads dropped, or (no liveness table, no free slots) each given the next new
    slot.  Returns (pos, memo) having appended ``buf[run:pos]`` and the run, or None (nothing done)."""
    span = end - pos
    if span < 3 * 64:
        return None
    zero_copy = rw.zero_copy
    # The generic loop calls this at every short literal: test 16 elements in Python first, so that
    # only real runs pay the numpy pass over 64 KiB (elements that are small dicts paid it at every
    # key: 300k dicts 22.6 s -> see benchmarks/bench_objects.py --only 4)
    p = pos
    for _ in range(16):
        if p + 2 > end:
            return None
        o = buf[p]
        if o != 0x8C and (zero_copy or o != 0x43):
            return None
        p += 2 + buf[p + 1]
        if p >= end or buf[p] != OP_MEMOIZE:
            return None
        p += 1
    size = min(span, 1 << 16)
    a = np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos)
    ends = np.flatnonzero(a == OP_MEMOIZE)
    k = len(ends)
    if k < 64:
        return None
    rel = np.empty(k, dtype=np.int64)
    rel[0] = 0
    rel[1:] = ends[:-1] + 1
    op = a[rel]
    lit_ok = (op == 0x8C) if zero_copy else ((op == 0x8C) | (op == 0x43))
    ok = (rel + 2 + a[np.minimum(rel + 1, size - 1)] == ends) & lit_ok
    if not ok.all():
        k = int(np.argmin(ok))
        if k < 64:
            return None
    live = rw.live
    if live is not None:
        if len(live) > 4096:
            return None
        keys = np.fromiter(live, dtype=np.int64, count=len(live))
        hit = keys[(keys >= memo) & (keys < memo + k)]
        if len(hit):
            k = int(hit.min()) - memo  # the elements before the first live memo write
            if k < 64:
                return None
        e = int(ends[k - 1]) + 1
        keep = np.ones(e, dtype=bool)
        keep[ends[:k]] = False
        if run < pos:
            out += buf[run:pos]
        out += a[:e][keep].tobytes()
        return pos + e, memo + k
    if rw.free:
        return None
    s0 = rw.nslots
    # every memo write kept: each element's literal bytes, then BINPUT/LONG_BINPUT of its new slot
    slots = np.arange(s0, s0 + k, dtype=np.int64)
    plen = np.where(slots < 256, 2, 5)
    lit = ends[:k] - rel[:k]  # literal bytes of each element (without its MEMOIZE)
    shift = np.cumsum(plen) - plen - np.arange(k)  # where element i's bytes move in the output
    e = int(ends[k - 1]) + 1
    total = e - k + int(plen.sum())
    res = np.empty(total, dtype=np.uint8)
    keep = np.ones(e, dtype=bool)
    keep[ends[:k]] = False
    src = np.flatnonzero(keep)
    res[src + np.repeat(shift, lit)] = a[src]
    at = ends[:k] + shift  # where each element's memo write goes
    small = plen == 2
    res[at[small]] = OP_BINPUT
    res[at[small] + 1] = slots[small]
    big = ~small
    if big.any():
        ab = at[big]
        sb = slots[big]
        res[ab] = OP_LONG_BINPUT
        res[ab + 1] = sb & 0xFF
        res[ab + 2] = (sb >> 8) & 0xFF
        res[ab + 3] = (sb >> 16) & 0xFF
        res[ab + 4] = (sb >> 24) & 0xFF
    if run < pos:
        out += buf[run:pos]
    out += res.tobytes()
    rw.nslots = s0 + k
    mrange = range(memo, memo + k)
    rw.slot_of.update(zip(mrange, range(s0, s0 + k)))
    rw.fresh.extend(mrange)
    return pos + e, memo + k


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
    fast = FAST_PATHS
    arg_t = OP_ARG_T
    kind_t = OP_KIND_T
    run = pos
    status = RW_OK
    while pos < end:
        op = buf[pos]
        if fast and (op == 0x8C or (op == 0x43 and not zero_copy)):
            # fast path: runs of "short literal + MEMOIZE" (str/bytes elements); SHORT_BINBYTES only
            # without zero-copy (whose payload test would apply)
            got = _rw_strings(buf, pos, end, rw, out, run, memo)
            if got is not None:
                pos, memo = got
                run = pos
                continue
            q = pos
            if live_max is None:
                live_max = (max(live) if live else -1) if live is not None and len(live) < 4096 else _INF
            while q + 1 < end:
                nq = q + 2 + buf[q + 1]
                if nq >= end or buf[nq] != OP_MEMOIZE:
                    break
                out += buf[run:nq]
                if live is None or (memo <= live_max and memo in live):
                    if free:
                        s = free.pop()
                    else:
                        s = rw.nslots
                        rw.nslots = s + 1
                    slot_of[memo] = s
                    fresh.append(memo)
                    out += _PUT_CODES[s] if s < 256 else b"r" + _pack_I(s)
                memo += 1
                run = q = nq + 1
                if q >= end:
                    break
                op = buf[q]
                if op != 0x8C and (op != 0x43 or zero_copy):
                    break
            if q != pos:
                pos = q
                continue
            op = buf[pos]
        elif fast and (op == 0x68 or op == 0x6A):
            got = _rw_array(buf, pos, end, base, rw, out, run, memo)
            if got is not None:
                pos, memo = got
                run = pos
                continue
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
