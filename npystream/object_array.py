"""``ObjectArray``: an object-dtype ``.npy`` opened lazily -- streamed in order, or read at random.

What :func:`npystream.open` returns for a pickled ``.npy`` (object dtype, or a
structured dtype with object fields) and for such members of an ``.npz``.
Nothing is unpickled when it is opened: the ``.npy`` header gives ``shape``,
``dtype`` and ``len``.

Two ways in
-----------
* **Iteration** follows numpy: ``for x in arr`` goes over the first axis
  (the elements of a 1-D array, rows as object ndarrays of shape
  ``arr.shape[1:]`` of an N-D one; a 0-d array cannot be iterated), and
  ``arr.flat`` (like :func:`npystream.iter_objects`) gives every element in
  C order.  Both stream with bounded memory
  (:func:`npystream.formats.pickle_walk.iter_elements`) on every source,
  pipes and compressed streams included; a forward-only source can be
  iterated once.
* **Indexing** (``arr[i]``, ``arr[i, j]``, ``arr[-1]``, ``arr[a:b]``,
  ``arr[[i, j]]``, ``arr[mask]``) goes through an *offset index*: one pass
  over the pickle that reads only opcode bytes and seeks over payloads,
  recording where each element starts and which memo entries later elements
  read.  It is built on first use (or by :meth:`ObjectArray.build_index`)
  and needs a seekable source; forward-only sources raise
  :class:`~npystream.errors.NotSeekableError` saying so.  Indexing follows
  numpy's rules and result types, as on the object ndarray ``np.load``
  returns: a key that selects one element (an integer per axis) returns the
  element; any other key (``arr[i]`` on N-D, slices, integer arrays,
  boolean masks, ``...``, ``None``) returns a new object ndarray of numpy's
  result shape (a copy, never a view of this object).  Negative indices and
  ``IndexError`` as numpy.  For a plain list of elements without building
  an ndarray, :meth:`ObjectArray.get` takes C-order flat indices.

The saved index (``FILE.npy.nsidx``)
-----------------------------------
For sources opened from a path, the index is saved beside the file as
``FILE.npy.nsidx`` and reused by later opens.  It is itself an uncompressed
``.npz`` (``np.savez``; read back with ``allow_pickle=False``) holding:

=================  ======================================================
``nsidx_meta``      int64[6]: layout version, file size, file mtime (ns),
                    data offset, element count, header length
``nsidx_header``    uint8[...]: the ``.npy`` header bytes of the file
``nsidx_kind``      str: the pickle index's own format tag
``i_<name>``        the arrays of the pickle index (its ``to_arrays()``)
=================  ======================================================

It is used only if the size, mtime, header bytes, element count and both
format tags still match; otherwise it is ignored and rebuilt.  It is written
to a temporary name in the same directory and renamed into place
(:func:`npystream._atomic.atomic_output`; not
fsynced: an index cut short by a crash fails validation and is rebuilt);
if the directory is read-only (or the disk full), the index simply stays in
memory and reading carries on.  A damaged or foreign ``.nsidx`` is treated
like a missing one.  The index holds positions only; every element decoded
through it is still checked by the safety policy.

Zero-copy
---------
With ``zero_copy=True`` (the default for seekable, memory-mappable files)
an element that is a plain numeric ndarray whose raw bytes lie contiguously
in the file *and are aligned for its dtype* is returned by indexing as a
**read-only** view onto the memory-mapped file (``arr[i].flags.writeable``
is False; ``np.array(x)`` makes a writable copy).  Pickle payloads sit at
arbitrary offsets, and numpy computes on unaligned data through other loops
(a float32 ``x.sum()`` can differ from ``np.load``'s in the last bits, and
runs slower), so an unaligned payload is copied into a fresh aligned array,
exactly what ``np.load`` gives.  ``zero_copy="always"`` returns views
whatever their alignment (``x.flags.aligned`` may then be False: for
consumers that copy the bytes anyway, like the converter).  Everything
else is a fresh object, as ``np.load`` would give.  See ``docs/object_array.md`` for the exact list.  Plain
iteration returns copies (it streams, like ``iter_objects``, on any source);
:meth:`ObjectArray.iter_range` streams a range through the index and gives
what indexing gives.

Sharing
-------
Indexing is serialised by a lock (the decoder keeps unpickler state), so
threads can share one array; every iteration has its own file handle.  An
array opened from a path pickles as "open this path again" (spawned worker
processes); forked workers read through the memory map.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import threading
import weakref
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from npystream._atomic import atomic_output
from npystream.errors import FormatError, NotSeekableError, TruncatedError
from npystream.formats.npy import NpyHeader, read_header
from npystream.sources import (
    ByteSource,
    FileSource,
    MemorySource,
    WindowSource,
    open_source,
)

__all__ = ["ObjectArray", "FlatObjects", "NSIDX_SUFFIX", "NSIDX_VERSION", "index_path_for", "numpy_filename"]

NSIDX_SUFFIX = ".nsidx"
NSIDX_VERSION = 1
_META_FIELDS = ("version", "size", "mtime_ns", "data_offset", "count", "header_len")
_MAX_NSIDX_BYTES = 1 << 34  # an index larger than 16 GiB is not ours (sanity bound before loading)


def index_path_for(path: str | os.PathLike[str]) -> str:
    """Where the saved index of ``path`` lives: ``path + '.nsidx'``."""
    return os.fspath(path) + NSIDX_SUFFIX


def numpy_filename(file: Any) -> Any:
    """The ``filename`` ``np.memmap`` records for ``file``: a resolved ``Path`` for path-likes, an absolute str for str paths and named files, else None."""
    if isinstance(file, os.PathLike):
        import pathlib

        return pathlib.Path(file).resolve()
    if isinstance(file, str) and file != "-":
        return os.path.abspath(file)
    name = getattr(file, "name", None)
    if isinstance(name, str) and not isinstance(file, (bytes, bytearray, memoryview)) and os.path.isfile(name):
        return os.path.abspath(name)
    return None


def _engine() -> Any:
    """The pickle engine (issue 3, "stream"): imported on first use, keeps ``import npystream`` cheap."""
    from npystream.formats import pickle_walk

    return pickle_walk


# ---------------------------------------------------------------------------
# numpy-style index resolution, without materialising an index the size of the array


def _index_error_type(key: Any) -> bool:
    return isinstance(key, (bool, np.bool_))


def _coordinate_views(shape: tuple[int, ...]) -> list[np.ndarray]:
    """One broadcast view per axis whose value at each position is that axis' C-order flat stride times the coordinate.

    Views cost O(shape[k]) memory each; indexing them with any numpy key gives
    the result's flat positions (summed over axes) with numpy's own rules and
    error messages, at a cost proportional to the result.
    """
    views = []
    stride = 1
    strides = []
    for n in reversed(shape):
        strides.append(stride)
        stride *= n
    strides.reverse()
    ndim = len(shape)
    for axis, (n, st) in enumerate(zip(shape, strides)):
        shaped = [1] * ndim
        shaped[axis] = n
        coords = (np.arange(n, dtype=np.intp) * st).reshape(shaped)
        views.append(np.broadcast_to(coords, shape))
    return views


def resolve_key(key: Any, shape: tuple[int, ...]) -> tuple[int | None, np.ndarray | None]:
    """``(flat, None)`` when ``key`` selects one element of an array of ``shape``, else ``(None, positions)``.

    ``positions`` is an intp array shaped like numpy's result of ``a[key]``,
    holding C-order flat element numbers.  Raises ``IndexError`` exactly where
    numpy would.
    """
    ndim = len(shape)
    # fast paths: one integer on 1-D, a tuple of integers on N-D
    if ndim == 1 and not _index_error_type(key):
        try:
            i = operator.index(key)
        except TypeError:
            pass
        else:
            n = shape[0]
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {operator.index(key)} is out of bounds for axis 0 with size {n}")
            return i, None
    if isinstance(key, tuple) and len(key) == ndim and ndim > 0:
        flat = 0
        ok = True
        for axis, (k, n) in enumerate(zip(key, shape)):
            if _index_error_type(k):
                ok = False
                break
            try:
                i = operator.index(k)
            except TypeError:
                ok = False
                break
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
            flat = flat * n + j
        if ok:
            return flat, None
    if ndim == 1:
        positions = _resolve_1d(key, shape[0])
        if positions is not None:
            return None, positions
    positions = _resolve_basic(key, shape)
    if positions is not None:
        if isinstance(positions, int):
            return positions, None
        return None, positions
    # general case: let numpy interpret the key on broadcast coordinate views; numpy gives
    # a scalar exactly where indexing an object array gives an element (else an array,
    # 0-d included, as for a[...] or a[0, ...])
    if ndim == 0:
        result = np.broadcast_to(np.intp(0), ())[key]
        scalar = not isinstance(result, np.ndarray)
    else:
        views = _coordinate_views(shape)
        result = views[0][key]
        scalar = not isinstance(result, np.ndarray)
        for view in views[1:]:
            result = result + view[key]
    if scalar:
        return int(result), None
    return None, np.asarray(result, dtype=np.intp)


def _resolve_1d(key: Any, n: int) -> np.ndarray | None:
    """Slices, integer lists/arrays and boolean masks on a 1-D array (memory ~ the result), else None."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n), dtype=np.intp)
    if isinstance(key, (list, np.ndarray)):
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.ndim != 1:
                return None
            if arr.shape[0] != n:
                raise IndexError(
                    "boolean index did not match indexed array along axis 0; size of axis is "
                    f"{n} but size of corresponding boolean axis is {arr.shape[0]}"
                )
            return np.flatnonzero(arr).astype(np.intp, copy=False)
        if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
            return None  # let numpy raise its own error
        arr = arr.astype(np.intp)
        bad = (arr < -n) | (arr >= n)
        if bad.any():
            raise IndexError(f"index {int(arr[bad][0])} is out of bounds for axis 0 with size {n}")
        return np.where(arr < 0, arr + n, arr)
    return None


def _resolve_basic(key: Any, shape: tuple[int, ...]) -> int | np.ndarray | None:
    """Tuples of integers, slices and at most one ``...`` (memory ~ the result), else None.

    An ``int`` when numpy would return one element (integers for every axis, no
    ``...``), else the positions array (0-d for ``a[0, ...]``, as numpy).
    """
    parts = key if isinstance(key, tuple) else (key,)
    if not all(
        isinstance(k, slice) or k is Ellipsis or (not _index_error_type(k) and _is_intlike(k)) for k in parts
    ):
        return None
    if sum(1 for k in parts if k is Ellipsis) > 1:
        return None
    ndim = len(shape)
    n_real = sum(1 for k in parts if k is not Ellipsis)
    if n_real > ndim:
        return None  # numpy's "too many indices" error
    ellipsis = Ellipsis in parts
    if ellipsis:
        at = next(i for i, k in enumerate(parts) if k is Ellipsis)
        parts = parts[:at] + (slice(None),) * (ndim - n_real) + parts[at + 1 :]
    else:
        parts = parts + (slice(None),) * (ndim - len(parts))
    axes: list[np.ndarray] = []
    offset = 0
    stride = 1
    strides = [0] * ndim
    for axis in range(ndim - 1, -1, -1):
        strides[axis] = stride
        stride *= shape[axis]
    for axis, (k, n) in enumerate(zip(parts, shape)):
        if isinstance(k, slice):
            axes.append(np.arange(*k.indices(n), dtype=np.intp) * strides[axis])
        else:
            i = operator.index(k)
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
            offset += j * strides[axis]
    if not axes:
        return np.asarray(offset, dtype=np.intp) if ellipsis else offset
    result = np.asarray(offset, dtype=np.intp)
    for axis_pos in np.ix_(*axes):
        result = result + axis_pos
    return result


def _is_intlike(k: Any) -> bool:
    try:
        operator.index(k)
    except TypeError:
        return False
    return True


def _as_run(flat: np.ndarray) -> range | list[int]:
    """``range(a, b)`` when ``flat`` is consecutive ascending (the decoder's fast sequential path)."""
    n = len(flat)
    if n and int(flat[-1]) - int(flat[0]) == n - 1 and (n == 1 or bool(np.all(np.diff(flat) == 1))):
        return range(int(flat[0]), int(flat[-1]) + 1)
    return flat.tolist()


# ---------------------------------------------------------------------------
# the saved index


def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _header_bytes(src: ByteSource, header: NpyHeader) -> bytes | None:
    """The raw ``.npy`` header bytes (magic to data offset), read at their offsets."""
    if not src.seekable:
        return None
    here = src.tell()
    try:
        raw = src.read_at(0, header.data_offset)
    finally:
        src.seek(here)
    return raw if len(raw) == header.data_offset else None


def load_saved_index(
    path: str, header: NpyHeader, header_raw: bytes, kind: str
) -> dict[str, np.ndarray] | None:
    """The pickle-index arrays saved for ``path`` if the ``.nsidx`` is present, intact and fresh; else None."""
    ipath = index_path_for(path)
    stat = _file_stat(path)
    try:
        isize = os.path.getsize(ipath)
    except OSError:
        return None
    if stat is None or isize > _MAX_NSIDX_BYTES:
        return None
    try:
        if not _members_fit(ipath):
            return None
        with np.load(ipath, allow_pickle=False) as z:
            meta = z["nsidx_meta"]
            if meta.shape != (len(_META_FIELDS),) or meta.dtype.kind not in "iu":
                return None
            want = (NSIDX_VERSION, stat[0], stat[1], header.data_offset, header.count, len(header_raw))
            if tuple(int(x) for x in meta) != want:
                return None
            if bytes(z["nsidx_header"].tobytes()) != header_raw:
                return None
            if str(z["nsidx_kind"][()]) != kind:
                return None
            return {name[2:]: z[name] for name in z.files if name.startswith("i_")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError, MemoryError):
        return None


def _members_fit(ipath: str) -> bool:
    """True when every member of the ``.nsidx`` zip is a fixed-dtype ``.npy`` no larger than its bytes.

    A forged member header could declare a huge shape and make ``np.load``
    allocate it before noticing the data is missing; checked here first.
    """
    with zipfile.ZipFile(ipath) as zf:
        infos = zf.infolist()
        if len(infos) > 64:
            return False
        for info in infos:
            if info.file_size > _MAX_NSIDX_BYTES:
                return False
            with zf.open(info) as f:
                member = read_header(f)
            if member.pickled or member.nbytes is None or member.data_offset + member.nbytes != info.file_size:
                return False
    return True


def save_index(
    path: str,
    header: NpyHeader,
    header_raw: bytes,
    kind: str,
    arrays: dict[str, np.ndarray],
    stat: tuple[int, int] | None = None,
) -> str | None:
    """Write ``path + '.nsidx'`` atomically; return its path, or None when it could not be written.

    ``stat`` is ``(size, mtime_ns)`` of the file when the index was built
    (default: now).  Read-only directories, full disks and files that changed
    since are not errors: nothing is written and the index stays in memory.
    """
    if stat is None:
        stat = _file_stat(path)
    if stat is None or _file_stat(path) != stat:
        return None
    ipath = index_path_for(path)
    meta = np.array(
        [NSIDX_VERSION, stat[0], stat[1], header.data_offset, header.count, len(header_raw)], dtype=np.int64
    )
    payload = {
        "nsidx_meta": meta,
        "nsidx_header": np.frombuffer(header_raw, dtype=np.uint8),
        "nsidx_kind": np.array(kind),
    }
    for name, value in arrays.items():
        payload["i_" + name] = np.asarray(value)
    try:
        with atomic_output(ipath, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                # no fsync: after a crash a short or empty .nsidx fails validation and is rebuilt
                np.savez(f, **payload)
            if _file_stat(path) != stat:  # the file changed under us: this index would be stale
                raise _StaleIndex
    except (OSError, _StaleIndex):
        return None
    return ipath


class _StaleIndex(Exception):
    """The indexed file changed while its index was written (the index is dropped)."""


# ---------------------------------------------------------------------------


def _reopen(path: str, options: dict[str, Any]) -> ObjectArray:
    """Unpickling target of :meth:`ObjectArray.__reduce__`: open ``path`` again with the same options."""
    return ObjectArray(path, **options)


class ObjectArray:
    """A pickled (object-dtype) ``.npy`` opened lazily: stream it, or index it like a numpy array.

    ``source`` is a path, binary file object, bytes or
    :class:`~npystream.sources.ByteSource`; ``header`` may be passed when the
    caller already read it (the source is then positioned at the data).
    Safety options (``trusted``, ``allowed_globals``, ``encoding``,
    ``fix_imports``) are those of :func:`npystream.iter_objects`.
    ``zero_copy`` (default: True when the source can be memory-mapped) makes
    indexing return read-only views for plain ndarray elements whose payload
    is aligned (``"always"``: aligned or not; see the module docstring).  ``nsidx``
    (default True) reads and writes the saved index ``FILE.npy.nsidx``
    beside path sources.

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "o.npy")
    >>> a = np.empty(3, dtype=object); a[:] = [np.arange(3.0), "two", {"three": 3}]
    >>> np.save(p, a)
    >>> with ObjectArray(p) as arr:
    ...     (len(arr), arr.shape, arr[1], arr[-1], arr[1:].tolist())
    (3, (3,), 'two', {'three': 3}, ['two', {'three': 3}])
    """

    def __init__(
        self,
        source: Any,
        *,
        header: NpyHeader | None = None,
        trusted: bool = False,
        allowed_globals: Any = (),
        encoding: str = "ASCII",
        fix_imports: bool = True,
        zero_copy: bool | str | None = None,
        nsidx: bool = True,
        max_header_size: int | None = None,
    ) -> None:
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be True or False, got {trusted!r}")
        if zero_copy is not None and not isinstance(zero_copy, bool) and zero_copy != "always":
            raise TypeError(f"zero_copy must be True, False, 'always' or None, got {zero_copy!r}")
        src = open_source(source)
        # A ByteSource handed over (by npystream.open, NpzArchive) becomes ours to close;
        # closing one that wraps a caller's file object leaves that file open.
        self._owns_source = True
        self._src: ByteSource | None = src
        try:
            if header is None:
                header = read_header(src) if max_header_size is None else read_header(src, max_header_size=max_header_size)
            if not header.pickled:
                raise FormatError(
                    f"this .npy holds dtype {header.dtype} (fixed-size, not pickled); ObjectArray "
                    "is for object dtypes: use npystream.open(path) to memory-map it",
                    path=src.name,
                )
            self._policy = _engine().SafetyPolicy.make(
                trusted=trusted, allowed_globals=allowed_globals, encoding=encoding, fix_imports=fix_imports
            )
            if zero_copy is None:
                zero_copy = bool(src.seekable and src.mappable)
            elif zero_copy and not (src.seekable and src.mappable):
                raise NotSeekableError(
                    "zero_copy=True needs a memory-mappable file (a path or a real file object); "
                    "this source is a stream or in memory: pass zero_copy=False",
                    path=src.name,
                )
        except BaseException:
            if self._owns_source:
                src.close()
            raise
        self._header = header
        self._zero_copy = zero_copy
        # dropped without close(): the file is closed when the object is collected (no ResourceWarning)
        self._finalizer = weakref.finalize(self, src.close) if self._owns_source else None
        self._nsidx = bool(nsidx)
        # what re-opening needs (pickling for spawned worker processes)
        self._options = {
            "trusted": trusted,
            "allowed_globals": tuple(allowed_globals) if not isinstance(allowed_globals, str) else allowed_globals,
            "encoding": encoding,
            "fix_imports": fix_imports,
            "zero_copy": zero_copy,
            "nsidx": self._nsidx,
        }
        self._index: Any = None
        self._decoder: Any = None
        # the decoder keeps unpickler state between calls: one caller at a time
        self._lock = threading.RLock()
        self._index_state = "not built"  # not built | built | loaded | saved | unsaved
        self._index_file: str | None = None
        self._consumed = False  # a forward-only source can be iterated once
        self._built_stat: tuple[int, int] | None = None  # (size, mtime_ns) when the index was scanned
        # where the pickle starts in the source: right after the header we (or open()) just read
        pos = src.tell()
        self._data_start = pos if pos >= header.data_offset else header.data_offset
        self._path = self._disk_path(src)
        #: the file, as ``np.load(file, mmap_mode='r').filename`` has it (None for streams, bytes, members)
        self.filename = numpy_filename(source) if self._path is not None else None

    # -- description -------------------------------------------------------
    @property
    def header(self) -> NpyHeader:
        """The parsed ``.npy`` header (shape, dtype, fortran_order, data_offset, version)."""
        return self._header

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape (from the header)."""
        return self._header.shape

    @property
    def dtype(self) -> np.dtype:
        """``dtype('O')``, or the structured dtype with object fields."""
        return self._header.dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._header.shape)

    @property
    def size(self) -> int:
        """Number of elements (1 for a 0-d array)."""
        return self._header.count

    @property
    def fortran_order(self) -> bool:
        """Whether numpy will give the loaded array Fortran order (elements are still streamed in C order)."""
        return self._header.fortran_order

    @property
    def path(self) -> str | None:
        """The file on disk this array is (absolute), or None (zip members, streams, in-memory bytes)."""
        return os.path.abspath(self._path) if self._path is not None else None

    @property
    def options(self) -> dict[str, Any]:
        """The options that re-open this array the same way (safety options, ``zero_copy``, ``nsidx``)."""
        return dict(self._options)

    @property
    def name(self) -> str:
        """The source's name (path) for messages."""
        return self._src.name if self._src is not None else "<closed>"

    @property
    def seekable(self) -> bool:
        """True when random access (indexing, zero-copy) is possible."""
        return self._src is not None and self._src.seekable

    @property
    def zero_copy(self) -> bool | str:
        """True (views of aligned payloads), ``"always"`` (views, aligned or not) or False (copies)."""
        return self._zero_copy


    @property
    def index_built(self) -> bool:
        """Whether the offset index is ready (built, or loaded from ``.nsidx``)."""
        return self._index is not None

    @property
    def index_state(self) -> str:
        """``'not built'``, ``'built'`` (in memory), ``'loaded'`` (from .nsidx), ``'saved'`` or ``'unsaved'`` (write failed)."""
        return self._index_state

    @property
    def index_path(self) -> str | None:
        """Where the saved index lives (or would), for path sources; None otherwise."""
        return index_path_for(self._path) if self._path is not None and self._nsidx else None

    def file_mapping(self) -> tuple[str | int, int, int, int] | None:
        """Where zero-copy views live: ``(path_or_fd, file_offset, address, size)``, or None.

        The memory map that indexing's zero-copy views point into covers
        ``size`` bytes at ``address``, which are the bytes at ``file_offset``
        of the file ``path_or_fd``: a view ``v`` with ``address <= p`` and
        ``p + v.nbytes <= address + size`` (``p = v.ctypes.data``) holds the
        file's bytes at ``file_offset + p - address`` (for copying them file
        to file).  None when the array is not zero-copy or the map is empty.
        """
        src = self._live()
        if not self._zero_copy:
            return None
        target = src.mmap_target()
        view = src.map()
        if target is None or not view.nbytes:
            return None
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        return target[0], target[1], address, view.nbytes

    def __len__(self) -> int:
        if not self._header.shape:
            raise TypeError("len() of unsized object (a 0-d object array; use arr[()] or iterate)")
        return self._header.shape[0]

    def __repr__(self) -> str:
        if self._src is None:
            return f"<ObjectArray {self._closed_name!r} closed>"
        mode = "random access" if self.seekable else "stream only"
        zc = ", zero-copy" if self._zero_copy else ""
        idx = {
            "not built": "not built",
            "built": "built (in memory)",
            "loaded": f"loaded from {self._index_file}",
            "saved": f"built, saved to {self._index_file}",
            "unsaved": "built (in memory; the .nsidx could not be written)",
        }[self._index_state]
        return (
            f"<ObjectArray {self._src.name!r} shape={self.shape} dtype={self.dtype} "
            f"({mode}{zc}; index: {idx})>"
        )

    _closed_name = "<closed>"

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Release the file (if this object opened it).  Views already returned stay valid."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._src is None:
            return
        self._closed_name = self._src.name
        decoder, self._decoder = self._decoder, None
        if decoder is not None and hasattr(decoder, "close"):
            decoder.close()
        if self._finalizer is not None:
            self._finalizer()  # closes the source, once
        self._src = None

    def __enter__(self) -> ObjectArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> ByteSource:
        if self._src is None:
            raise ValueError(f"{self._closed_name}: I/O operation on a closed ObjectArray")
        return self._src

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as "open this path again" (for spawned workers); only arrays opened from a path."""
        if self._src is None:
            raise TypeError(f"cannot pickle a closed ObjectArray ({self._closed_name})")
        if self._path is None:
            raise TypeError(
                f"cannot pickle an ObjectArray over {self._src.name!r}: only arrays opened from a "
                "path can be re-opened in another process; open it with npystream.open(path)"
            )
        return (_reopen, (self._path, self._options))

    # -- streaming -------------------------------------------------------------
    def _disk_path(self, src: ByteSource) -> str | None:
        """The file on disk this array *is* (not a zip member), when known: for the saved index."""
        if isinstance(src, FileSource) and src.path is not None and os.path.isfile(src.path):
            return src.path
        return None

    def _fresh_source(self) -> tuple[ByteSource, bool]:
        """An independent reader positioned at the pickle, and whether the caller must close it.

        Path-backed and in-memory sources get their own handle, so several
        iterations (and indexing) can interleave; a caller's file object is
        shared (seeked to the data); a forward-only stream is used as is, once.
        """
        src = self._live()
        if isinstance(src, FileSource) and src.path is not None:
            fresh: ByteSource = FileSource(open(src.path, "rb"), src.name, owned=True)  # noqa: SIM115
        elif isinstance(src, WindowSource):
            fresh = WindowSource(src.mmap_target()[0], src.mmap_target()[1], src.size or 0, src.name)
        elif isinstance(src, MemorySource):
            fresh = MemorySource(src.map(), src.name)
        else:
            fresh = src
        if fresh.seekable:
            fresh.seek(self._data_start)
        elif fresh.tell() != self._data_start:
            raise NotSeekableError(
                f"this stream was already read past the start of the data (at byte {fresh.tell()}, "
                f"data starts at byte {self._data_start}); a pipe, stdin or compressed stream can "
                "be iterated only once: open it again, or save it to a file for repeated or random access",
                path=src.name,
            )
        return fresh, fresh is not src

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the first axis like numpy: elements of a 1-D array, rows (object ndarrays) of an N-D one.

        Streams with bounded memory (one row at a time); elements are copies,
        never views.  A 0-d array raises ``TypeError`` as numpy does; use
        :attr:`flat` for every element in C order.
        """
        shape = self._header.shape
        if not shape:
            raise TypeError("iteration over a 0-d array (use arr[()] for its element, or arr.flat)")
        elements = self._iter_elements()
        if len(shape) == 1:
            return elements
        return self._iter_rows(elements, shape)

    def _iter_rows(self, elements: Iterator[Any], shape: tuple[int, ...]) -> Iterator[Any]:
        row_shape = shape[1:]
        per_row = math.prod(row_shape)
        try:
            for _ in range(shape[0]):
                yield self._make_array(list(itertools.islice(elements, per_row)), row_shape)
        finally:
            close = getattr(elements, "close", None)
            if close is not None:
                close()

    @property
    def flat(self) -> FlatObjects:
        """Every element in C order, like ``ndarray.flat``: iterate it (streaming), or index it with flat positions."""
        return FlatObjects(self)

    def _iter_elements(self) -> Iterator[Any]:
        """Stream every element in C order with bounded memory (copies, never views)."""
        src = self._live()
        if not src.seekable:
            if self._consumed:
                raise NotSeekableError(
                    "this stream has already been iterated; a pipe, stdin or compressed stream can "
                    "be read only once: open it again, or save it to a file for repeated access",
                    path=src.name,
                )
            self._consumed = True
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        fresh, owned = self._fresh_source()
        try:
            yield from _engine().iter_elements(fresh, self._header, self._policy, index=self._index)
        finally:
            if owned:
                fresh.close()

    def iter_range(self, start: int = 0, stop: int | None = None) -> Iterator[Any]:
        """Stream elements ``start..stop-1`` (flat C order; negative values count from the end).

        Goes through the offset index, so it starts at ``start`` without reading
        what comes before (a worker's shard of a big file), with the memory of
        one decoded chunk.  Elements are what ``arr[i]`` gives (read-only views
        with ``zero_copy``).  Needs a seekable source.
        """
        for name, value in (("start", start), ("stop", stop)):
            if value is not None and (isinstance(value, (bool, np.bool_)) or not _is_intlike(value)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        self._require_seekable("iter_range()")
        lo, hi, _ = slice(start, stop).indices(self.size)
        with self._lock:
            if self._index is None:
                self._build_index(save=None, rebuild=False)
        if hi <= lo:
            return iter(())
        fresh, owned = self._fresh_source()
        return self._iterate_range(fresh, owned, lo, hi)

    def _iterate_range(self, fresh: ByteSource, owned: bool, lo: int, hi: int) -> Iterator[Any]:
        try:
            yield from _engine().iter_elements(
                fresh, self._header, self._policy, index=self._index, zero_copy=self._zero_copy, start=lo, stop=hi
            )
        finally:
            if owned:
                fresh.close()

    # -- the offset index ------------------------------------------------------
    def _require_seekable(self, what: str) -> ByteSource:
        src = self._live()
        if not src.seekable:
            raise NotSeekableError(
                f"{what} needs random access, but this source can only be read forward (a pipe, "
                "stdin, gzip or a deflated .npz member); iterate over it instead (for x in arr), "
                "or save it to an uncompressed file first",
                path=src.name,
            )
        return src

    def build_index(self, *, save: bool | None = None, rebuild: bool = False) -> ObjectArray:
        """Build (or load from ``FILE.npy.nsidx``) the offset index now; returns ``self``.

        ``save`` (default: the ``nsidx`` option) writes the index beside a path
        source; ``rebuild=True`` ignores a saved index.  Raises
        :class:`~npystream.errors.NotSeekableError` on forward-only sources and
        the scan's errors (:class:`~npystream.errors.FormatError`,
        :class:`~npystream.errors.UnsafePickleError`) on damaged files.
        """
        with self._lock:
            return self._build_index(save=save, rebuild=rebuild)

    def _build_index(self, *, save: bool | None, rebuild: bool) -> ObjectArray:
        src = self._require_seekable("building the offset index")
        if self._index is not None and not rebuild:
            if save and self._path is not None and self._index_file is None:
                self._save_index()
            return self
        engine = _engine()
        kind = self._index_kind()
        header_raw = _header_bytes(src, self._header) if self._path is not None else None
        index = None
        if not rebuild and self._nsidx and self._path is not None and header_raw is not None:
            arrays = load_saved_index(self._path, self._header, header_raw, kind)
            if arrays is not None:
                try:
                    index = engine.PickleIndex.from_arrays(arrays, self._header)
                    if index.count != self._header.count or (
                        index.count and (src.size is None or index.end_of(index.count - 1) > src.size)
                    ):
                        index = None
                except (FormatError, ValueError, KeyError, TypeError, IndexError):
                    index = None
                if index is not None:
                    self._index_state = "loaded"
                    self._index_file = index_path_for(self._path)
        if index is None:
            self._built_stat = _file_stat(self._path) if self._path is not None else None
            fresh, owned = self._fresh_source()
            try:
                index = engine.scan_index(fresh, self._header, self._policy)
            finally:
                if owned:
                    fresh.close()
            self._index_state = "built"
            self._index_file = None
        self._index = index
        self._decoder = None
        want_save = self._nsidx if save is None else bool(save)
        if want_save and self._index_file is None:
            self._save_index()
        return self

    def byte_partitions(self, nbytes: int) -> np.ndarray:
        """Element boundaries ``[0, b1, ..., size]`` splitting the pickle into runs of about ``nbytes`` bytes.

        Builds the offset index if needed (and saves it as ``FILE.npy.nsidx``,
        so that other processes opening the file reuse it); each run can then
        be read on its own with :meth:`iter_range` ``(b[k], b[k+1])``.
        """
        if isinstance(nbytes, (bool, np.bool_)) or not _is_intlike(nbytes) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        with self._lock:
            self._build_index(save=None, rebuild=False)
            return self._index.split_by_bytes(operator.index(nbytes))

    def _index_kind(self) -> str:
        # PickleIndex carries its own layout version in its "meta" array and
        # from_arrays() refuses other versions; this tag names the producer.
        return "npystream.pickle_walk"

    def _save_index(self) -> None:
        if self._path is None or self._index is None:
            return
        src = self._live()
        header_raw = _header_bytes(src, self._header)
        if header_raw is None:
            return
        written = save_index(
            self._path, self._header, header_raw, self._index_kind(), self._index.to_arrays(), self._built_stat
        )
        if written is not None:
            self._index_file = written
            self._index_state = "saved"
        else:
            self._index_state = "unsaved"

    def _get_decoder(self) -> Any:
        decoder = self._decoder
        if decoder is None:
            src = self._require_seekable("indexing (arr[i])")
            if self._index is None:
                self.build_index()
            decoder = _engine().ElementDecoder(
                src, self._header, self._policy, self._index, zero_copy=self._zero_copy
            )
            self._decoder = decoder
        return decoder

    # -- random access -----------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        """numpy indexing: one element for an integer per axis, else an object ndarray of numpy's result shape.

        ``arr[i]`` on 1-D and ``arr[i, j]`` on 2-D give the element; ``arr[i]``
        on N-D gives row ``i``; slices, integer arrays, boolean masks, ``...``
        and ``None`` give new object ndarrays shaped as numpy shapes them.
        """
        decoder = self._decoder
        shape = self._header.shape
        if decoder is not None and type(key) is int and len(shape) == 1:  # hot path
            n = shape[0]
            i = key + n if key < 0 else key
            if 0 <= i < n:
                with self._lock:
                    return decoder.decode(i)
        flat, positions = resolve_key(key, shape)
        return self._take(flat, positions)

    def _take(self, flat: int | None, positions: np.ndarray | None) -> Any:
        with self._lock:
            decoder = self._get_decoder()
            if positions is None:
                return decoder.decode(flat)
            items = decoder.decode_many(_as_run(positions.ravel())) if positions.size else []
        return self._make_array(items, positions.shape)

    def _make_array(self, items: list[Any], shape: tuple[int, ...]) -> np.ndarray:
        """An ndarray of this array's dtype and ``shape`` holding ``items`` (C order) as they are."""
        dtype = self._header.dtype
        if dtype.names is None:  # object dtype: each item stored as is (never unpacked as a sequence)
            out = np.fromiter(items, dtype=dtype, count=len(items))
        else:  # structured records with object fields
            out = np.empty(len(items), dtype=dtype)
            for k, item in enumerate(items):
                out[k] = item
        return out.reshape(shape)

    def get(self, indices: Sequence[int] | np.ndarray) -> list[Any]:
        """The elements at C-order flat ``indices`` (any order, repeats allowed), as a plain list.

        The fast path for code that wants elements rather than an ndarray
        (``arr.get(range(a, b))`` is a contiguous run, decoded together).
        """
        positions = np.asarray(indices)
        if positions.size == 0:
            self._live()
            return []
        if positions.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {positions.dtype}")
        _, resolved = resolve_key(positions.ravel(), (self.size,))
        with self._lock:
            return list(self._get_decoder().decode_many(_as_run(resolved)))

    def tolist(self) -> Any:
        """Like ``ndarray.tolist`` of the object array: nested lists of the elements (as they are), read by streaming.

        Materialises every element; a 0-d array gives its element.
        """
        items = list(self._iter_elements())
        if not self.shape:
            return items[0]
        return _nest(items, self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Materialise as a real numpy array (reads everything; what ``np.load`` would return)."""
        if copy is False:
            raise ValueError("an ObjectArray can only become an ndarray by reading every element (a copy)")
        out = np.empty(self.shape, dtype=self.dtype)
        flat = out.reshape(-1)
        n = 0
        for n, item in enumerate(self._iter_elements(), 1):
            flat[n - 1] = item
        if n != self.size:  # pragma: no cover - the engine checks the count
            raise TruncatedError(f"got {n} of {self.size} elements", path=self.name)
        if self.fortran_order:
            out = np.asfortranarray(out)
        return out if dtype is None else out.astype(dtype)


class FlatObjects:
    """``ObjectArray.flat``: the elements in C order, like ``ndarray.flat`` of the object array.

    Iterating streams them (bounded memory, any source); ``flat[i]`` is element
    ``i`` (C order, negative counts from the end); slices, integer arrays and
    masks give 1-D object ndarrays, as numpy's flat iterator does.
    """

    __slots__ = ("_arr",)

    def __init__(self, arr: ObjectArray) -> None:
        self._arr = arr

    def __iter__(self) -> Iterator[Any]:
        return self._arr._iter_elements()

    def __len__(self) -> int:
        return self._arr.size

    def __getitem__(self, key: Any) -> Any:
        flat, positions = resolve_key(key, (self._arr.size,))
        return self._arr._take(flat, positions)


def _nest(items: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """Items (in C order) as nested lists of ``shape`` (like ``ndarray.tolist`` without converting)."""
    if len(shape) <= 1:
        return items
    step = len(items) // shape[0] if shape[0] else 0
    return [_nest(items[k * step : (k + 1) * step], shape[1:]) for k in range(shape[0])]
