"""Streaming writer of object-dtype ``.npy`` files that ``np.load(allow_pickle=True)`` reads.

What ``np.save`` writes for a 1-D object array of ``n`` elements (numpy 2.x,
pickle protocol 4)::

    header      numpy's .npy 1.0 header, {'descr': '|O', 'fortran_order': False,
                'shape': (n,), } plus 21 - len(str(n)) spaces of growth room,
                padded with spaces to a multiple of 64 bytes, ending in b"\\n"
    pickle      PROTO 4, FRAMEs of ~64 KiB (payloads >= 64 KiB written outside
                frames), then
                  GLOBAL numpy._core.multiarray._reconstruct
                  (GLOBAL numpy.ndarray, (0,), b'b') REDUCE          -> empty array
                  MARK 1, (n,), dtype('O') [its own REDUCE+BUILD], False,
                       EMPTY_LIST MEMOIZE
                         MARK e0 ... e999 APPENDS   (batches of 1000; a list of
                         MARK e1000 ...   APPENDS    exactly one element is
                         ...                         "e0 APPEND" instead)
                  TUPLE BUILD STOP

The elements share one pickle memo, so an object pickled earlier (the
``float32`` dtype, ``b'b'``, the ``_reconstruct`` global, an element seen
twice) is written as a back-reference (``BINGET``) the second time.

How this module streams it with bounded memory
-----------------------------------------------
We drive the standard library's pure-Python pickler (``pickle._Pickler``)
with three changes, each needed to produce numpy's bytes without holding the
elements:

1. the top-level array is a stand-in object whose reduce value is exactly
   ``ndarray.__reduce__``'s, except that its state list is a stand-in whose
   items come from the user's iterable, one at a time;
2. lists and dicts are batched the way CPython's C pickler does for exact
   lists/dicts (which numpy uses): ``MARK ... APPENDS`` for every batch when
   there is more than one item, even a last batch of one;
3. the memo numbers its entries with a counter instead of ``len(memo)``, so
   entries can be *dropped*: after each element, memo entries whose object is
   referenced by nothing but the memo are removed.  Such an object can never
   be met again (nothing else holds it), so dropping it changes no byte of the
   output, and memory stays bounded by one element plus what the caller keeps
   alive;
4. a contiguous ndarray element of 256 bytes or more (dtype without objects,
   protocols 3/4) is reduced by hand to exactly ``ndarray.__reduce__``'s
   value, except that the raw data is a view of the array's memory instead of
   a ``tobytes()`` copy (smaller payloads take numpy's path: CPython shares the
   empty and one-byte ``bytes`` objects, which the memo turns into
   back-references).

The output is byte-identical to ``np.save`` for the same elements (tested).

Unknown length
--------------
With ``length=None`` the element count appears twice before the elements:
in the text header (numpy's 21-digit growth room lets us patch it in place)
and in the pickle's state tuple, where an int's encoding width depends on
its value.  We reserve the widest form (``LONG1`` with 8 bytes) and at the
end rewrite the start of the file: the pickle int in its natural (numpy)
form, the first FRAME's length reduced accordingly, and the ``k`` freed bytes
absorbed as extra spaces in the text header.  The file is then exactly
``np.save``'s except for those ``k`` padding spaces (so its data offset is
not 64-aligned; pickled data never needs alignment and numpy does not check).

The file is written under a temporary name beside ``path`` and renamed into
place only when complete; on any error nothing is left behind.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from collections.abc import Iterable
from itertools import islice
from typing import Any

import numpy as np

from npystream._atomic import atomic_output
from npystream.formats.npy import encode_header

__all__ = ["save_objects", "object_npy_header"]

_BATCH = 1000
_OBJECT = np.dtype(object)
_RESERVED_INT = 10  # LONG1 opcode + 1 length byte + 8 payload bytes


def object_npy_header(length: int, *, extra_pad: int = 0) -> bytes:
    """numpy's own .npy header for a 1-D object array of ``length`` elements.

    Same text, growth room and padding as ``np.save`` (``extra_pad`` more
    spaces before the newline, for the unknown-length rewrite).
    """
    return encode_header(_OBJECT, (int(length),), extra_pad=extra_pad)


def _encode_int(proto: int, value: int) -> bytes:
    buf = io.BytesIO()
    p = pickle._Pickler(buf, proto)  # type: ignore[attr-defined]
    p.save_long(value)
    return buf.getvalue()


class _Reserved:
    """The element count when not known yet: written as a fixed-width placeholder."""


class _Payload:
    """An array's raw data as a memoryview, pickled exactly like the ``bytes`` numpy would make."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


class _StandInArray:
    """Pickled exactly like a 1-D object ndarray whose elements come from an iterator."""


class _StandInList:
    """The state list of :class:`_StandInArray`: items streamed from ``items``."""

    def __init__(self, first: list[Any], rest: Any) -> None:
        self.first = first  # up to two elements already pulled (to know if n == 1)
        self.rest = rest


class _StreamPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """``pickle._Pickler`` that batches like the C pickler and can forget dead memo entries."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol)
        self._next_memo = 0
        self._recent: list[int] = []
        self._kept: list[int] = []
        self._kept_check = 1024
        self.count = 0
        self.reserved_pos: tuple[str, int] | None = None  # where the reserved count is (length=None)
        self.reduce_value: Any = None
        self._reconstruct: Any = None
        self._tell: Any = None

    # -- a leaner save() for the common cases ---------------------------------
    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        """``pickle._Pickler.save`` without the persistent-id and reducer-override lookups
        (neither is used here) for objects seen before or with a dispatch entry."""
        self.framer.commit_frame()
        x = self.memo.get(id(obj))
        if x is not None:
            self.write(self.get(x[0]))
            return
        f = self.dispatch.get(type(obj))
        if f is not None:
            f(self, obj)
            return
        super().save(obj, save_persistent_id)

    # -- memo with a counter (so entries can be dropped) -------------------
    def memoize(self, obj: Any) -> None:
        if self.fast:
            return
        idx = self._next_memo
        self._next_memo += 1
        self.write(self.put(idx))
        key = id(obj)
        self.memo[key] = idx, obj
        self._recent.append(key)

    def _drop_unreferenced(self, keys: Any) -> list[int]:
        """Delete the memo entries of ``keys`` whose object nothing else holds; return the rest."""
        memo = self.memo
        getrefcount = sys.getrefcount
        survivors = []
        for key in keys:
            entry = memo.get(key)
            if entry is None:
                continue
            # references: the memo's tuple, `entry[1]` below as an argument
            if getrefcount(entry[1]) <= 2:
                del memo[key]
            else:
                survivors.append(key)
        return survivors

    def _prune(self) -> None:
        """Drop memo entries nothing else references (they cannot be met again)."""
        recent = self._recent
        # Two passes, newest first: a tuple is memoized after its items and a list
        # before them, so one order frees each kind of container before its contents.
        for _ in range(2):
            recent = self._drop_unreferenced(reversed(recent))
        self._kept.extend(recent)
        self._recent = []
        if len(self._kept) > self._kept_check:
            self._kept = self._drop_unreferenced(self._kept)
            self._kept_check = max(1024, 2 * len(self._kept))

    # -- C-pickler batching for exact lists and dicts ------------------------
    def save_list(self, obj: list[Any]) -> None:
        self.write(pickle.EMPTY_LIST if self.bin else pickle.MARK + pickle.LIST)
        self.memoize(obj)
        if not self.bin:
            for x in obj:
                self.save(x)
                self.write(pickle.APPEND)
            return
        if len(obj) == 1:
            self.save(obj[0])
            self.write(pickle.APPEND)
            return
        save, write = self.save, self.write
        for start in range(0, len(obj), _BATCH):
            write(pickle.MARK)
            for x in obj[start : start + _BATCH]:
                save(x)
            write(pickle.APPENDS)

    dispatch[list] = save_list

    def save_dict(self, obj: dict[Any, Any]) -> None:
        self.write(pickle.EMPTY_DICT if self.bin else pickle.MARK + pickle.DICT)
        self.memoize(obj)
        items = list(obj.items())
        if not self.bin:
            for k, v in items:
                self.save(k)
                self.save(v)
                self.write(pickle.SETITEM)
            return
        if len(items) == 1:
            self.save(items[0][0])
            self.save(items[0][1])
            self.write(pickle.SETITEM)
            return
        save, write = self.save, self.write
        for start in range(0, len(items), _BATCH):
            write(pickle.MARK)
            for k, v in items[start : start + _BATCH]:
                save(k)
                save(v)
            write(pickle.SETITEMS)

    dispatch[dict] = save_dict

    # -- the streamed array --------------------------------------------------
    def save_reserved(self, obj: _Reserved) -> None:
        frame = self.framer.current_frame
        # (where, position): inside the current (first) frame's buffer, or in the file
        self.reserved_pos = ("frame", frame.tell()) if frame is not None else ("file", self._tell())
        self.write(pickle.LONG1 + b"\x08" + b"\x00" * 8)

    dispatch[_Reserved] = save_reserved

    def save_standin_array(self, obj: _StandInArray) -> None:
        func, args, state = self.reduce_value
        self.reduce_value = None
        self.save_reduce(func, args, state, obj=obj)

    dispatch[_StandInArray] = save_standin_array

    def save_standin_list(self, obj: _StandInList) -> None:
        self.write(pickle.EMPTY_LIST)
        self.memoize(obj)
        save, write, prune = self.save, self.write, self._prune
        first, rest = obj.first, obj.rest
        obj.first = []
        if not first:
            return
        if len(first) == 1:  # exactly one element: numpy writes "e0 APPEND"
            save(first.pop())
            self.count = 1
            prune()
            write(pickle.APPEND)
            return
        it = _drain(first, rest)
        del first
        x = next(it, _END)
        count = 0
        while x is not _END:
            write(pickle.MARK)
            n = 0
            while True:
                save(x)
                n += 1
                count += 1
                x = next(it, _END)
                prune()
                if x is _END or n == _BATCH:
                    break
            write(pickle.APPENDS)
        self.count = count

    dispatch[_StandInList] = save_standin_list

    # -- ndarray elements without the tobytes() copy ---------------------------
    def save_ndarray(self, obj: np.ndarray) -> None:
        """An exact ``np.ndarray``: what ``save_reduce(*obj.__reduce_ex__(proto))`` writes.

        For contiguous arrays of a dtype without objects (protocols 3 and 4) the
        state's raw data is written straight from the array's memory instead of
        a ``tobytes()`` copy; the opcodes, memo numbering and framing are the
        same (tested byte for byte against ``np.save``).
        """
        flags = obj.flags
        # (small payloads go the generic way: CPython shares b"" and 1-byte bytes objects,
        # which the pickle memo then turns into back-references)
        if (self.proto in (3, 4) and obj.nbytes >= 256 and not obj.dtype.hasobject
                and (flags.c_contiguous or flags.f_contiguous)):
            is_f = bool(flags.f_contiguous and not flags.c_contiguous)
            data = obj.T if is_f else obj
            payload = _Payload(memoryview(data.reshape(-1).view(np.uint8)))
            state = (1, obj.shape, obj.dtype, is_f, payload)
            if self._reconstruct is None:
                self._reconstruct = _reconstruct_global()
            self.save_reduce(self._reconstruct, (np.ndarray, tuple([0]), b"b"), state, obj=obj)
            return
        self.save_reduce(*obj.__reduce_ex__(self.proto), obj=obj)

    dispatch[np.ndarray] = save_ndarray

    def save_payload(self, obj: _Payload) -> None:
        """``save_bytes`` (protocol >= 3) for the raw data of an array, from its memory."""
        data = obj.data
        n = len(data)
        if n <= 0xFF:
            self.write(pickle.SHORT_BINBYTES + struct.pack("<B", n) + data)
        elif n > 0xFFFFFFFF and self.proto >= 4:
            self._write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", n), data)
        elif n >= self.framer._FRAME_SIZE_TARGET:
            self._write_large_bytes(pickle.BINBYTES + struct.pack("<I", n), data)
        else:
            self.write(pickle.BINBYTES + struct.pack("<I", n) + data)
        self.memoize(obj)

    dispatch[_Payload] = save_payload


_END = object()


def _drain(first: list[Any], rest: Any) -> Any:
    """Yield the pre-pulled elements (releasing them as they go), then the rest."""
    while first:
        yield first.pop(0)
    yield from rest


def _reconstruct_global() -> Any:
    return np.empty(0, dtype=object).__reduce__()[0]




def save_objects(
    path: str | os.PathLike[str],
    iterable: Iterable[Any],
    *,
    length: int | None = None,
    protocol: int | None = None,
    overwrite: bool = True,
    durable: bool = False,
) -> int:
    """Write the items of ``iterable`` as a 1-D object ``.npy`` that ``np.load(allow_pickle=True)`` reads.

    Streaming: memory is bounded by one element (plus what the caller keeps
    alive), whatever the count.  With ``length`` given, the output is
    byte-identical to ``np.save(path, arr)`` for an object array of the same
    elements; with ``length=None`` the count is patched in at the end.
    ``protocol`` is the pickle protocol (default 4, what numpy 2 writes;
    2 to 5 accepted).  Written atomically (temporary file, then rename);
    ``durable=True`` also fsyncs the file before the rename (like ``np.save``,
    the default leaves flushing to the OS).  Returns the number of elements
    written.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> save_objects(p, (np.arange(i, dtype=np.float32) for i in range(3)))
    3
    >>> [a.tolist() for a in np.load(p, allow_pickle=True)]
    [[], [0.0], [0.0, 1.0]]
    """
    proto = 4 if protocol is None else protocol
    if not isinstance(proto, int) or isinstance(proto, bool) or not 2 <= proto <= 5:
        raise ValueError(f"protocol must be an int from 2 to 5 (numpy writes 4, numpy 1.x 3), got {protocol!r}")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        raise ValueError(f"length must be a non-negative int or None, got {length!r}")
    it = iter(iterable)
    dst = os.fspath(path)
    with atomic_output(dst, overwrite=overwrite) as tmp, open(tmp, "w+b", buffering=1 << 20) as f:
        count = _write(f, it, length, proto)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    return count


def _write(f: Any, it: Any, length: int | None, proto: int) -> int:
    header = object_npy_header(length if length is not None else 0)
    f.write(header)
    base = f.tell()
    p = _StreamPickler(f, proto)
    p._tell = f.tell
    first = list(islice(it, 2))
    shape_dim: Any = length if length is not None else _Reserved()
    p.reduce_value = (
        _reconstruct_global(),
        (np.ndarray, (0,), b"b"),
        (1, (shape_dim,), np.dtype(object), False, _StandInList(first, it)),
    )
    del first
    # pickle._Pickler.dump, inlined so the first frame's position is known
    p.write(pickle.PROTO + struct.pack("<B", proto))
    frame_pos = None
    if proto >= 4:
        p.framer.start_framing()
        frame_pos = f.tell()
    p.save(_StandInArray())
    p.write(pickle.STOP)
    p.framer.end_framing()
    count = p.count
    if length is not None:
        if count != length:
            raise ValueError(
                f"length={length} was given but the iterable yielded {count} elements; "
                "pass the true count or length=None"
            )
        return count
    _patch_count(f, p, count, base, frame_pos)
    return count


def _patch_count(f: Any, p: _StreamPickler, count: int, base: int, frame_pos: int | None) -> None:
    """Replace the reserved 10-byte count with numpy's encoding; absorb the slack in the header."""
    f.flush()
    natural = _encode_int(p.proto, count)
    slack = _RESERVED_INT - len(natural)
    kind, pos = p.reserved_pos  # type: ignore[misc]
    if kind == "frame":
        f.seek(frame_pos)
        head = f.read(9)
        if head[:1] != pickle.FRAME:  # pragma: no cover - the first frame always holds the prefix
            raise RuntimeError("internal error: first frame not found where expected")
        (flen,) = struct.unpack("<Q", head[1:9])
        int_pos = frame_pos + 9 + pos
        frame_data = _read_at(f, frame_pos + 9, pos)
        new = (
            object_npy_header(count, extra_pad=slack)
            + _read_at(f, base, frame_pos - base)
            + pickle.FRAME
            + struct.pack("<Q", flen - slack)
            + frame_data
            + natural
        )
    else:
        int_pos = pos
        new = object_npy_header(count, extra_pad=slack) + _read_at(f, base, int_pos - base) + natural
    if len(new) != int_pos + _RESERVED_INT:  # pragma: no cover - arithmetic guard
        raise RuntimeError(f"internal error: rewritten prefix is {len(new)} bytes, expected {int_pos + 10}")
    f.seek(0)
    f.write(new)
    f.seek(0, os.SEEK_END)


def _read_at(f: Any, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)
