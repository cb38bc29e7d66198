"""Direct decoding of the element shapes numpy writes most, without running the unpickler.

Why: after the scan, every element of an object ``.npy`` is rewritten into a
program and run by the C unpickler, whose placeholders are then checked and
built (:mod:`npystream.formats.pickle_walk`).  For the two commonest element
kinds that is most of the cost of a pass: a plain ndarray
(``_reconstruct(ndarray, (0,), b'b')`` then BUILD with the state
``(1, shape, dtype, fortran, raw)``, about 25 opcodes) and a scalar literal
(one opcode: a short ``str``, ``bytes``, ``int``, ``float``, ``None``,
``bool``).  Their opcode sequences are fixed, so they are recognised here and
the objects built straight from the bytes, exactly as the unpickler plus
:func:`~npystream.formats.pickle_safety._build_array` would build them:
numpy's own ``_reconstruct`` + ``__setstate__`` with a ``bytes`` payload (the
result is what ``np.load`` returns: same dtype, flags, base), or a read-only
view of the mapped file in zero-copy mode.

What is direct (everything else goes to the unpickler, one element at a time
never being half-handled):

* an ndarray element: ``GET g1, GET g2, BININT1 0, TUPLE1, GET g3, TUPLE3,
  REDUCE, MARK, BININT1 1, <shape>, GET g4, NEWFALSE|NEWTRUE,
  SHORT_BINBYTES|BINBYTES|BINBYTES8 payload, TUPLE, BUILD`` with FRAME and
  memo-write opcodes anywhere between opcodes, where the memo entries read
  are already known to be the checked ``_reconstruct``, ``ndarray``, ``b'b'``
  and a dtype that passes :func:`~npystream.formats.pickle_safety.check_dtype`
  (``roles``), the dtype holds no objects and has a nonzero item size, the
  shape is non-negative ints and the payload's length is exactly
  ``prod(shape) * itemsize``;
* a scalar element: one of SHORT_BINUNICODE, BINUNICODE, BINUNICODE8,
  SHORT_BINBYTES, BINBYTES, BINBYTES8, BININT1, BININT2, BININT, BINFLOAT,
  NONE, NEWTRUE, NEWFALSE, then only FRAME/memo writes;
* and in both cases: no memo entry the element writes is ever read (the
  liveness table), and the element holds no entry's *last* read (those go
  through the rewriter, which frees the entry's slot).

:func:`direct_run` is the pure-Python implementation (regular expressions and
a tight loop for runs of short strings); ``npystream._speedups.direct_run``
is its C twin with the same contract.  Both build only elements they fully
recognise, in order, and stop at the first one they do not.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

from npystream.formats.pickle_safety import (
    NDARRAY_TOKEN,
    TOKEN_TYPES,
    _real_reconstruct,
)

__all__ = ["ROLE_NONE", "ROLE_RECONSTRUCT", "ROLE_NDARRAY", "ROLE_B", "ROLE_DTYPE", "direct_run", "role_of"]

# what a memo entry read by an ndarray element is
ROLE_NONE, ROLE_RECONSTRUCT, ROLE_NDARRAY, ROLE_B, ROLE_DTYPE = 0, 1, 2, 3, 4

_u2 = struct.Struct("<H").unpack_from
_u4 = struct.Struct("<I").unpack_from
_s4 = struct.Struct("<i").unpack_from
_u8 = struct.Struct("<Q").unpack_from
_f8 = struct.Struct(">d").unpack_from


def role_of(value: Any, checked_dtype: Any) -> tuple[int, Any]:
    """(role, object) of a memo value; ``checked_dtype(d)`` returns the checked copy or raises."""
    t = type(value)
    if t in TOKEN_TYPES and getattr(value, "label", "").endswith("._reconstruct"):
        return ROLE_RECONSTRUCT, value
    if value is NDARRAY_TOKEN or value is np.ndarray:
        return ROLE_NDARRAY, value
    if t is bytes and value == b"b":
        return ROLE_B, value
    if isinstance(value, np.dtype):
        try:
            canon = checked_dtype(value)
        except Exception:
            return ROLE_NONE, None
        if canon.hasobject or not canon.itemsize:
            return ROLE_NONE, None
        return ROLE_DTYPE, canon
    return ROLE_NONE, None


# ---------------------------------------------------------------------------
# the ndarray element as a regular expression (bytes, any byte matches '.')

_S = rb"(?:\x95.{8}|\x94|q.|r.{4})*"  # FRAMEs and memo writes between opcodes
_G = rb"(h.|j.{4})"  # a memo read
_INT = rb"(?:K.|M..|J.{4})"
_SHAPE = (
    rb"(\)|"
    + _INT + _S + rb"\x85|"
    + (_INT + _S) * 2 + rb"\x86|"
    + (_INT + _S) * 3 + rb"\x87|"
    + rb"\(" + _S + rb"(?:" + _INT + _S + rb")*t)"
)
_ARRAY = re.compile(
    _S + _G + _S + _G + _S + rb"K\x00" + _S + rb"\x85" + _S + _G + _S + rb"\x87" + _S + rb"R" + _S
    + rb"\(" + _S + rb"K\x01" + _S + _SHAPE + _S + _G + _S + rb"([\x88\x89])" + _S
    + rb"(C.|B.{4}|\x8e.{8})",
    re.S,
)
_TAIL = re.compile(_S + rb"t" + _S + rb"b" + _S, re.S)
_SEP = re.compile(_S, re.S)
_SHAPE_INT = re.compile(rb"K(.)|M(..)|J(.{4})", re.S)
_SHAPES: dict[bytes, tuple[int, ...] | None] = {}


def _shape(raw: bytes) -> tuple[int, ...] | None:
    """The shape tuple a shape opcode run pushes (None if a dimension is negative)."""
    hit = _SHAPES.get(raw, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    dims = []
    p = 0
    n = len(raw)
    while p < n:
        op = raw[p]
        if op == 0x4B:
            dims.append(raw[p + 1])
            p += 2
        elif op == 0x4D:
            dims.append(_u2(raw, p + 1)[0])
            p += 3
        elif op == 0x4A:
            dims.append(_s4(raw, p + 1)[0])
            p += 5
        elif op == 0x95:
            p += 9
        elif op == 0x71:
            p += 2
        elif op == 0x72:
            p += 5
        else:  # MARK, TUPLE*, EMPTY_TUPLE, MEMOIZE
            p += 1
    shape = tuple(dims) if all(d >= 0 for d in dims) else None
    if len(_SHAPES) > 4096:
        _SHAPES.clear()
    _SHAPES[raw] = shape
    return shape


def _get_index(buf: Any, p: int) -> int:
    return buf[p + 1] if buf[p] == 0x68 else _u4(buf, p + 1)[0]


_STR_OPS = (0x8C, 0x58, 0x8D)
_DIRECT_FIRST = frozenset((0x68, 0x6A, 0x8C, 0x58, 0x8D, 0x43, 0x42, 0x8E, 0x4B, 0x4D, 0x4A, 0x47, 0x4E, 0x88, 0x89))
_SCALAR_OPS = frozenset((0x8C, 0x58, 0x8D, 0x43, 0x42, 0x8E, 0x4B, 0x4D, 0x4A, 0x47, 0x4E, 0x88, 0x89))


def direct_run(
    buf: Any,
    base: int,
    starts: list[int],
    ends: list[int],
    memos: list[int],
    i: int,
    k: int,
    roles: dict[int, tuple[int, Any]],
    live_keys: list[int],
    hot: list[int],
    view_fn: Any,
    out: list[Any],
) -> tuple[int, int]:
    """Build elements ``i, i+1, ...`` (< ``k``) directly while they are recognised; return ``(j, m)``.

    Element j is ``buf[starts[j]-base : ends[j]-base]`` and its first memo
    write has index ``memos[j]``.  ``roles`` maps memo indices to
    :func:`role_of` results; ``live_keys`` are the sorted memo indices ever
    read; ``hot`` the sorted file offsets of last reads that fall in this run.
    ``view_fn(pos, end, shape, dtype, fortran)`` makes a zero-copy array from
    ``buf[pos:end]`` (None: copy into ``bytes`` like numpy).  Built elements
    are appended to ``out``.  ``j`` is the first element not built (``k`` if
    all were); ``m`` is a memo index element j reads whose role is not in
    ``roles`` yet (-1 otherwise): classify it and call again.
    """
    import bisect

    nlive = len(live_keys)
    h = bisect.bisect_left(hot, starts[i]) if hot else 0
    nhot = len(hot)
    append = out.append
    j = i
    while j < k:
        s = starts[j]
        e = ends[j]
        if h < nhot and hot[h] < e:
            return j, -1  # holds a last read: the rewriter frees that entry's slot
        # the first memo index this element may write, and the first live one at or above it
        mlo = memos[j]
        li = bisect.bisect_left(live_keys, mlo) if nlive else 0
        mlive = live_keys[li] if li < nlive else -1
        if mlive >= 0 and (j + 1 >= k or mlive < memos[j + 1]):
            return j, -1  # it writes an entry that is read later (or may: the run's last element)
        p = s - base
        q = e - base
        op = buf[p]
        while op == 0x95 and p + 9 < q:
            p += 9
            op = buf[p]
        if op == 0x68 or op == 0x6A:  # an ndarray element starts with a memo read
            mt = _ARRAY.match(buf, p, q)
            if mt is None:
                return j, -1
            g1, g2, g3, shape_raw, g4, flag, hdr = mt.groups()
            spans = (mt.start(1), mt.start(2), mt.start(3), mt.start(5))
            objs = []
            for gp in spans:
                m = _get_index(buf, gp)
                r = roles.get(m)
                if r is None:
                    return j, m
                objs.append(r)
            if (
                objs[0][0] != ROLE_RECONSTRUCT
                or objs[1][0] != ROLE_NDARRAY
                or objs[2][0] != ROLE_B
                or objs[3][0] != ROLE_DTYPE
            ):
                return j, -1
            dt = objs[3][1]
            shape = _shape(bytes(shape_raw))
            if shape is None:
                return j, -1
            c = hdr[0]
            if c == 0x43:
                n = hdr[1]
            elif c == 0x42:
                n = _u4(hdr, 1)[0]
            else:
                n = _u8(hdr, 1)[0]
            a = mt.end()
            b = a + n
            if b > q:
                return j, -1
            count = 1
            for d in shape:
                count *= d
            if count * dt.itemsize != n:
                return j, -1
            tail = _TAIL.match(buf, b, q)
            if tail is None or tail.end() != q:
                return j, -1
            fortran = flag == b"\x88"
            if view_fn is not None:
                arr = view_fn(a, b, shape, dt, fortran)
            else:
                arr = _real_reconstruct(np.ndarray, (0,), b"b")
                arr.__setstate__((1, shape, dt, fortran, bytes(buf[a:b])))
            append(arr)
            j += 1
            continue
        if op not in _SCALAR_OPS:
            return j, -1
        if op == 0x8C and p == s - base:
            # runs of short strings: SHORT_BINUNICODE n data [MEMOIZE], the commonest scalar
            lim = bisect.bisect_right(starts, hot[h], j, k) - 1 if h < nhot else k
            if mlive >= 0:  # stop before the element that may write the next live memo entry
                lim = min(lim, bisect.bisect_right(memos, mlive, j, k) - 1)
            j0 = j
            while j < lim:
                r0 = starts[j] - base
                r1 = ends[j] - base
                if buf[r0] != 0x8C:
                    break
                t = r0 + 2 + buf[r0 + 1]
                if t != r1 and not (t + 1 == r1 and buf[t] == 0x94):
                    break
                try:
                    append(str(buf[r0 + 2 : t], "utf-8", "surrogatepass"))
                except UnicodeDecodeError:
                    break  # the unpickler reports it, with the element's offset
                j += 1
            if j != j0:
                continue
        # one scalar opcode, then nothing but FRAMEs and memo writes
        if op in _STR_OPS or op == 0x43 or op == 0x42 or op == 0x8E:
            if op == 0x8C or op == 0x43:
                a = p + 2
                n = buf[p + 1]
            elif op == 0x58 or op == 0x42:
                a = p + 5
                n = _u4(buf, p + 1)[0]
            else:
                a = p + 9
                n = _u8(buf, p + 1)[0]
            b = a + n
            if b > q:
                return j, -1
            if op in _STR_OPS:
                try:
                    value: Any = str(buf[a:b], "utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    return j, -1  # the unpickler reports it, with the element's offset
            else:
                value = bytes(buf[a:b])
        elif op == 0x4B:
            b = p + 2
            value = buf[p + 1]
        elif op == 0x4D:
            b = p + 3
            value = _u2(buf, p + 1)[0]
        elif op == 0x4A:
            b = p + 5
            value = _s4(buf, p + 1)[0]
        elif op == 0x47:
            b = p + 9
            value = _f8(buf, p + 1)[0]
        else:
            b = p + 1
            value = None if op == 0x4E else op == 0x88
        if b > q:
            return j, -1
        if b != q:
            sep = _SEP.match(buf, b, q)
            if sep is None or sep.end() != q:
                return j, -1
        append(value)
        j += 1
    return j, -1
