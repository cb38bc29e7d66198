"""The ragged store: many arrays of different lengths in plain, memory-mappable ``.npy`` parts.

Layout, version 1
=================

A store is a directory, conventionally named ``NAME.ragged``.  It MUST hold
these files and SHOULD hold nothing else (readers ignore other names)::

    NAME.ragged/
        meta.json     what the store holds and how many elements are committed
        values.npy    the flat values: every element, C order, one after another
        offsets.npy   int64, little-endian, shape (n + 1,): element i is
                      values[offsets[i]:offsets[i + 1]]
        shapes.npy    int64, little-endian, shape (n, ndim): only when ndim >= 2

Every part is a plain ``.npy`` file (format 1.0, or 2.0/3.0 only when the
dtype description does not fit 1.0) that ``np.load(part, mmap_mode='r')``
opens without npystream.  Each part's preamble (magic, version, header
length, header dict, space padding, ``\\n``) is a multiple of 64 bytes long,
so the data of every part starts 64-byte aligned.  The header has room for
the shape to grow in place: writers rewrite it with the same length.

``values.npy``
    1-D, of the store's value dtype, ``fortran_order: False``.  For
    ``kind == "array"`` it is the elements' dtype exactly as written (both
    byte orders are kept; structured, datetime, string and void dtypes are
    fine; dtypes that hold Python objects are not).  Each element is stored
    flattened in C order; elements of fixed trailing shape (k_i, a, b) are
    therefore byte-identical to their concatenation along the first axis.
    For ``str`` (UTF-8), ``bytes`` and ``object`` (one pickle per element,
    written with cloudpickle) the dtype is ``|u1`` and offsets count bytes.
    Readers load an object element with the ``.npy`` reader's scanner and
    safe unpickler (``pickle_walk.load_pickle``): one object, nothing after
    its STOP, the same limits.
``offsets.npy``
    1-D ``<i8`` of length n + 1: ``offsets[0] == 0``, non-decreasing,
    ``offsets[n] == meta["nitems"]``; offsets count items of the value dtype.
``shapes.npy``
    2-D ``<i8`` of shape (n, ndim), present only when ndim >= 2.  Row i is
    element i's shape; its product is ``offsets[i + 1] - offsets[i]``.  For
    ndim 1 the shape is ``(length,)``; for ndim 0 it is ``()`` (one item).
``meta.json``
    A JSON object, UTF-8::

        {"format": "npystream.ragged", "version": 1, "kind": "array",
         "dtype": "<f4", "ndim": 1, "count": 200000, "nitems": 201000000}

    ``kind`` is one of ``"array"``, ``"str"``, ``"bytes"``, ``"object"``;
    ``dtype`` is numpy's ``.npy`` description of the value dtype
    (``numpy.lib.format.dtype_to_descr``: a string such as ``">f8"`` or, for
    structured dtypes, a list of ``[name, descr]`` / ``[name, descr, shape]``
    lists); ``ndim`` is the elements' ndim (1 for str/bytes/object);
    ``count`` is the number n of committed elements and ``nitems`` the
    number of committed value items.  Readers MUST refuse a ``format`` other
    than ``"npystream.ragged"`` and a ``version`` they do not know.

Every file of a store is a regular file inside it: readers refuse symlinks,
FIFOs and directories in their place.

``meta.json`` is the single source of truth.  The parts MAY be longer than
it says (data of an interrupted write; the header shape may then exceed
``count``), never shorter.  A reader takes ``count`` and ``nitems`` from
``meta.json``, checks each part's header (magic, dtype, order, a shape that holds at
least what ``meta.json`` publishes) and size,
maps exactly ``(count + 1) * 8`` bytes of offsets and ``nitems`` values, and
checks that the offsets start at 0, never decrease and end at ``nitems``
(and that each shape's product is its element's length).

Commit protocol (crash safety)
==============================

A writer copies elements into a buffer of a few MiB (``buffer_size``, 4 MiB)
and writes it to ``values.npy`` when full.  It commits once ``commit_bytes``
(64 MiB) of values or 65,536 elements are uncommitted, and on ``flush()`` and
``close()``:

1. write the buffered values, then the new offsets (and shapes) after the
   committed end of each part (``pwrite``; nothing committed is rewritten);
2. ``fsync`` the parts (skipped with ``durable=False``);
3. rewrite each part's header in place with the new shape (same length);
4. write ``meta.json.tmp``, ``fsync`` it, ``os.replace`` it over
   ``meta.json``, ``fsync`` the directory (fsyncs skipped with
   ``durable=False``).

So data is on disk before the offsets that point at it, and both before the
count that publishes them.  A reader that opens the store at any instant, or
after the writer was killed at any instant (SIGKILL), sees the last
published ``meta.json``: a consistent prefix of fully written elements.
``durable=False`` keeps that guarantee against a killed process (the page
cache survives it) but not against a power loss.

A new store is built in a hidden temporary directory beside the target and
renamed into place once it holds its empty parts and ``meta.json``, so the
target path never names a half-created store (a killed creator may leave
the hidden ``.NAME.tmp-*`` directory behind, or ``.NAME.old-*`` holding the
store it was replacing; each is flock-ed by its creator, and the next
creation of NAME removes those whose lock is free and that are older than
10 s).  ``mode='w'`` over an existing
store moves the old store aside and deletes it after the rename.
``mode='a'`` opens an existing store, rewrites each part's header with the
committed shape, then truncates each part to the committed length (dropping
the tail of an interrupted write; in this order a header never claims more
than its file holds) and continues.  A writer holds an exclusive ``flock`` on the store directory;
a second writer gets a clear error.  Readers take no lock and open every part
relative to one directory handle, so a store replaced while opening is never
mixed with its successor.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import mmap
import operator
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from npystream._accel import speedups
from npystream.errors import (
    CastError,
    FormatError,
    NpyStreamError,
    StoreNotFoundError,
    TruncatedError,
    UnsupportedError,
)
from npystream.formats.npy import ARRAY_ALIGN, encode_header, header_room

try:  # pragma: no cover - always present on Linux/macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RaggedArray", "RaggedWriter", "save_ragged", "describe_store", "FORMAT_NAME", "FORMAT_VERSION",
    "KINDS",
]

FORMAT_NAME = "npystream.ragged"
FORMAT_VERSION = 1
KINDS = ("array", "str", "bytes", "object")
META = "meta.json"
VALUES = "values.npy"
OFFSETS = "offsets.npy"
SHAPES = "shapes.npy"
_U1 = np.dtype("|u1")
_I8 = np.dtype("<i8")
_LITTLE = sys.byteorder == "little"
# meta.json is tiny; a bigger one is not ours (and is not worth parsing).
_MAX_META = 1 << 20
# A header dict we cannot parse twice in a row is corrupt, not a torn read of
# a concurrent in-place rewrite (which lasts microseconds).
_HEADER_RETRIES = 3
_CASTINGS = ("no", "equiv", "safe", "same_kind", "unsafe")
# Elements buffered before a commit at the latest: bounds the pending offsets list.
_MAX_PENDING = 65536
# Writes the C write-behind helper may have queued (slack for the jitter of both threads' speeds:
# the 2 GB conversion benchmark, 3 fresh processes each, 0.70-0.77 s with 3 vs 0.83-1.0 s with 1).
_DEPTH = 3
# copy_file_range errors that mean "not here" (other file systems, old kernels, special
# files): RaggedWriter.append_from_file then writes the element from memory instead.
_NO_COPY_RANGE = frozenset(
    getattr(errno, name) for name in
    ("EXDEV", "ENOSYS", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "EBADF", "EPERM", "ETXTBSY", "EOVERFLOW")
    if hasattr(errno, name)
)


# --------------------------------------------------------------------------- #
# kinds: what reading an element back gives
# --------------------------------------------------------------------------- #

# kind -> the type every element of a store of that kind reads back as ('object': anything)
KIND_TYPES: dict[str, type] = {"array": np.ndarray, "str": str, "bytes": bytes}


def kind_for(x: Any) -> str:
    """The store kind that gives ``x`` back as it is: 'array', 'str', 'bytes' or 'object'."""
    if type(x) is np.ndarray and not x.dtype.hasobject:
        return "array"
    return {str: "str", bytes: "bytes"}.get(type(x), "object")


class KindMismatch(CastError):
    """An element a store's kind would change (a list or a numpy scalar in a store of arrays...)."""


def check_kind(x: Any, index: int, kind: str | None, *, path: str, given: bool) -> None:
    """Raise :class:`KindMismatch` if a store of ``kind`` would not give ``x`` back as it is."""
    want = KIND_TYPES.get(kind or "")
    if want is not None and type(x) is not want:
        if isinstance(x, np.ndarray):
            what = f"a {type(x).__name__} of dtype {x.dtype} and {x.ndim} dimensions"
        else:
            what = f"a {type(x).__module__}.{type(x).__qualname__}".replace("builtins.", "")
        origin = "given" if given else "chosen from element 0"
        raise KindMismatch(
            f"{what}, which a ragged store of kind {kind!r} ({origin}) would not give back as it is; pass "
            "kind='object' (`npystream convert --kind object`) to store every element pickled, as it is",
            path=path, index=index,
        )


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _descr_to_json(dtype: np.dtype) -> Any:
    descr = np.lib.format.dtype_to_descr(dtype)
    return json.loads(json.dumps(descr))


def _json_to_descr(obj: Any) -> Any:
    """JSON lists back to the tuples ``descr_to_dtype`` expects."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, list):
        fields = []
        for field in obj:
            if not isinstance(field, list) or len(field) not in (2, 3):
                raise ValueError(f"bad field {field!r}")
            name = tuple(field[0]) if isinstance(field[0], list) else field[0]
            sub = _json_to_descr(field[1])
            if len(field) == 3:
                fields.append((name, sub, tuple(field[2])))
            else:
                fields.append((name, sub))
        return fields
    raise ValueError(f"bad dtype description {obj!r}")


def _dtype_from_meta(obj: Any, path: str) -> np.dtype:
    try:
        return np.lib.format.descr_to_dtype(_json_to_descr(obj))
    except Exception as exc:  # numpy raises many kinds for bad descrs
        raise FormatError(
            f"meta.json 'dtype' {obj!r} is not a numpy dtype description ({exc})", path=path
        ) from None


def meta_bytes(kind: Any, dtype: np.dtype, ndim: Any, count: int, nitems: int) -> bytes:
    """The ``meta.json`` a writer publishes for ``count`` elements of ``nitems`` items (exact bytes)."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "dtype": _descr_to_json(dtype),
        "ndim": ndim,
        "count": count,
        "nitems": nitems,
    }
    return (json.dumps(meta) + "\n").encode("utf-8")


def part_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a part of ``shape``, with the length a writer reserves when it creates the store.

    Writers size each part's header for any shape at creation and rewrite it
    in place; a store assembled at once gets the very same bytes.
    """
    return _encode_part_header(dtype, shape, len(_encode_part_header(dtype, shape, None)))


def _open_at(dir_fd: int, name: str, flags: int, mode: int = 0o644) -> int:
    return os.open(name, flags, mode, dir_fd=dir_fd)


def _open_part(dir_fd: int, name: str, path: str) -> int:
    """Open a store file for reading: a regular file inside the store, never a symlink, FIFO or directory.

    ``O_NOFOLLOW`` refuses a symlink (which could point out of the store, or
    at itself); ``O_NONBLOCK`` keeps a FIFO from blocking the open, and the
    ``fstat`` check refuses it and anything else that is not a regular file.
    ``FileNotFoundError`` passes through (callers say which part is missing).
    """
    full = os.path.join(path, name)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FormatError(
                f"{name!r} is a symbolic link; a store's files must be regular files inside it "
                "(copy the target into the store)",
                path=full,
            ) from exc
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise FormatError(f"{name!r} is {what}; a store's files must be regular files", path=full)
    return fd


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        offset += done
        view = view[done:]


def _encode_part_header(dtype: np.dtype, shape: tuple[int, ...], total: int | None) -> bytes:
    """A ``.npy`` preamble for a C-ordered part, ``total`` bytes long; ``total=None`` sizes it for any shape.

    The returned preamble is a multiple of 64 bytes.  With ``total=None`` the
    length fits the largest int64 in every dimension, so later rewrites with
    ``total=len(first)`` always fit in place.
    """
    if total is None:
        total = header_room(dtype, len(shape))
    try:
        return encode_header(dtype, shape, grow=False, size=total)
    except ValueError:  # pragma: no cover - guarded by header_room
        raise UnsupportedError("the .npy header outgrew its reserved room") from None


def _read_part_header(dir_fd: int, name: str, path: str) -> tuple[Any, int]:
    """Parse a part's header; return (NpyHeader-like, file size). Retries a torn read."""
    from npystream.formats.npy import read_header

    full = os.path.join(path, name)
    last: Exception | None = None
    for attempt in range(_HEADER_RETRIES):
        try:
            fd = _open_part(dir_fd, name, path)
        except FileNotFoundError:
            raise FormatError(
                f"part {name!r} is missing from the store; expected {VALUES}, {OFFSETS} "
                f"(and {SHAPES} when ndim >= 2) beside {META}",
                path=path,
            ) from None
        try:
            with open(fd, "rb", closefd=False) as fh:
                header = read_header(fh)
            size = os.fstat(fd).st_size
        except TruncatedError:
            raise
        except FormatError as exc:
            last = exc
            time.sleep(0.001 * (attempt + 1))
            continue
        finally:
            os.close(fd)
        return header, size
    if isinstance(last, FormatError):
        raise FormatError(f"part {name!r} has a bad .npy header: {last.message}", path=full,
                          offset=last.offset) from None
    raise FormatError(f"part {name!r} cannot be read", path=full)  # pragma: no cover


def _lock_dir(dir_fd: int, path: str) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise NpyStreamError(
                "another RaggedWriter is writing this store; close it first (one writer at a time)",
                path=path,
            ) from None
        raise


# A creator's hidden directory younger than this is never swept, locked or not (it may be
# between its mkdtemp and its lock).
_STALE_AGE = 10.0


def _sweep_stale(parent: str, name: str) -> None:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` directories that a killed creator left beside a store.

    Each is locked (flock) by its creator while it exists, and the lock dies
    with the process: one whose lock is free and that is older than
    ``_STALE_AGE`` seconds is a leftover.  Best effort, never an error;
    nothing is swept where flock is missing (Windows).
    """
    if fcntl is None:  # pragma: no cover - Windows
        return
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    now = time.time()
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefixes)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or now - entry.stat(follow_symlinks=False).st_mtime < _STALE_AGE:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its creator is alive
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _is_locked(path: str) -> bool:
    if fcntl is None:  # pragma: no cover
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- #
# safe unpickling for kind="object"
# --------------------------------------------------------------------------- #

# The object stream's safety layer (npystream.formats.pickle_safety): the same
# allow-list, checked numpy callables and placeholders as iter_objects/ObjectArray.


def _make_policy(safe: bool, allowed_globals: Any) -> Any:
    from npystream.formats.pickle_safety import SafetyPolicy

    return SafetyPolicy.make(trusted=not safe, allowed_globals=allowed_globals)


def _loads_policy(data: Any, policy: Any) -> Any:
    """One element's pickle, through the ``.npy`` reader's scanner, limits and safe unpickler."""
    from npystream.formats.pickle_walk import load_pickle

    return load_pickle(data, policy)


# --------------------------------------------------------------------------- #
# reader
# --------------------------------------------------------------------------- #


class _Store:
    """The mapped parts of one opened store (shared by a RaggedArray and its views)."""

    __slots__ = (
        "path", "kind", "dtype", "ndim", "count", "nitems", "values", "offsets_np",
        "offsets_mv", "shapes_np", "shapes_mv", "bytes_mv", "maps", "parts",
    )


def _map_part(dir_fd: int, name: str, path: str, dtype: np.dtype, items: int, header: Any,
              size: int) -> tuple[np.ndarray, mmap.mmap | None]:
    need = header.data_offset + items * dtype.itemsize
    if size < need:
        raise TruncatedError(
            f"part {name!r} is {size} bytes, expected at least {need} "
            f"({items} items of {dtype.str} after a {header.data_offset}-byte header); "
            "the store was truncated or its data lost",
            path=os.path.join(path, name),
            offset=size,
        )
    if items == 0 or dtype.itemsize == 0:
        return np.empty(0, dtype=dtype), None
    fd = _open_part(dir_fd, name, path)
    try:
        mm = mmap.mmap(fd, need, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    arr = np.frombuffer(mm, dtype=dtype, count=items, offset=header.data_offset)
    return arr, mm


def _load_meta(dir_fd: int, path: str) -> dict[str, Any]:
    try:
        fd = _open_part(dir_fd, META, path)
    except FileNotFoundError:
        raise FormatError(
            f"not a ragged store: {META} is missing (a directory written by "
            "npystream.save_ragged / RaggedWriter has one)",
            path=path,
        ) from None
    with open(fd, "rb") as fh:
        raw = fh.read(_MAX_META + 1)
    if len(raw) > _MAX_META:
        raise FormatError(f"{META} is over {_MAX_META} bytes; not a ragged store's metadata", path=path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{META} is not valid JSON ({exc}); the store is corrupt", path=path) from None
    except (RecursionError, ValueError) as exc:  # nested too deep; an int of more than 4300 digits
        raise FormatError(
            f"{META} cannot be read as a store's metadata ({type(exc).__name__}: {str(exc)[:120]})",
            path=path,
        ) from exc
    if not isinstance(meta, dict):
        raise FormatError(f"{META} holds a {type(meta).__name__}, expected an object", path=path)
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{META} 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}", path=path
        )
    version = meta.get("version")
    if type(version) is not int or version != FORMAT_VERSION:  # True == 1 in Python
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UnsupportedError(
                f"ragged store version {version} is newer than this npystream reads "
                f"({FORMAT_VERSION}); upgrade npystream",
                path=path,
            )
        raise FormatError(f"{META} 'version' is {version!r}, expected {FORMAT_VERSION}", path=path)
    for key in ("count", "nitems", "ndim"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FormatError(f"{META} {key!r} is {v!r}, expected a non-negative int", path=path)
    if meta.get("kind") not in KINDS:
        raise FormatError(f"{META} 'kind' is {meta.get('kind')!r}, expected one of {KINDS}", path=path)
    if meta["ndim"] > 64:
        raise FormatError(f"{META} 'ndim' is {meta['ndim']}, over numpy's limit of 64", path=path)
    return meta


def _check_header(header: Any, name: str, path: str, dtype: np.dtype, ndim: int,
                  second: int | None = None) -> None:
    full = os.path.join(path, name)
    if header.dtype != dtype:
        raise FormatError(
            f"part {name!r} has dtype {header.dtype.str!r}, but {META} says {dtype.str!r}",
            path=full,
        )
    if header.fortran_order:
        raise FormatError(f"part {name!r} is Fortran-ordered; ragged parts are C-ordered", path=full)
    if len(header.shape) != ndim:
        raise FormatError(
            f"part {name!r} has shape {header.shape}, expected {ndim} dimension(s)", path=full
        )
    if header.data_offset % ARRAY_ALIGN:
        raise FormatError(
            f"part {name!r} data starts at byte {header.data_offset}, not 64-byte aligned",
            path=full,
        )
    if second is not None and header.shape[1] != second:
        raise FormatError(
            f"part {name!r} has shape {header.shape}, expected (n, {second})", path=full
        )


def _check_rows(header: Any, name: str, path: str, need: int, what: str) -> None:
    """A part's header must promise at least what ``meta.json`` publishes (longer is an interrupted write)."""
    rows = header.shape[0] if header.shape else 0
    if rows < need:
        raise FormatError(
            f"part {name!r} has shape {header.shape}, but {META} says {what}={need}; the part's header "
            "must hold at least that many rows (the store is corrupt)",
            path=os.path.join(path, name),
        )


def _validate_offsets(offs: np.ndarray, nitems: int, path: str, full: bool) -> None:
    name = os.path.join(path, OFFSETS)
    if offs[0] != 0:
        raise FormatError(f"offsets[0] is {int(offs[0])}, expected 0", path=name)
    if offs[-1] != nitems:
        raise FormatError(
            f"offsets[-1] is {int(offs[-1])}, but {META} says nitems={nitems}; the store is corrupt",
            path=name,
        )
    step = 1 << 20
    for lo in range(0, len(offs) - 1 if full else 0, step):
        chunk = offs[lo : lo + step + 1]
        bad = np.flatnonzero(chunk[1:] < chunk[:-1])
        if bad.size:
            i = lo + int(bad[0])
            raise FormatError(
                f"offsets decrease at element {i} ({int(offs[i])} -> {int(offs[i + 1])}); "
                "the store is corrupt",
                path=name,
                index=i,
            )


def _open_store(path: str, validate: bool = True) -> _Store:
    try:
        dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise StoreNotFoundError(
            "no ragged store here; write one with npystream.save_ragged(path, arrays)", path=path
        ) from None
    except NotADirectoryError:
        raise FormatError(
            "not a ragged store: this is a file, a store is a directory (NAME.ragged)", path=path
        ) from None
    try:
        meta = _load_meta(dir_fd, path)
        st = _Store()
        st.path = path
        st.kind = meta["kind"]
        st.ndim = meta["ndim"] if st.kind == "array" else 1
        st.count = n = meta["count"]
        st.nitems = meta["nitems"]
        st.dtype = _dtype_from_meta(meta.get("dtype"), path)
        if st.kind != "array" and st.dtype != _U1:
            raise FormatError(f"kind {st.kind!r} needs dtype '|u1', {META} says {st.dtype.str!r}",
                              path=path)
        if st.dtype.hasobject:
            raise FormatError("the value dtype holds Python objects; ragged stores never do",
                              path=path)
        vh, vsize = _read_part_header(dir_fd, VALUES, path)
        oh, osize = _read_part_header(dir_fd, OFFSETS, path)
        _check_header(vh, VALUES, path, st.dtype, 1)
        _check_header(oh, OFFSETS, path, _I8, 1)
        st.maps = []
        st.values, mm = _map_part(dir_fd, VALUES, path, st.dtype, st.nitems, vh, vsize)
        st.maps.append(mm)
        offs, mm = _map_part(dir_fd, OFFSETS, path, _I8, n + 1, oh, osize)
        st.maps.append(mm)
        # after the size checks (a part shorter than meta.json says is a TruncatedError)
        _check_rows(vh, VALUES, path, st.nitems, "nitems")
        _check_rows(oh, OFFSETS, path, n + 1, "count + 1")
        if n + 1 and offs.size == 0:  # pragma: no cover - n + 1 >= 1 always maps
            raise FormatError("offsets part is empty", path=path)
        _validate_offsets(offs, st.nitems, path, validate)
        st.offsets_np = offs
        if _LITTLE:
            st.offsets_mv = memoryview(offs).cast("B").cast("q")
        else:  # pragma: no cover - big-endian hosts
            st.offsets_mv = memoryview(offs.astype("=i8")).cast("B").cast("q")
        st.shapes_np = None
        st.shapes_mv = None
        if st.ndim >= 2:
            sh, ssize = _read_part_header(dir_fd, SHAPES, path)
            _check_header(sh, SHAPES, path, _I8, 2, second=st.ndim)
            shapes, mm = _map_part(dir_fd, SHAPES, path, _I8, n * st.ndim, sh, ssize)
            st.maps.append(mm)
            _check_rows(sh, SHAPES, path, n, "count")
            shapes = shapes.reshape(n, st.ndim)
            step = 1 << 18
            for lo in range(0, n if validate else 0, step):
                blk = shapes[lo : lo + step]
                sizes = np.prod(blk, axis=1) if blk.size else np.zeros(len(blk), np.int64)
                lens = np.diff(offs[lo : lo + len(blk) + 1])
                # the int64 product wraps ((2**32, 2**32) -> 0): a float product over 2**53 cannot be a
                # real element's length (offsets are bounded by the file), and below it int64 is exact
                huge = np.prod(blk.astype(np.float64), axis=1) > 2.0**53 if blk.size else False
                bad = np.flatnonzero((sizes != lens) | (blk < 0).any(axis=1) | huge)
                if bad.size:
                    i = lo + int(bad[0])
                    raise FormatError(
                        f"shapes[{i}] is {tuple(int(x) for x in shapes[i])}, which does not hold "
                        f"the {int(lens[bad[0]])} items the offsets give; the store is corrupt",
                        path=os.path.join(path, SHAPES),
                        index=i,
                    )
            st.shapes_np = shapes
            flat = np.ascontiguousarray(shapes.reshape(-1), dtype="=i8")
            st.shapes_mv = memoryview(flat).cast("B").cast("q")
        elif st.ndim == 0 and st.kind == "array" and validate:
            lens = np.diff(offs)
            bad = np.flatnonzero(lens != 1)
            if bad.size:
                raise FormatError(
                    f"element {int(bad[0])} of a store of 0-d elements has "
                    f"{int(lens[bad[0]])} items, expected 1",
                    path=os.path.join(path, OFFSETS),
                    index=int(bad[0]),
                )
        st.parts = {VALUES: vh, OFFSETS: oh}
        st.bytes_mv = memoryview(st.values).cast("B") if st.kind != "array" else None
        return st
    finally:
        os.close(dir_fd)


class RaggedArray:
    """A read-only, memory-mapped ragged store: ``r[i]`` is a zero-copy ``np.ndarray`` view.

    ``RaggedArray(path)`` opens a store written by :class:`RaggedWriter` /
    :func:`save_ragged` (see the module docstring for the layout).  ``r[i]``
    (negative too) returns element i: a read-only view of the mapped values
    for ``kind='array'``, a ``str``/``bytes`` for those kinds, the unpickled
    object for ``kind='object'`` (safe allow-list unless ``safe=False``).
    ``r[a:b:c]`` is a view (no copy), ``r[[i, j]]`` and boolean masks give
    lists.  The store is a snapshot of what was committed when it was opened.

    >>> import tempfile, os, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "x.ragged")
    >>> _ = save_ragged(p, [np.arange(3), np.arange(5)])
    >>> r = RaggedArray(p); len(r), r[1].tolist(), r.lengths.tolist()
    (2, [0, 1, 2, 3, 4], [3, 5])
    """

    __slots__ = ("_st", "_vals", "_starts", "_ends", "_rng", "_safe", "_bytes", "_shp", "_nd",
                 "_policy")

    def __new__(cls, path: Any = None, *, safe: bool = True, allowed_globals: Any = (),
                validate: bool = True, trusted: bool | None = None,
                _view: Any = None) -> RaggedArray:
        if _view is not None:
            st = _view
        else:
            if path is None:
                raise TypeError("RaggedArray() needs the path of a store")
            st = _open_store(os.fspath(path), bool(validate))
        if cls is RaggedArray:
            if st.kind == "array":
                cls = {1: _Ragged1D, 0: _Ragged0D}.get(st.ndim, _RaggedND)
            else:
                cls = {"str": _RaggedStr, "bytes": _RaggedBytes, "object": _RaggedObject}[st.kind]
        if trusted is not None:
            if not isinstance(trusted, bool):
                raise TypeError(f"trusted must be True or False, got {trusted!r}")
            safe = not trusted
        policy = _make_policy(bool(safe), allowed_globals) if st.kind == "object" else None
        self = object.__new__(cls)
        self._policy = policy
        self._st = st
        self._vals = st.values
        self._starts = st.offsets_mv[:-1]
        self._ends = st.offsets_mv[1:]
        self._rng = range(st.count)
        self._safe = bool(safe)
        self._bytes = st.bytes_mv
        self._shp = st.shapes_mv
        self._nd = st.ndim
        return self

    def __init__(self, path: Any = None, *, safe: bool = True, allowed_globals: Any = (),
                 validate: bool = True, trusted: bool | None = None, _view: Any = None) -> None:
        """Open the store at ``path``; ``safe``/``allowed_globals`` govern kind='object' unpickling
        (the object stream's allow-list; ``safe=False``, or ``trusted=True`` as the object
        readers spell it, trusts the store like ``np.load(allow_pickle=True)``).
        ``validate=False`` skips the O(n) pass over offsets/shapes at open (for huge stores you
        trust; the O(1) checks of meta.json, headers, sizes and the end offsets remain)."""

    # -- per-kind element access ------------------------------------------------
    def _get(self, g: int) -> Any:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Any:
        if type(key) is int:
            try:
                return self._get(self._rng[key])
            except IndexError:
                raise IndexError(
                    f"index {key} is out of range for a ragged store of {len(self._rng)} elements"
                ) from None
        return self._getitem_other(key)

    def _getitem_other(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self._view(self._rng[key])
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self[int(key)]
        if isinstance(key, tuple):
            raise TypeError(
                "a ragged store takes one index (r[i], r[a:b], r[[i, j]] or a mask); "
                "index the returned element for more: r[i][j]"
            )
        idx = np.asarray(key)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise IndexError(
                    f"boolean mask has shape {idx.shape}, expected ({len(self)},)"
                )
            idx = np.flatnonzero(idx)
        elif idx.dtype.kind not in "iu" and idx.size:
            raise TypeError(
                f"ragged store indices must be ints, slices, int arrays or boolean masks, "
                f"not {type(key).__name__} of {idx.dtype}"
            )
        get = self.__getitem__
        return [get(int(i)) for i in idx.reshape(-1)]

    def _view(self, rng: range) -> RaggedArray:
        v = object.__new__(type(self))
        v._st = self._st
        v._vals = self._vals
        v._bytes = self._bytes
        v._shp = self._shp
        v._nd = self._nd
        v._safe = self._safe
        v._policy = self._policy
        v._rng = rng
        full = self._st.offsets_mv
        v._starts = full[rng.start : rng.stop if rng.stop >= 0 else None : rng.step][: len(rng)] \
            if len(rng) else full[0:0]
        v._ends = full[rng.start + 1 :: rng.step][: len(rng)] if len(rng) else full[0:0]
        return v

    # -- sizes -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rng)

    def __iter__(self) -> Iterator[Any]:
        rng = self._rng
        step = 1 << 16
        get = self._get
        for lo in range(0, len(rng), step):
            for g in rng[lo : lo + step]:
                yield get(g)

    @property
    def path(self) -> str:
        """The store's directory."""
        return self._st.path

    @property
    def kind(self) -> str:
        """``'array'``, ``'str'``, ``'bytes'`` or ``'object'``."""
        return self._st.kind

    @property
    def dtype(self) -> np.dtype:
        """The value dtype (byte order as stored; ``uint8`` for str/bytes/object)."""
        return self._st.dtype

    @property
    def ndim(self) -> int:
        """Each element's ndim (1 for str/bytes/object)."""
        return self._st.ndim

    def _contiguous(self) -> bool:
        return self._rng.step == 1 or len(self._rng) <= 1

    def _global_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        offs = self._st.offsets_np
        rng = self._rng
        if not len(rng):
            return offs[:0], offs[:0]
        stop = rng.start + rng.step * len(rng)
        starts = offs[rng.start : stop : rng.step] if stop >= 0 else offs[rng.start :: rng.step]
        starts = starts[: len(rng)]
        ends = offs[rng.start + 1 :: rng.step][: len(rng)]
        return starts, ends

    @property
    def lengths(self) -> np.ndarray:
        """Items each element holds in the flat values (``np.diff(offsets)``): len for 1-D arrays,
        UTF-8 bytes for str, bytes for bytes, pickle bytes for object."""
        starts, ends = self._global_offsets()
        return ends - starts

    @property
    def shapes(self) -> np.ndarray:
        """Each element's shape, an int64 array of shape (len, ndim)."""
        if self._st.shapes_np is not None:
            rng = self._rng
            if not len(rng):
                return self._st.shapes_np[:0]
            return self._st.shapes_np[rng.start : rng.stop if rng.stop >= 0 else None : rng.step]
        if self._nd == 0:
            return np.zeros((len(self), 0), dtype=np.int64)
        return self.lengths.reshape(-1, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of element data (the values the elements cover; headers and offsets excluded)."""
        if self._contiguous() and len(self):
            s = self._starts[0]
            e = self._ends[len(self) - 1]
            return int(e - s) * self._st.dtype.itemsize
        return int(self.lengths.sum()) * self._st.dtype.itemsize

    def _check_contiguous(self, what: str) -> None:
        if not self._contiguous():
            raise UnsupportedError(
                f"{what} of a stepped view (r[a:b:c] with c != 1) would be a copy; "
                "use iter_batches(), or save_ragged(path, view) to write a compact store",
                path=self._st.path,
            )

    @property
    def values(self) -> np.ndarray:
        """The flat values this (step-1) view covers: a read-only memmap of ``values.npy``."""
        self._check_contiguous("values")
        st = self._st
        vals = _values_memmap(st)
        if not len(self):
            return vals[:0]
        lo = self._starts[0]
        hi = self._ends[len(self) - 1]
        if lo == 0 and hi == st.nitems:
            return vals
        return vals[lo:hi]

    @property
    def offsets(self) -> np.ndarray:
        """int64 offsets (len + 1) into :attr:`values`: a memmap for the whole store, rebased
        (a small in-memory copy) for a view that does not start at element 0."""
        self._check_contiguous("offsets")
        st = self._st
        offs = _offsets_memmap(st)
        if not len(self):
            return np.zeros(1, dtype=np.int64)
        a = self._rng.start
        b = a + len(self)
        if a == 0 and b == st.count:
            return offs
        part = offs[a : b + 1]
        return part if part[0] == 0 else part - part[0]

    def iter_batches(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(values, offsets)`` blocks of up to ``batch_size`` elements, for vectorised work.

        ``values`` is a zero-copy view (a copy only for stepped views), ``offsets``
        the block's int64 offsets rebased to 0 (length k + 1), so
        ``np.add.reduceat(values, offsets[:-1])`` sums each non-empty element.
        """
        batch_size = operator.index(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        offs = self._st.offsets_np
        vals = self._vals
        if self._st.kind != "array":
            vals = self._st.values
        rng = self._rng
        n = len(rng)
        if self._contiguous():
            a = rng.start
            for lo in range(0, n, batch_size):
                hi = min(n, lo + batch_size)
                o = offs[a + lo : a + hi + 1]
                base = int(o[0])
                yield vals[base : int(o[-1])], o - base
            return
        starts, ends = self._global_offsets()
        for lo in range(0, n, batch_size):
            s = starts[lo : lo + batch_size]
            e = ends[lo : lo + batch_size]
            lens = e - s
            out = np.zeros(len(s) + 1, dtype=np.int64)
            np.cumsum(lens, out=out[1:])
            block = np.empty(int(out[-1]), dtype=vals.dtype)
            for j in range(len(s)):
                block[out[j] : out[j + 1]] = vals[s[j] : e[j]]
            yield block, out

    def to_arrow(self) -> Any:
        """This store as a pyarrow ``LargeListArray`` / ``LargeStringArray`` / ``LargeBinaryArray``
        (zero-copy from the mapped buffers for 1-D little-endian elements)."""
        from npystream.interop.arrow import ragged_to_arrow

        return ragged_to_arrow(self)

    def to_awkward(self) -> Any:
        """This store as an ``ak.Array`` (zero-copy ``ListOffsetArray`` over the mapped buffers)."""
        from npystream.interop.awkward import ragged_to_awkward

        return ragged_to_awkward(self)

    def __repr__(self) -> str:
        st = self._st
        where = ""
        if len(self._rng) != st.count or self._rng.start != 0:
            r = self._rng
            where = f"[{r.start}:{r.stop}:{r.step}]"
        dt = st.dtype.str if st.kind == "array" else None
        extra = f", dtype={dt!r}, ndim={st.ndim}" if dt else ""
        return (
            f"RaggedArray({st.path!r}{where}, kind={st.kind!r}, len={len(self)}{extra}, "
            f"nbytes={self.nbytes})"
        )

    def __reduce__(self) -> Any:
        allowed = sorted(self._policy.allowed_globals) if self._policy is not None else ()
        return (_reopen, (self._st.path, self._safe, self._rng, allowed))


def _reopen(path: str, safe: bool, rng: range, allowed: Any = ()) -> RaggedArray:
    r = RaggedArray(path, safe=safe, allowed_globals=list(allowed))
    if rng == r._rng:
        return r
    if len(rng) and max(rng[0], rng[-1]) >= len(r._rng):
        raise FormatError(f"the store now has {len(r._rng)} elements, fewer than the pickled view "
                          f"needs ({max(rng[0], rng[-1]) + 1})", path=path)
    return r._view(rng)


def _as_memmap(arr: np.ndarray, mm: mmap.mmap | None, path: str, offset: int) -> np.ndarray:
    """A ``np.memmap`` over the reader's own mapping (no second mmap of the file)."""
    m = arr.view(np.memmap)
    m._mmap = mm
    m.filename = os.path.abspath(path)
    m.offset = offset
    m.mode = "r"
    return m


def _values_memmap(st: _Store) -> np.ndarray:
    return _as_memmap(st.values, st.maps[0], os.path.join(st.path, VALUES),
                      st.parts[VALUES].data_offset)


def _offsets_memmap(st: _Store) -> np.ndarray:
    return _as_memmap(st.offsets_np, st.maps[1], os.path.join(st.path, OFFSETS),
                      st.parts[OFFSETS].data_offset)


class _Ragged1D(RaggedArray):
    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        if type(key) is int:
            try:
                return self._vals[self._starts[key] : self._ends[key]]
            except IndexError:
                raise IndexError(
                    f"index {key} is out of range for a ragged store of {len(self._rng)} elements"
                ) from None
        return self._getitem_other(key)

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        return self._vals[offs[g] : offs[g + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        vals = self._vals
        n = len(self._rng)
        step = 1 << 16
        starts, ends = self._starts, self._ends
        for lo in range(0, n, step):
            for a, b in zip(starts[lo : lo + step], ends[lo : lo + step]):
                yield vals[a:b]


class _Ragged0D(RaggedArray):
    __slots__ = ()

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        return self._vals[offs[g] : offs[g + 1]].reshape(())


class _RaggedND(RaggedArray):
    __slots__ = ()

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        nd = self._nd
        return self._vals[offs[g] : offs[g + 1]].reshape(tuple(self._shp[g * nd : g * nd + nd]))


class _RaggedStr(RaggedArray):
    __slots__ = ()

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        try:
            return str(self._bytes[offs[g] : offs[g + 1]], "utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"element is not valid UTF-8 ({exc})", path=self._st.path,
                              index=g) from None


class _RaggedBytes(RaggedArray):
    __slots__ = ()

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        return bytes(self._bytes[offs[g] : offs[g + 1]])


class _RaggedObject(RaggedArray):
    __slots__ = ()

    def _get(self, g: int) -> Any:
        offs = self._st.offsets_mv
        data = self._bytes[offs[g] : offs[g + 1]]
        try:
            return _loads_policy(data, self._policy)
        except NpyStreamError as exc:
            # the offset in values.npy of the byte the pickle reader blamed
            offset = None if exc.offset is None else self._st.parts[VALUES].data_offset + offs[g] + exc.offset
            raise type(exc)(exc.message, path=os.path.join(self._st.path, VALUES), offset=offset,
                            index=g) from None
        except Exception as exc:
            raise FormatError(
                f"element's pickle cannot be loaded ({type(exc).__name__}: {exc})",
                path=self._st.path,
                index=g,
            ) from None


# --------------------------------------------------------------------------- #
# writer
# --------------------------------------------------------------------------- #


def _umask() -> int:
    """The process umask: from /proc (Linux), else read by setting it and setting it back."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _infer_kind(x: Any) -> str:
    if isinstance(x, str):
        return "str"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return "bytes"
    return "array"


_STOP = object()


def _write_behind_loop(jobs: Any, wake: Any, done: Any, errors: list[BaseException]) -> None:
    """The helper thread of :class:`_WriteBehind` (holds its queues, not the object, so it can be collected)."""
    while True:
        token = wake.get()
        while jobs:
            try:
                if not errors:
                    _pwrite_all(*jobs[0])
            except BaseException as exc:  # handed to the writer's thread
                errors.append(exc)
            jobs.popleft()
            done.put(None)
        if token is _STOP:
            return


class _WriteBehind:
    """One helper thread that runs one ``pwrite`` at a time while the writer goes on.

    :meth:`submit` waits for the previous write (raising its error) before
    handing over the next, so at most one write is in flight; :meth:`wait`
    waits for it.  Its state survives an exception raised at any bytecode of
    the writer's thread (Ctrl-C, SIGTERM turned into an exception), so a
    later :meth:`wait` can neither hang nor return early: the jobs in flight
    are the items of a deque, added by one ``append`` call and removed by the
    helper only once written; the writer's side holds no lock (two
    ``SimpleQueue``s carry wake-ups, extra ones are harmless); a write error
    stays set (every later :meth:`wait` raises it).  The thread ends on
    :meth:`stop`, or when the object is collected.
    """

    def __init__(self) -> None:
        import collections
        import queue

        self._jobs: Any = collections.deque()
        self._wake: Any = queue.SimpleQueue()  # writer -> helper: look at the jobs (or _STOP)
        self._done: Any = queue.SimpleQueue()  # helper -> writer: a job finished
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=_write_behind_loop,
            args=(self._jobs, self._wake, self._done, self._errors),
            name="npystream-ragged-writer",
            daemon=True,
        )
        self._thread.start()

    depth = 1  # writes in flight at once

    def submit(self, fd: int, data: Any, offset: int) -> None:
        """Wait for the write in flight, then hand over this one."""
        self.wait()
        self._jobs.append((fd, data, offset))
        self._wake.put(None)

    def busy(self) -> bool:
        """Whether a write is in flight (a hint: it may finish right after)."""
        return bool(self._jobs)

    def wait(self) -> None:
        jobs = self._jobs
        while jobs:
            self._wake.put(None)  # in case an interrupt came between submit's append and put
            self._done.get()
        if self._errors:
            raise self._errors[0]

    def stop(self) -> None:
        """End the thread once the writes in flight (if any) are done; their error is dropped."""
        self._wake.put(_STOP)
        self._thread.join()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # (interpreter shutdown)
            self._wake.put(_STOP)


def _new_write_behind() -> Any:
    """The C helper (``npystream._speedups.WriteBehind``: a thread that never needs the GIL) or :class:`_WriteBehind`."""
    if _C_WRITE_BEHIND is not None:
        return _C_WRITE_BEHIND(_DEPTH)
    return _WriteBehind()


_C_WRITE_BEHIND = getattr(speedups(), "WriteBehind", None)


class RaggedWriter:
    """Stream elements into a ragged store, crash-safely, in bounded memory.

    ``mode='w'`` creates or replaces the store, ``'x'`` creates it and fails if
    it exists, ``'a'`` appends (creating it if missing; after a crash it resumes
    from the committed prefix, ``len(writer)`` tells how many elements it has).
    ``dtype``/``kind`` are inferred from the first element when not given.
    An element whose dtype, ndim or kind does not fit raises :class:`CastError`
    naming its index, unless ``cast`` (numpy's casting names: ``'equiv'``,
    ``'safe'``, ``'same_kind'``, ``'unsafe'``) allows converting it.
    ``durable=False`` skips ``fsync`` (still safe against a killed process,
    not against power loss).  Memory is one ``buffer_size`` buffer plus the
    pending offsets; a commit (what readers and a crash see) happens every
    ``commit_bytes`` of values, every 65,536 elements, and on ``flush()`` /
    ``close()``.  ``write_behind=True`` writes each full buffer to
    ``values.npy`` from a helper thread while the next one fills (two buffers;
    the same bytes on disk, and a commit still waits for every write first).
    See the module docstring for the layout and commit protocol.

    >>> import tempfile, os, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "w.ragged")
    >>> with RaggedWriter(p, dtype="<f4") as w:
    ...     w.append(np.ones(3, "<f4")); w.extend([np.zeros(2, "<f4")])
    >>> len(RaggedArray(p))
    2
    """

    def __init__(
        self,
        path: Any,
        *,
        dtype: Any = None,
        kind: str | None = None,
        mode: str = "w",
        cast: str | None = None,
        durable: bool = True,
        buffer_size: int = 4 << 20,
        commit_bytes: int = 64 << 20,
        write_behind: bool = False,
    ) -> None:
        self._path = os.path.abspath(os.fspath(path))
        if mode not in ("w", "a", "x"):
            raise ValueError(f"mode must be 'w', 'a' or 'x', got {mode!r}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if cast is not None and cast not in _CASTINGS:
            raise ValueError(f"cast must be None or one of {_CASTINGS}, got {cast!r}")
        buffer_size = operator.index(buffer_size)
        commit_bytes = operator.index(commit_bytes)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self._mode = mode
        self._cast = cast or "no"
        self._durable = bool(durable)
        self._buffer_size = buffer_size
        self._closed = False
        self._dir_fd: int | None = None
        self._fds: dict[str, int] = {}
        self._hdr_len: dict[str, int] = {}
        self._kind: str | None = kind
        self._dtype: np.dtype | None = None
        self._ndim: int | None = None
        self._count = 0  # committed elements
        self._nitems = 0  # committed items
        self._pend_lens: list[int] = []
        self._pend_shapes: list[int] = []
        self._pend_items = 0
        self._pos = 0  # bytes used in the buffer
        self._buf: bytearray | None = None
        self._cap = 0
        self._isz = 1
        self._fast: Any = None  # set when a hot path of append() applies (see _alloc_buffer)
        self._commit_bytes = max(buffer_size, commit_bytes)
        self._broken = False
        self._copy_range = hasattr(os, "copy_file_range")
        self._write_behind = bool(write_behind)
        self._wb: Any = None  # the helper: _WriteBehind or the C one
        self._spares: collections.deque[Any] = collections.deque()
        self._preadv = getattr(os, "preadv", None)
        if dtype is not None:
            dt = np.dtype(dtype)
            if kind is None:
                self._kind = "array"
            if self._kind == "array":
                self._dtype = dt
            elif dt != _U1:
                raise ValueError(f"kind={self._kind!r} stores bytes; dtype must be None or 'u1'")
        if self._kind in ("str", "bytes", "object"):
            self._dtype = _U1
            self._ndim = 1
        if self._dtype is not None:
            self._check_dtype(self._dtype)
        exists = os.path.lexists(self._path)
        if mode == "x" and exists:
            raise FileExistsError(errno.EEXIST, "the store exists (mode='x')", self._path)
        if exists and mode in ("w", "a"):
            self._check_replaceable()
        if mode == "a" and exists:
            try:
                self._resume()
            except BaseException:
                self._release()  # never keep the lock of a store we refused to open
                raise
        # otherwise the store is created at the first append (ndim is learnt there) or at close

    # -- setup ---------------------------------------------------------------------
    def _check_dtype(self, dt: np.dtype) -> None:
        if dt.hasobject:
            raise CastError(
                f"dtype {dt} holds Python objects; use kind='object' to pickle each element",
                path=self._path,
            )
        if dt.itemsize == 0:
            raise UnsupportedError(f"dtype {dt} has itemsize 0; a ragged store cannot hold it",
                                   path=self._path)

    def _check_replaceable(self) -> None:
        p = self._path
        if not os.path.isdir(p):
            raise FileExistsError(
                errno.EEXIST,
                "is a file, not a ragged store (a directory NAME.ragged holding meta.json); "
                "pass the path of a store, or a new path to create one",
                p,
            )
        if not os.path.exists(os.path.join(p, META)) and os.listdir(p):
            raise FileExistsError(
                errno.EEXIST,
                "exists and is not a ragged store (a non-empty directory without meta.json); "
                "pick another path",
                p,
            )
        if self._mode == "w" and _is_locked(p):
            raise NpyStreamError(
                "another RaggedWriter is writing this store; close it before replacing it", path=p
            )

    def _resume(self) -> None:
        p = self._path
        if not os.path.exists(os.path.join(p, META)):
            return  # an empty directory: created at the first append
        dir_fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            _lock_dir(dir_fd, p)
            meta = _load_meta(dir_fd, p)
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        kind = meta["kind"]
        dt = _dtype_from_meta(meta["dtype"], p)
        if self._kind is not None and self._kind != kind:
            raise CastError(f"the store holds kind {kind!r}, the writer was asked for {self._kind!r}",
                            path=p)
        if self._dtype is not None and self._dtype != dt:
            raise CastError(
                f"the store holds dtype {dt.str!r}, the writer was asked for {self._dtype.str!r}; "
                "open it without dtype= (elements are checked against the store's dtype)",
                path=p,
            )
        self._kind, self._dtype, self._ndim = kind, dt, meta["ndim"] if kind == "array" else 1
        self._count, self._nitems = meta["count"], meta["nitems"]
        parts = [(VALUES, dt, (self._nitems,)), (OFFSETS, _I8, (self._count + 1,))]
        if self._ndim >= 2:
            parts.append((SHAPES, _I8, (self._count, self._ndim)))
        sizes: dict[str, int] = {}
        for name, pdt, shape in parts:
            header, size = _read_part_header(dir_fd, name, p)
            _check_header(header, name, p, pdt, len(shape),
                          second=shape[1] if len(shape) == 2 else None)
            need = header.data_offset + math.prod(shape) * pdt.itemsize
            if size < need:
                raise TruncatedError(
                    f"part {name!r} is {size} bytes, but {META} commits {need}; committed data was "
                    "lost (a power loss after durable=False?); the store cannot be appended to",
                    path=os.path.join(p, name), offset=size,
                )
            fd = _open_at(dir_fd, name, os.O_RDWR)
            self._fds[name] = fd
            self._hdr_len[name] = header.data_offset
            sizes[name] = need
            # first the committed shape into the header (an interrupted write may have left a
            # larger one), so that a header never claims more than the file holds ...
            _pwrite_all(fd, _encode_part_header(pdt, shape, header.data_offset), 0)
        if self._durable:
            for fd in self._fds.values():
                os.fsync(fd)
        # ... then drop the interrupted write's tail
        for name, fd in self._fds.items():
            os.ftruncate(fd, sizes[name])
        if self._durable:
            for fd in self._fds.values():
                os.fsync(fd)
        if self._count:
            offs_fd = self._fds[OFFSETS]
            last = os.pread(offs_fd, 8, self._hdr_len[OFFSETS] + self._count * 8)
            if int.from_bytes(last, "little", signed=True) != self._nitems:
                raise FormatError(
                    f"offsets[{self._count}] does not match {META} nitems={self._nitems}; "
                    "the store is corrupt", path=os.path.join(p, OFFSETS),
                )
        self._alloc_buffer()

    def _alloc_buffer(self) -> None:
        assert self._dtype is not None
        isz = self._dtype.itemsize
        size = max(isz, self._buffer_size - self._buffer_size % isz)
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)
        self._nbuf = np.frombuffer(self._buf, dtype=self._dtype) if self._kind == "array" else None
        self._cap = size
        self._isz = isz
        # append()'s hot paths: the dtype of 1-D array stores, the element type of str/bytes stores
        self._fast = (self._dtype if self._kind == "array" and self._ndim == 1
                      else {"str": str, "bytes": bytes}.get(self._kind))
        if self._write_behind:
            self._wb = _new_write_behind()
            # one buffer per write the helper may have in flight, besides the one filling
            self._spares = collections.deque()
            for _ in range(self._wb.depth):
                spare = bytearray(size)
                self._spares.append((spare, memoryview(spare),
                                     np.frombuffer(spare, dtype=self._dtype) if self._kind == "array" else None))

    def _meta(self, count: int, nitems: int) -> bytes:
        assert self._dtype is not None
        return meta_bytes(self._kind, self._dtype, self._ndim, count, nitems)

    def _create(self) -> None:
        """Build the empty store in a hidden temp dir, then rename it into place."""
        try:
            self._create_now()
        except BaseException:
            self._broken = True  # close() must not try again (an interrupt lands here too)
            raise

    def _create_now(self) -> None:
        p = self._path
        parent, name = os.path.split(p)
        if not os.path.isdir(parent):
            raise StoreNotFoundError(
                "the parent directory of the store does not exist; create it first", path=parent
            )
        _sweep_stale(parent, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        # Locked while it exists (and, renamed, as the store's writer lock): a later creator
        # removes such directories only when their lock is free, i.e. their creator died.
        dir_fd: int | None = None
        trash_fd: int | None = None
        try:
            dir_fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            _lock_dir(dir_fd, tmp)
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: a store gets a directory's usual mode
        try:
            assert self._dtype is not None and self._ndim is not None
            parts = [(VALUES, self._dtype, (0,)), (OFFSETS, _I8, (1,))]
            if self._ndim >= 2:
                parts.append((SHAPES, _I8, (0, self._ndim)))
            for part, pdt, shape in parts:
                hdr = _encode_part_header(pdt, shape, None)
                with open(os.path.join(tmp, part), "wb") as fh:
                    fh.write(hdr)
                    if part == OFFSETS:
                        fh.write(bytes(8))
                    if self._durable:
                        fh.flush()
                        os.fsync(fh.fileno())
            with open(os.path.join(tmp, META), "wb") as fh:
                fh.write(self._meta(0, 0))
                if self._durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            if self._durable:
                _fsync_dir(tmp)
            trash = None
            if os.path.lexists(p):
                if self._mode == "x":
                    raise FileExistsError(errno.EEXIST, "the store exists (mode='x')", p)
                self._check_replaceable()
                trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                trash_fd = os.open(trash, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                _lock_dir(trash_fd, trash)
                os.rename(p, os.path.join(trash, "old"))
            os.rename(tmp, p)  # dir_fd now names the store
            tmp = None
            if self._durable:
                _fsync_dir(parent)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            os.close(dir_fd)
            raise
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if trash_fd is not None:
                os.close(trash_fd)
        self._dir_fd = dir_fd
        for part, pdt, shape in parts:
            fd = _open_at(dir_fd, part, os.O_RDWR)
            self._fds[part] = fd
            self._hdr_len[part] = len(_encode_part_header(pdt, shape, None))
        self._alloc_buffer()

    def _first(self, x: Any) -> Any:
        """Learn kind/dtype/ndim from the first element, create the store; return x prepared."""
        if self._kind is None:
            self._kind = _infer_kind(x)
            if self._kind != "array":
                self._dtype, self._ndim = _U1, 1
        if self._kind == "array":
            arr = self._as_array(x, 0)
            if self._dtype is None:
                self._check_dtype(arr.dtype)
                self._dtype = arr.dtype
            if self._ndim is None:
                self._ndim = arr.ndim
        self._create()

    # -- appending -----------------------------------------------------------------
    def __len__(self) -> int:
        """Elements in the store so far: committed plus buffered (what a resume starts from)."""
        return self._count + len(self._pend_lens)

    @property
    def committed(self) -> int:
        """Elements published in meta.json (what a reader or a crash would see now)."""
        return self._count

    @property
    def path(self) -> str:
        """The store's directory."""
        return self._path

    @property
    def dtype(self) -> np.dtype | None:
        """The value dtype (None until known)."""
        return self._dtype

    @property
    def kind(self) -> str | None:
        """The element kind (None until known)."""
        return self._kind

    def _as_array(self, x: Any, index: int) -> np.ndarray:
        if isinstance(x, np.ndarray):
            if type(x).__module__.startswith("numpy.ma"):
                raise CastError(
                    "got a masked array; a ragged store keeps no mask: fill it first "
                    "(x.filled(value)) or drop the masked items (x.compressed())",
                    path=self._path, index=index,
                )
            return x
        if isinstance(x, (str, bytes, bytearray, memoryview)):
            raise CastError(
                f"got a {type(x).__name__} for a store of kind 'array'; store text with kind='str', "
                "bytes with kind='bytes', anything else with kind='object'",
                path=self._path, index=index,
            )
        arr = np.asarray(x)
        if arr.dtype.hasobject:
            raise CastError(
                f"got a {type(x).__name__} that numpy turns into an object array; "
                "use kind='object' to pickle each element",
                path=self._path, index=index,
            )
        return arr

    def _bad(self, what: str, index: int) -> CastError:
        return CastError(what, path=self._path, index=index)

    def append(self, x: Any) -> None:
        """Append one element (copied into the buffer, so ``x`` may be reused at once)."""
        fast = self._fast
        if fast is not None and type(x) is np.ndarray and x.ndim == 1:
            dt = x.dtype
            if dt is fast or dt == fast:
                # hot path: a 1-D array of the store's dtype into the buffer
                pos = self._pos
                end = pos + x.nbytes
                if end <= self._cap:
                    isz = self._isz
                    self._nbuf[pos // isz : end // isz] = x
                    self._pos = end
                    lens = self._pend_lens
                    lens.append(x.size)
                    if len(lens) >= _MAX_PENDING:
                        self._commit()
                    return
        elif type(x) is fast:
            # hot path of str and bytes stores (_fast is the element type there)
            try:
                data = x.encode("utf-8") if fast is str else x
            except UnicodeEncodeError:
                data = None  # the slow path reports it
            if data is not None:
                pos = self._pos
                end = pos + len(data)
                if end <= self._cap:
                    self._mv[pos:end] = data
                    self._pos = end
                    lens = self._pend_lens
                    lens.append(end - pos)
                    if len(lens) >= _MAX_PENDING:
                        self._commit()
                    return
        self._append_slow(x)

    def append_from_file(self, x: Any, fd: int, offset: int) -> None:
        """Append ``x``, whose raw bytes are also at ``offset`` in file ``fd``, reading them from there.

        For an element that is a view of a memory-mapped file (``fd`` open for
        reading on that file).  When ``x`` is a C-contiguous ndarray of the
        store's dtype and ndim, its ``x.nbytes`` bytes are read from ``fd``
        with ``os.preadv`` straight into the writer's buffer (one kernel copy
        from the page cache, no page faults on the mapping, no copy in user
        space), or, for an element larger than the buffer, copied file to file
        with ``os.copy_file_range`` (``pwrite`` from ``x`` where that is not
        supported).  The store is the same as :meth:`append` makes, byte for
        byte; anything else takes the path of :meth:`append`.  The caller
        guarantees that the file holds ``x``'s bytes at ``offset``.
        """
        if (
            self._buf is None
            or self._kind != "array"
            or type(x) is not np.ndarray
            or x.ndim != self._ndim
            or not x.flags.c_contiguous
            or (x.dtype is not self._dtype and x.dtype != self._dtype)
            or self._preadv is None
        ):
            self.append(x)
            return
        if self._closed or self._broken:
            self._append_slow(x)  # raises the usual error
            return
        nbytes = x.nbytes
        pos = self._pos
        if pos + nbytes > self._cap:
            self._spill()
            pos = self._pos
            if nbytes > self._cap:
                self._copy_direct(x, fd, offset)
                return
        # An error or an interrupt (KeyboardInterrupt, SystemExit from SIGTERM) while
        # reading leaves the writer consistent: x is not counted and the buffer's end is
        # unchanged, so close() still commits every element appended before x.
        view = self._mv[pos : pos + nbytes]
        done = self._preadv(fd, [view], offset)
        while done < nbytes:  # short reads: only near a (shrinking) end of file
            n = self._preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise self._source_ended(offset, nbytes, done)
            done += n
        self._pos = pos + nbytes
        lens = self._pend_lens
        lens.append(x.size)
        if self._ndim >= 2:
            self._pend_shapes.extend(x.shape)
        if len(lens) >= _MAX_PENDING:
            self._commit()

    def _source_ended(self, offset: int, nbytes: int, done: int) -> TruncatedError:
        return TruncatedError(
            f"the source file ends before byte {offset + nbytes} of an element being copied "
            "into the store (was it truncated while converting?)",
            path=self._path, offset=offset + done,
        )

    def _copy_direct(self, x: np.ndarray, fd: int, offset: int) -> None:
        """Copy a large element file to file at the end of values.npy (buffer already empty)."""
        nbytes = x.nbytes
        dst = self._hdr_len[VALUES] + (self._nitems + self._pend_items) * self._isz
        done = 0
        try:
            if self._copy_range:
                done = self._copy_file_range(fd, offset, dst, nbytes)
            if done < nbytes:
                _pwrite_all(self._fds[VALUES], x.reshape(-1).view(np.uint8)[done:], dst + done)
        except (OSError, NpyStreamError):
            self._broken = True
            self._fast = None
            raise
        # An interrupt leaves the writer consistent: x is not counted, its partial bytes lie
        # past the pending end (overwritten by the next element, or cut off by a resume).
        self._pend_items += x.size
        self._pend_lens.append(x.size)
        if self._ndim >= 2:
            self._pend_shapes.extend(x.shape)
        self._maybe_commit()

    def _copy_file_range(self, fd: int, offset: int, dst: int, nbytes: int) -> int:
        """Copy up to ``nbytes`` from ``fd`` at ``offset`` to values.npy at ``dst``; bytes copied.

        Stops early (and stops trying for this writer) where copy_file_range is
        unsupported; raises TruncatedError when the source ends early.
        """
        out = self._fds[VALUES]
        done = 0
        while done < nbytes:
            try:
                n = os.copy_file_range(fd, out, nbytes - done, offset + done, dst + done)
            except OSError as exc:
                if exc.errno in _NO_COPY_RANGE:
                    self._copy_range = False
                    return done
                raise
            if n == 0:
                raise self._source_ended(offset, nbytes, done)
            done += n
        return done

    def _append_slow(self, x: Any) -> None:
        if self._closed:
            raise ValueError("append to a closed RaggedWriter")
        if self._broken:
            raise NpyStreamError(
                "this writer failed while writing (see the earlier error); the store keeps its "
                "last commit: open a new RaggedWriter(path, mode='a') to continue from it",
                path=self._path,
            )
        if self._buf is None:
            self._first(x)
        kind = self._kind
        index = self._count + len(self._pend_lens)
        if kind == "array":
            arr = x if type(x) is np.ndarray else self._as_array(x, index)
            dt = arr.dtype
            if dt is not self._dtype and dt != self._dtype:
                if dt.hasobject or not np.can_cast(dt, self._dtype, casting=self._cast):
                    raise self._bad(
                        f"dtype {dt.str!r} does not fit the store's {self._dtype.str!r} under "
                        f"casting {self._cast!r}; convert it, or pass cast='same_kind' (or "
                        "'safe', 'unsafe') to the writer",
                        index,
                    )
            if arr.ndim != self._ndim:
                raise self._bad(
                    f"element has ndim {arr.ndim} (shape {arr.shape}), the store's elements have "
                    f"ndim {self._ndim}; reshape it",
                    index,
                )
            n = arr.size
            isz = self._isz
            nbytes = n * isz
            if self._pos + nbytes > self._cap:
                self._spill()
                if nbytes > self._cap:
                    self._write_direct(arr)
                    return
            p = self._pos // isz
            self._nbuf[p : p + n] = arr if arr.ndim == 1 else arr.reshape(-1)
            self._pos += nbytes
            self._pend_lens.append(n)
            if self._ndim >= 2:
                self._pend_shapes.extend(arr.shape)
        else:
            data = self._encode(x, index)
            nbytes = len(data)
            if self._pos + nbytes > self._cap:
                self._spill()
                if nbytes > self._cap:
                    self._write_bytes(data)
                    self._pend_lens.append(nbytes)
                    self._maybe_commit()
                    return
            self._mv[self._pos : self._pos + nbytes] = data
            self._pos += nbytes
            self._pend_lens.append(nbytes)
        if len(self._pend_lens) >= _MAX_PENDING:
            self._commit()

    def _encode(self, x: Any, index: int) -> bytes:
        kind = self._kind
        if kind == "str":
            if not isinstance(x, str):
                raise self._bad(f"got a {type(x).__name__}, the store holds str", index)
            try:
                return x.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise self._bad(f"str cannot be encoded as UTF-8 ({exc})", index) from None
        if kind == "bytes":
            if not isinstance(x, (bytes, bytearray, memoryview)):
                raise self._bad(f"got a {type(x).__name__}, the store holds bytes", index)
            return bytes(x)
        import cloudpickle

        try:
            return cloudpickle.dumps(x)
        except Exception as exc:
            raise self._bad(f"element cannot be pickled ({type(exc).__name__}: {exc})", index) from None

    def _write_bytes(self, data: Any) -> None:
        """Write raw value bytes at the end of the uncommitted data (buffer already empty)."""
        off = self._hdr_len[VALUES] + (self._nitems + self._pend_items) * self._dtype.itemsize
        try:
            _pwrite_all(self._fds[VALUES], data, off)
        except BaseException:
            self._broken = True
            self._fast = None
            raise
        self._pend_items += memoryview(data).nbytes // self._dtype.itemsize

    def _write_direct(self, arr: np.ndarray) -> None:
        if arr.dtype != self._dtype or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=self._dtype)
        flat = arr.reshape(-1)
        step = max(1, len(self._buf) // self._dtype.itemsize)
        for lo in range(0, flat.size, step):
            self._write_bytes(flat[lo : lo + step].view(np.uint8))
        self._pend_lens.append(arr.size)
        if self._ndim >= 2:
            self._pend_shapes.extend(arr.shape)
        self._maybe_commit()

    def extend(self, iterable: Iterable[Any]) -> None:
        """Append every element of ``iterable`` (also a RaggedArray, pyarrow or awkward array)."""
        blocks = _blocks_of(iterable)
        if blocks is not None:
            kind, dtype, ndim, it = blocks
            self._extend_blocks(kind, dtype, ndim, it)
            return
        append = self.append
        for x in iterable:
            append(x)

    def _extend_blocks(self, kind: str, dtype: np.dtype | None, ndim: int, it: Iterator[Any]) -> None:
        """Bulk path: (values, offsets, shapes) blocks written straight to the parts."""
        if self._closed:
            raise ValueError("extend a closed RaggedWriter")
        if self._broken:
            raise NpyStreamError("this writer failed while writing; reopen with mode='a'",
                                 path=self._path)
        if self._kind is None:
            self._kind = kind
        if self._kind != kind:
            raise self._bad(f"the input holds kind {kind!r}, the store holds {self._kind!r}", len(self))
        if self._dtype is None:
            self._dtype = dtype if kind == "array" else _U1
            self._check_dtype(self._dtype)
        if self._ndim is None:
            self._ndim = ndim
        if kind == "array":
            if dtype != self._dtype and not np.can_cast(dtype, self._dtype, casting=self._cast):
                raise self._bad(
                    f"dtype {dtype.str!r} does not fit the store's {self._dtype.str!r} under "
                    f"casting {self._cast!r}; pass cast='same_kind' (or 'safe', 'unsafe')",
                    len(self),
                )
            if ndim != self._ndim:
                raise self._bad(f"elements have ndim {ndim}, the store's have {self._ndim}", len(self))
        if self._buf is None:
            self._create()
        for values, offsets, shapes in it:
            self._spill()
            if values.dtype != self._dtype:
                values = values.astype(self._dtype)
            values = np.ascontiguousarray(values)
            step = max(1, len(self._buf) // self._dtype.itemsize)
            for lo in range(0, values.size, step):
                self._write_bytes(values[lo : lo + step].reshape(-1).view(np.uint8))
            lens = np.diff(np.asarray(offsets, dtype=np.int64))
            self._pend_lens.extend(lens.tolist())
            if self._ndim >= 2 and shapes is not None:
                self._pend_shapes.extend(np.asarray(shapes, dtype=np.int64).reshape(-1).tolist())
            self._maybe_commit()

    def flush(self) -> None:
        """Commit everything appended so far (readers and crashes see it afterwards)."""
        if self._closed:
            raise ValueError("flush a closed RaggedWriter")
        if self._broken:
            raise NpyStreamError("this writer failed while writing; reopen with mode='a'",
                                 path=self._path)
        if self._buf is not None:
            self._commit()

    def _spill(self) -> None:
        """Write the buffer to values.npy (not yet committed); commit every commit_bytes."""
        if self._pos:
            if self._wb is not None:
                self._spill_behind()
            else:
                self._write_bytes(self._mv[: self._pos])
            self._pos = 0
        self._maybe_commit()

    def _rotate(self) -> None:
        """Fill the spare buffer written longest ago (submit() saw that write done) next."""
        self._spares.append((self._buf, self._mv, self._nbuf))
        self._buf, self._mv, self._nbuf = self._spares.popleft()

    def _spill_behind(self) -> None:
        """Hand the full buffer to the helper thread and go on filling the spare one."""
        off = self._hdr_len[VALUES] + (self._nitems + self._pend_items) * self._isz
        try:
            self._wb.submit(self._fds[VALUES], self._mv[: self._pos], off)  # waits for the last one
        except OSError:
            self._broken = True
            self._fast = None
            raise
        self._pend_items += self._pos // self._isz
        self._rotate()

    def _maybe_commit(self) -> None:
        if self._pend_items * self._isz >= self._commit_bytes or len(self._pend_lens) >= _MAX_PENDING:
            self._commit()

    def _commit(self) -> None:
        if not self._pend_lens and not self._pos:
            return
        try:
            self._commit_now()
        except BaseException:
            # an I/O error (disk full...) part-way: what is published stays consistent, but this
            # writer no longer knows where its parts end; refuse further use (resume with 'a')
            self._broken = True
            self._fast = None
            raise

    def _commit_now(self) -> None:
        isz = self._dtype.itemsize
        fds = self._fds
        if self._wb is not None:
            self._wb.wait()  # data before the offsets that point at it
        if self._pos:
            self._write_bytes(self._mv[: self._pos])
            self._pos = 0
        lens = np.asarray(self._pend_lens, dtype=np.int64)
        new_count = self._count + len(lens)
        offs = np.cumsum(lens, dtype=np.int64)
        offs += self._nitems
        new_items = int(offs[-1]) if len(offs) else self._nitems
        if new_items != self._nitems + self._pend_items:  # pragma: no cover - internal invariant
            raise NpyStreamError("internal error: buffered item count disagrees with offsets",
                                 path=self._path)
        del isz
        _pwrite_all(fds[OFFSETS], offs.astype(_I8, copy=False),
                    self._hdr_len[OFFSETS] + (self._count + 1) * 8)
        if self._ndim >= 2:
            shp = np.asarray(self._pend_shapes, dtype=_I8)
            _pwrite_all(fds[SHAPES], shp, self._hdr_len[SHAPES] + self._count * self._ndim * 8)
        if self._durable:
            for fd in fds.values():
                os.fsync(fd)
        _pwrite_all(fds[VALUES], _encode_part_header(self._dtype, (new_items,), self._hdr_len[VALUES]), 0)
        _pwrite_all(fds[OFFSETS], _encode_part_header(_I8, (new_count + 1,), self._hdr_len[OFFSETS]), 0)
        if self._ndim >= 2:
            _pwrite_all(fds[SHAPES],
                        _encode_part_header(_I8, (new_count, self._ndim), self._hdr_len[SHAPES]), 0)
        self._publish(new_count, new_items)
        self._count, self._nitems = new_count, new_items
        self._pend_lens = []
        self._pend_shapes = []
        self._pend_items = 0

    def _publish(self, count: int, nitems: int) -> None:
        dir_fd = self._dir_fd
        tmp = META + ".tmp"
        fd = _open_at(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _pwrite_all(fd, self._meta(count, nitems), 0)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, META, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if self._durable:
            os.fsync(dir_fd)

    # -- closing ---------------------------------------------------------------------
    def close(self) -> None:
        """Commit what is buffered and release the store (idempotent)."""
        if self._closed:
            return
        try:
            if self._buf is None:
                if self._broken:
                    pass
                elif self._mode != "a" or not os.path.exists(os.path.join(self._path, META)):
                    # nothing appended: still leave an (empty) store behind
                    if self._kind is None:
                        self._kind = "array"
                    if self._dtype is None:
                        self._dtype = np.dtype(np.float64)
                    if self._ndim is None:
                        self._ndim = 1
                    self._create()
            elif not self._broken:
                self._commit()
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._wb is not None:  # before the descriptors it writes to are closed
            self._wb.stop()
            self._wb = None
            self._spares.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # also drops the flock
            self._dir_fd = None
        self._buf = None
        self._nbuf = None
        self._fast = None

    def __enter__(self) -> RaggedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Elements appended before an exception are kept (committed); but a block that
        # failed before the first element creates no (empty) store, and an interrupt
        # (Ctrl-C, SystemExit) may have landed inside an append: then salvage().
        if exc_type is None:
            self.close()
        elif self._buf is None:
            self.abort()
        elif issubclass(exc_type, Exception):  # type: ignore[arg-type]
            self.close()
        else:
            self.salvage()

    def salvage(self) -> None:
        """After an interrupt: commit what was appended if the buffered state is whole, else :meth:`abort`.

        Ctrl-C can land between two statements of :meth:`append`; the
        buffered counts are then checked against each other (items in the
        pending lengths == items written or buffered) before anything is
        committed.  Either way the store is a consistent prefix.
        """
        if self._closed:
            return
        try:
            whole = (
                not self._broken
                and self._buf is not None
                and self._pos % self._isz == 0
                and sum(self._pend_lens) == self._pend_items + self._pos // self._isz
                and (self._ndim is None or self._ndim < 2 or len(self._pend_shapes) == self._ndim * len(self._pend_lens))
            )
        except Exception:
            whole = False
        if whole:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Release the store without committing what is buffered (idempotent).

        The store stays at its last commit, exactly what a killed process
        leaves; use it after an interrupt that may have landed half-way
        through an :meth:`append` (the buffered state is then not trusted).
        """
        if not self._closed:
            self._release()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"RaggedWriter({self._path!r}, kind={self._kind!r}, "
            f"dtype={self._dtype.str if self._dtype is not None else None!r}, len={len(self)}, {state})"
        )


def _blocks_of(obj: Any) -> tuple[str, np.dtype | None, int, Iterator[Any]] | None:
    """(kind, dtype, ndim, blocks) for inputs the writer can copy in bulk, else None."""
    if isinstance(obj, RaggedArray):
        st = obj._st

        def gen() -> Iterator[Any]:
            shapes = obj.shapes if st.ndim >= 2 else None
            pos = 0
            for vals, offs in obj.iter_batches(1 << 16):
                k = len(offs) - 1
                sh = shapes[pos : pos + k] if shapes is not None else None
                pos += k
                yield vals, offs, sh

        return st.kind, st.dtype, st.ndim, gen()
    mod = type(obj).__module__ or ""
    if mod.startswith("pyarrow"):
        from npystream.interop.arrow import arrow_blocks

        return arrow_blocks(obj)
    if mod.startswith("awkward"):
        from npystream.interop.awkward import awkward_blocks

        return awkward_blocks(obj)
    return None


def describe_store(path: Any) -> dict[str, Any]:
    """A JSON-able summary of a store (for ``npystream info``): what ``meta.json`` commits, checked.

    Opens the store like :class:`RaggedArray` (so a bad store raises the same errors) and
    reports ``format``, ``version``, ``kind``, ``dtype`` (descr), ``dtype_text``, ``ndim``,
    ``count``, ``nitems``, ``nbytes`` (element data), ``parts`` (file name -> size in bytes)
    and, for non-empty stores, ``min_length``/``max_length`` (items per element).
    """
    r = RaggedArray(path)
    st = r._st
    lengths = r.lengths
    out: dict[str, Any] = {
        "path": st.path,
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": st.kind,
        "dtype": _descr_to_json(st.dtype),
        "dtype_text": str(st.dtype) if st.dtype.names else f"{st.dtype.str} ({st.dtype.name})",
        "ndim": st.ndim,
        "count": st.count,
        "nitems": st.nitems,
        "nbytes": r.nbytes,
        "parts": {
            name: os.path.getsize(os.path.join(st.path, name))
            for name in (META, VALUES, OFFSETS, SHAPES)
            if os.path.exists(os.path.join(st.path, name))
        },
    }
    if st.count:
        out["min_length"] = int(lengths.min())
        out["max_length"] = int(lengths.max())
    return out


def save_ragged(path: Any, iterable: Iterable[Any], **writer_options: Any) -> RaggedArray:
    """Write every element of ``iterable`` to a new ragged store and return it opened.

    ``writer_options`` are :class:`RaggedWriter`'s (``dtype``, ``kind``,
    ``mode``, ``cast``, ``durable``).  Memory stays bounded by the writer's
    buffer whatever the number of elements.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.ragged")
    >>> save_ragged(p, ["héllo", "", "wörld"])[2]
    'wörld'
    """
    with RaggedWriter(path, **writer_options) as w:
        w.extend(iterable)
    return RaggedArray(path)
