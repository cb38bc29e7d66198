"""npystream's formats as Dask collections, and parallel writers (``pip install 'npystream[dask]'``).

Reading -- :func:`to_dask`:

* a fixed-dtype ``.npy`` (path or ``np.memmap``, views included), a stored
  ``.npz`` member -> ``dask.array.Array``.  Each task maps the byte range of
  its block **by path** and copies it out;
* an object ``.npy`` -> ``dask.bag.Bag``, one partition per ~``partition_bytes``
  of pickle.  The boundaries come from the offset index, built once on the
  client and saved beside the file as ``FILE.npy.nsidx``: each worker loads it
  (once per process) and decodes only its own elements, with the same safe
  reader as :func:`npystream.iter_objects` (``trusted``, ``allowed_globals``
  and ``encoding`` travel with the tasks).  Elements are what iteration
  gives (fresh objects, never views);
* a ragged store -> ``dask.bag.Bag`` of its elements (:func:`ragged_arrays`
  gives its ``values``/``offsets`` as dask arrays, :func:`ragged_to_array` a
  ``(count, *shape)`` array when every element has the same shape);
* a ``.npz`` archive -> ``{name: collection}`` for its members;
* a virtual concatenation (``npystream.concat``) -> ``dask.array.concatenate``
  of its parts; a lazy expression (``npystream.lazy``) -> the same
  expression over dask arrays, each leaf converted as above (an in-memory
  operand of at most 1 MiB rides in the graph; a larger one is refused).

Graphs hold paths, byte offsets, shapes, dtypes, element boundaries and each
file's ``(size, mtime)`` when the graph was built -- never data: their
pickled size grows with the number of partitions, not with the file.  A task
that finds its file missing, or of another size or mtime, raises
:class:`~npystream.errors.NpyStreamError` naming the file and the partition.
Paths are absolute; on a multi-machine cluster every worker must see the
files at the same paths (a shared filesystem).  Errors raised in tasks
(:class:`~npystream.errors.UnsafePickleError` for a hostile pickle, ...) reach
the client with their type, message, path, offset and index.

Writing:

* :func:`to_ragged` -- each partition of a bag writes its own part store in
  parallel, then the client assembles them into one store and renames it
  into place (:mod:`npystream.formats.ragged_parts`): elements in bag order,
  byte-identical to :func:`npystream.save_ragged` of the same elements; a
  failed task leaves no store.
* :func:`to_npy` -- one standard ``.npy``: the client writes the header and
  sizes the file, each block is written at its byte offsets by its task,
  then the file is renamed into place.

Dask is imported inside the functions (this module's name is ``dask`` too,
so the package is always reached by absolute imports).
"""

from __future__ import annotations

import collections
import math
import os
import threading
import uuid
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from npystream._atomic import atomic_output, refuse_existing, remove_path, temp_name
from npystream.errors import CastError, NpyStreamError, StoreNotFoundError, UnsupportedError

__all__ = ["to_dask", "to_ragged", "to_npy", "ragged_arrays", "ragged_to_array", "DEFAULT_PARTITION_BYTES"]

DEFAULT_PARTITION_BYTES = 128 << 20


# --------------------------------------------------------------------------- #
# file stamps: what a worker checks before reading
# --------------------------------------------------------------------------- #


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_stamp(path: str, stamp: tuple[int, int], where: str) -> None:
    """Raise when ``path`` is missing or its ``(size, mtime_ns)`` is not ``stamp`` (``where`` names the task)."""
    try:
        now = _stamp(path)
    except FileNotFoundError:
        raise StoreNotFoundError(
            f"{where}: the file is missing on this worker; every worker must see the files at the "
            "same absolute paths (a shared filesystem)",
            path=path,
        ) from None
    if now != tuple(stamp):
        raise NpyStreamError(
            f"{where}: the file changed since the Dask graph was built (size {now[0]}, mtime_ns "
            f"{now[1]}; the graph expects size {stamp[0]}, mtime_ns {stamp[1]}); build the collection "
            "again from the current file",
            path=path,
        )


# --------------------------------------------------------------------------- #
# fixed-dtype arrays: blocks read by path
# --------------------------------------------------------------------------- #


def _extent(offset: int, shape: Sequence[int], strides: Sequence[int], itemsize: int) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` that an array of ``shape``/``strides`` at ``offset`` covers (non-empty)."""
    lo = hi = offset
    for n, s in zip(shape, strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + itemsize


def _map_view(path: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype,
              mode: str) -> np.ndarray:
    """An array over the file's bytes (mapped only over the range it covers)."""
    lo, hi = _extent(offset, shape, strides, dtype.itemsize)
    raw = np.memmap(path, dtype=np.uint8, mode=mode, offset=lo, shape=(hi - lo,))
    return np.ndarray(shape, dtype=dtype, buffer=raw, offset=offset - lo, strides=strides)


def _sub_block(offset: int, shape: Sequence[int], strides: Sequence[int], key: Any
               ) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(offset, shape, strides, dropped_axes)`` of ``view[key]`` for a key of slices and ints."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(shape) or any(k is Ellipsis or k is None for k in key):
        raise IndexError(f"block keys are slices and ints per axis, got {key!r}")
    key = key + (slice(None),) * (len(shape) - len(key))
    new_shape, new_strides, dropped = [], [], []
    for axis, (k, n, s) in enumerate(zip(key, shape, strides)):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            count = len(range(start, stop, step))
            if count:
                offset += start * s
            new_shape.append(count)
            new_strides.append(s * step)
        else:
            i = int(k)
            i = i + n if i < 0 else i
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for axis {axis} with size {n}")
            offset += i * s
            new_shape.append(1)
            new_strides.append(s)
            dropped.append(axis)
    return offset, tuple(new_shape), tuple(new_strides), tuple(dropped)


class MappedArray:
    """A fixed-dtype array in a file, described by numbers only: what a Dask graph carries.

    ``offset`` is the file offset of element ``(0, ..., 0)``; ``strides`` are
    numpy's (any layout a view of a memory map can have).  Indexing with
    slices maps just the block's bytes, checks the file's ``stamp`` first, and
    returns a fresh C-ordered copy.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...],
                 dtype: np.dtype, stamp: tuple[int, int]) -> None:
        self.path = path
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.strides = tuple(int(s) for s in strides)
        self.dtype = np.dtype(dtype)
        self.stamp = tuple(stamp)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __repr__(self) -> str:
        return f"MappedArray({self.path!r}, offset={self.offset}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        offset, shape, strides, dropped = _sub_block(self.offset, self.shape, self.strides, key)
        where = "block " + _describe_key(key)
        check_stamp(self.path, self.stamp, where)
        if math.prod(shape) == 0 or self.dtype.itemsize == 0:
            out = np.zeros(shape, dtype=self.dtype)
        else:
            try:
                view = _map_view(self.path, offset, shape, strides, self.dtype, "r")
            except (OSError, ValueError) as exc:
                raise NpyStreamError(f"{where}: cannot map the block's bytes ({exc})", path=self.path) from None
            out = np.array(view, order="C")
            del view
        return out.reshape(tuple(n for axis, n in enumerate(shape) if axis not in dropped)) if dropped else out


def _describe_key(key: Any) -> str:
    key = key if isinstance(key, tuple) else (key,)
    parts = []
    for k in key:
        if isinstance(k, slice):
            parts.append(f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}")
        else:
            parts.append(str(k))
    return "[" + ", ".join(parts) + "]"


def _root_memmap(arr: np.memmap) -> np.memmap:
    root = arr
    while isinstance(root.base, np.memmap):
        root = root.base
    return root


def mapped_array(arr: np.memmap) -> MappedArray:
    """Describe a memory-mapped array (``np.memmap`` or a view of one) by file, offset, shape and strides."""
    if not isinstance(arr, np.memmap) or getattr(arr, "filename", None) is None:
        raise TypeError(
            "to_dask needs arrays that live in a file (np.memmap from npystream.open or np.load(mmap_mode=...)); "
            "an in-memory array would travel inside the graph: use dask.array.from_array for that"
        )
    if arr.dtype.hasobject:
        raise TypeError(f"dtype {arr.dtype} holds Python objects; open the file with npystream.open() instead")
    root = _root_memmap(arr)
    if root.offset is None or getattr(root, "filename", None) is None:
        raise TypeError("this memmap does not record its file offset; open the file with npystream.open()")
    offset = int(root.offset) + (arr.__array_interface__["data"][0] - root.__array_interface__["data"][0])
    path = os.path.abspath(os.fspath(arr.filename))
    return MappedArray(path, offset, arr.shape, arr.strides, arr.dtype, _stamp(path))


def _token(*parts: Any) -> str:
    from dask.base import tokenize

    return tokenize(*parts)


def _array_of(mapped: MappedArray, chunks: Any) -> Any:
    import dask.array as da

    name = "npystream-npy-" + _token(mapped.path, mapped.stamp, mapped.offset, mapped.shape, mapped.strides,
                                     mapped.dtype.str, mapped.dtype.descr, chunks)
    meta = np.empty((0,) * mapped.ndim, dtype=mapped.dtype)
    return da.from_array(mapped, chunks=chunks, name=name, lock=False, asarray=False, fancy=False, meta=meta)


# --------------------------------------------------------------------------- #
# object .npy: partitions of elements decoded through the saved index
# --------------------------------------------------------------------------- #

# Per worker process: opened arrays (their offset index loaded once), keyed by file and options.
_OPEN: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 8


def open_cached(path: str, stamp: tuple[int, int], options: dict[str, Any]) -> Any:
    """An :class:`~npystream.ObjectArray` of ``path`` with its index loaded, reused within this process."""
    from npystream.object_array import ObjectArray

    key = (path, tuple(stamp), tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _OPEN_LOCK:
        arr = _OPEN.get(key)
        if arr is not None:
            _OPEN.move_to_end(key)
            return arr
        arr = ObjectArray(path, **options)
        try:
            arr.build_index()  # loads FILE.npy.nsidx when the client saved it
        except BaseException:
            arr.close()
            raise
        _OPEN[key] = arr
        while len(_OPEN) > _OPEN_MAX:
            _OPEN.popitem(last=False)[1].close()
        return arr


class ObjectPartitions:
    """Partition ``k`` of an object ``.npy`` is elements ``[bounds[k], bounds[k+1])`` (a picklable task input)."""

    def __init__(self, path: str, stamp: tuple[int, int], options: dict[str, Any], bounds: np.ndarray) -> None:
        self.path = path
        self.stamp = tuple(stamp)
        self.options = dict(options)
        self.bounds = np.asarray(bounds, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def read(self, k: int) -> list[Any]:
        """The elements of partition ``k`` (fresh objects), decoded with the safe reader."""
        lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
        check_stamp(self.path, self.stamp, f"partition {k} (elements {lo}..{hi - 1})")
        arr = open_cached(self.path, self.stamp, self.options)
        return list(arr.iter_range(lo, hi))


def detached(exc: NpyStreamError) -> NpyStreamError:
    """A copy of ``exc`` without its ``__context__`` chain, for sending to another process.

    The chain of an error raised inside the reader may loop back to itself
    (an internal exception that holds the error it reports); ``tblib``, which
    ``distributed`` installs to pickle exceptions, recurses forever on such
    a loop.  Type, message, path, offset and index are kept.
    """
    copy = type(exc)(exc.message, path=exc.path, offset=exc.offset, index=exc.index)
    copy.__dict__.update(exc.__dict__)
    return copy


def run_task(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, raising npystream's errors :func:`detached` (task bodies run through this)."""
    try:
        return fn(*args)
    except NpyStreamError as exc:
        err = detached(exc)
    raise err  # outside the except block: no implicit __context__


def _read_partition(parts: Any, k: int) -> list[Any]:
    return run_task(parts.read, k)


def _bag_of(parts: Any, kind: str) -> Any:
    import dask.bag as db
    from dask.highlevelgraph import HighLevelGraph

    name = f"npystream-{kind}-" + _token(parts.path, parts.stamp, repr(vars(parts)), parts.bounds)
    n = len(parts)
    dsk = {(name, k): (_read_partition, parts, k) for k in range(n)}
    return db.Bag(HighLevelGraph.from_collections(name, dsk, dependencies=[]), name, n)


def _object_bag(arr: Any, partition_bytes: int) -> Any:
    path = arr.path
    if path is None:
        raise UnsupportedError(
            "to_dask reads object arrays by path on every worker; this one is a stream, a zip member "
            "or in memory: save it to a plain .npy file first (npystream convert, or np.save)",
            path=arr.name,
        )
    stamp = _stamp(path)
    bounds = arr.byte_partitions(partition_bytes)
    if len(bounds) < 2:  # no elements: one empty partition
        bounds = np.zeros(2, dtype=np.int64)
    if arr.index_state == "unsaved":
        warnings.warn(
            f"{path}: the offset index could not be saved as {arr.index_path} (read-only directory?); "
            "every worker will scan the file to build it again",
            stacklevel=3,
        )
    options = {k: v for k, v in arr.options.items() if k in ("trusted", "allowed_globals", "encoding", "fix_imports")}
    options["zero_copy"] = False
    return _bag_of(ObjectPartitions(path, stamp, options, bounds), "objects")


# --------------------------------------------------------------------------- #
# ragged stores
# --------------------------------------------------------------------------- #


class RaggedPartitions:
    """Partition ``k`` of a ragged store (or a view of one) is its elements ``[bounds[k], bounds[k+1])``.

    ``reopen`` is the store's own pickle recipe (path, safety options, view
    range): the store is opened on the worker after the stamp of its
    ``meta.json`` is checked.
    """

    def __init__(self, path: str, stamp: tuple[int, int], reopen: Any, bounds: np.ndarray) -> None:
        self.path = path
        self.stamp = tuple(stamp)
        self.reopen = reopen
        self.bounds = np.asarray(bounds, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def read(self, k: int) -> list[Any]:
        """The elements of partition ``k``, as iterating the store gives them."""
        from npystream.formats.ragged import META

        lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
        check_stamp(os.path.join(self.path, META), self.stamp, f"partition {k} (elements {lo}..{hi - 1})")
        fn, args = self.reopen
        return list(fn(*args)[lo:hi])


def _bounds(nbytes: np.ndarray, partition_bytes: int) -> np.ndarray:
    """Element boundaries from cumulative byte counts ``nbytes`` (``[0, ..., total]``, one per element + 1)."""
    count = len(nbytes) - 1
    if count <= 0:
        return np.zeros(2, dtype=np.int64)
    targets = np.arange(1, -(-int(nbytes[-1]) // partition_bytes), dtype=np.int64) * partition_bytes
    cuts = np.searchsorted(nbytes[:count], targets, side="left")
    return np.unique(np.concatenate(([0], cuts, [count])).astype(np.int64))


def _ragged_bag(store: Any, partition_bytes: int) -> Any:
    from npystream.formats.ragged import META

    path = os.path.abspath(store.path)
    nbytes = np.zeros(len(store) + 1, dtype=np.int64)
    np.cumsum(store.lengths, out=nbytes[1:])
    nbytes *= store.dtype.itemsize
    reopen = store.__reduce__()
    return _bag_of(RaggedPartitions(path, _stamp(os.path.join(path, META)), reopen, _bounds(nbytes, partition_bytes)),
                   "ragged")


def _as_store(source: Any) -> Any:
    from npystream.formats.ragged import RaggedArray

    if isinstance(source, RaggedArray):
        return source
    return RaggedArray(source)


def ragged_arrays(store: Any, *, chunks: Any = "auto") -> tuple[Any, Any]:
    """``(values, offsets)`` of a ragged store as dask arrays (element ``i`` is ``values[offsets[i]:offsets[i+1]]``)."""
    store = _as_store(store)
    return _array_of(mapped_array(store.values), chunks), _array_of(mapped_array(store.offsets), chunks)


def ragged_to_array(store: Any, *, chunks: Any = "auto") -> Any:
    """A ragged store whose elements all have one shape ``s``, as a dask array of shape ``(count, *s)``.

    Raises ``ValueError`` naming the first element of another shape.
    """
    store = _as_store(store)
    if store.kind != "array":
        raise ValueError(f"a store of kind {store.kind!r} holds no numeric elements; use to_dask(store) (a bag)")
    count = len(store)
    shapes = store.shapes if store.ndim >= 2 else None
    first = tuple(int(n) for n in shapes[0]) if shapes is not None and count else None
    lengths = store.lengths
    step = 1 << 20
    for i in range(0, count, step):
        ln = np.asarray(lengths[i : i + step])
        bad = np.flatnonzero(ln != ln[0] if i == 0 else ln != lengths[0])
        if shapes is not None and not bad.size:
            sh = np.asarray(shapes[i : i + step])
            bad = np.flatnonzero(np.any(sh != np.asarray(first), axis=1))
        if bad.size:
            j = i + int(bad[0])
            raise ValueError(f"element {j} has another shape than element 0 ({store[j].shape} vs "
                             f"{store[0].shape}); use to_dask(store) for a bag of elements")
    values = _array_of(mapped_array(store.values), "auto")
    if store.ndim == 0:
        elem: tuple[int, ...] = ()
    elif shapes is not None:
        elem = first or (0,) * store.ndim
    else:
        elem = (int(lengths[0]) if count else 0,)
    out = values.reshape((count, *elem))
    return out.rechunk(chunks) if chunks != "auto" else out


# --------------------------------------------------------------------------- #
# the entry point
# --------------------------------------------------------------------------- #


def _check_partition_bytes(partition_bytes: Any) -> int:
    if isinstance(partition_bytes, bool) or not isinstance(partition_bytes, (int, np.integer)) or partition_bytes < 1:
        raise ValueError(f"partition_bytes must be a positive int, got {partition_bytes!r}")
    return int(partition_bytes)


def to_dask(
    source: Any,
    *,
    chunks: Any = "auto",
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    trusted: bool = False,
    allowed_globals: Iterable[Any] = (),
    encoding: str = "ASCII",
) -> Any:
    """``source`` as a Dask collection whose tasks read the file by path (see the module docstring).

    ``source``: a path (``.npy``, ``.npz``, ``ARCHIVE.npz:MEMBER``, ragged
    store directory), an ``np.memmap`` (or a view of one), an
    :class:`~npystream.ObjectArray` opened from a path, a
    :class:`~npystream.RaggedArray` or an :class:`~npystream.NpzArchive`.
    Fixed dtypes give a ``dask.array.Array`` (``chunks`` as in
    ``dask.array.from_array``); object arrays and ragged stores a
    ``dask.bag.Bag`` of ~``partition_bytes`` per partition; archives a dict.

    >>> import os, tempfile, numpy as np, npystream
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "a.npy"), np.arange(10.0))
    >>> x = npystream.to_dask(os.path.join(d, "a.npy"), chunks=4)
    >>> x.chunks, float(x.sum().compute(scheduler="sync"))
    (((4, 4, 2),), 45.0)
    >>> o = np.empty(3, dtype=object); o[:] = ["a", [1], {"b": 2}]
    >>> np.save(os.path.join(d, "o.npy"), o)
    >>> npystream.to_dask(os.path.join(d, "o.npy")).compute(scheduler="sync")
    ['a', [1], {'b': 2}]
    """
    partition_bytes = _check_partition_bytes(partition_bytes)
    options = {"trusted": trusted, "allowed_globals": allowed_globals, "encoding": encoding}
    return _to_dask(source, chunks, partition_bytes, options)


def _to_dask(source: Any, chunks: Any, partition_bytes: int, options: dict[str, Any]) -> Any:
    from npystream.archive import NpzArchive
    from npystream.formats.ragged import RaggedArray
    from npystream.object_array import ObjectArray

    if isinstance(source, np.memmap):
        return _array_of(mapped_array(source), chunks)
    if isinstance(source, np.ndarray):
        raise TypeError(
            "to_dask builds graphs that read files by path; this ndarray is in memory (use "
            "dask.array.from_array), or open the file with npystream.open() to get a memmap"
        )
    if isinstance(source, ObjectArray):
        return _object_bag(source, partition_bytes)
    if isinstance(source, RaggedArray):
        return _ragged_bag(source, partition_bytes)
    if isinstance(source, NpzArchive):
        return {name: _npz_member(source, name, chunks, partition_bytes, options) for name in source.files}
    leaf = _from_deferred(source, chunks, partition_bytes, options)
    if leaf is not None:
        return leaf
    if isinstance(source, (str, os.PathLike)):
        return _from_path(os.fspath(source), chunks, partition_bytes, options)
    raise TypeError(f"to_dask cannot read a {type(source).__name__}; pass a path, a memmap, an ObjectArray, "
                    "a RaggedArray or an NpzArchive")


def _from_deferred(source: Any, chunks: Any, partition_bytes: int, options: dict[str, Any]) -> Any:
    """Deferred collections of npystream (lazy expressions, virtual concatenations), else None.

    A lazy expression rebuilds itself with every leaf turned into a dask
    array (``evaluate_with``); a concatenation is ``da.concatenate`` of its
    parts.
    """
    evaluate_with = getattr(source, "evaluate_with", None)
    if callable(evaluate_with) and type(source).__module__.startswith("npystream."):
        return evaluate_with(lambda leaf: _leaf(leaf, chunks, partition_bytes, options))
    parts = getattr(source, "parts", None)
    if parts is not None and type(source).__name__ == "ConcatArray" and type(source).__module__.startswith("npystream."):
        import dask.array as da

        return da.concatenate([_to_dask(p, chunks, partition_bytes, options) for p in parts],
                              axis=getattr(source, "axis", 0))
    return None


_SMALL_LEAF = 1 << 20


def _leaf(leaf: Any, chunks: Any, partition_bytes: int, options: dict[str, Any]) -> Any:
    """A leaf of a lazy expression: by path when it lives in a file; a small in-memory array rides along."""
    if isinstance(leaf, np.ndarray) and not isinstance(leaf, np.memmap):
        if leaf.nbytes > _SMALL_LEAF:
            raise TypeError(
                f"a lazy expression has an in-memory array of {leaf.nbytes} bytes as an operand; a Dask "
                "graph would carry it to every worker: save it (np.save) and use npystream.open(path), "
                f"or keep in-memory operands under {_SMALL_LEAF} bytes"
            )
        import dask.array as da

        return da.from_array(leaf, chunks=-1)
    return _to_dask(leaf, chunks, partition_bytes, options)


def _npz_member(archive: Any, name: str, chunks: Any, partition_bytes: int, options: dict[str, Any]) -> Any:
    info = archive.member_info(name)
    if info.header is not None and info.header.pickled:
        raise UnsupportedError(
            f"member {name!r} holds Python objects; to_dask reads object arrays from plain .npy files "
            f"(extract it: npystream convert {archive.path}:{name} NAME.ragged, or np.save it to a file)",
            path=archive.path,
        )
    if not info.can_memmap:
        raise UnsupportedError(
            f"member {name!r} is {info.compression}; Dask tasks can only read byte ranges of stored "
            "members: write the archive with np.savez (not savez_compressed), or extract the member",
            path=archive.path,
        )
    return _array_of(mapped_array(archive[name]), chunks)


def _from_path(path: str, chunks: Any, partition_bytes: int, options: dict[str, Any]) -> Any:
    import npystream

    if os.path.isdir(path):
        from npystream.formats.ragged import RaggedArray

        store = RaggedArray(path, safe=not options["trusted"], allowed_globals=options["allowed_globals"])
        return _ragged_bag(store, partition_bytes)
    if not os.path.exists(path) and ":" in path and os.path.isfile(path.rsplit(":", 1)[0]):
        from npystream.archive import NpzArchive

        archive_path, member = path.rsplit(":", 1)
        with NpzArchive(os.path.abspath(archive_path)) as archive:
            return _npz_member(archive, member, chunks, partition_bytes, options)
    opened = npystream.open(os.path.abspath(path), **_open_options(path, options))
    try:
        return _to_dask(opened, chunks, partition_bytes, options)
    finally:
        close = getattr(opened, "close", None)
        if close is not None and not isinstance(opened, np.memmap):
            close()


def _open_options(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """Safety options only for files that may hold objects (a memmap takes none)."""
    from npystream.formats.npy import read_header

    try:
        header = read_header(path)
    except (NpyStreamError, OSError, ValueError):
        return {}
    return dict(options) if header.pickled else {}


# --------------------------------------------------------------------------- #
# writers
# --------------------------------------------------------------------------- #


def _write_bag_part(elements: Iterable[Any], path: str, k: int, writer_options: dict[str, Any]) -> str:
    from npystream.formats.ragged_parts import write_part

    run_task(lambda: write_part(elements, path, where=f"partition {k}", **writer_options))
    return path


def _copy_part(plan: Any, k: int, tmp: str, done: Any = None) -> int:
    from npystream.formats.ragged_parts import copy_part

    copy_part(plan, k, tmp)
    return k


def _compute_writes(dask: Any, writes: list[Any], dst: str) -> None:
    """Run the part writers; a CastError names the destination store (not the hidden part)."""
    try:
        dask.compute(*writes)
    except CastError as exc:
        err = CastError(exc.message, path=dst, index=exc.index)
    else:
        return
    raise err


def to_ragged(
    bag: Any,
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    kind: str | None = None,
    cast: str | None = None,
    overwrite: bool = False,
    durable: bool = False,
) -> Any:
    """Write the elements of a ``dask.bag.Bag`` to a new ragged store in parallel; return it opened.

    Each partition writes a part store of its own (hidden, beside ``path``);
    the client then checks the parts agree (kind, dtype, ndim: a
    :class:`~npystream.errors.CastError` names the partition and element
    where a sequential writer would have failed; with ``cast`` the
    partitions whose dtype differs are written again with the first one's),
    assembles them (:mod:`npystream.formats.ragged_parts`) and renames the
    store into place.  Elements keep the bag's order; any failure leaves no
    store.  ``dtype``/``kind``/``cast``/``durable`` are
    :class:`~npystream.RaggedWriter`'s.

    >>> import os, tempfile, numpy as np, dask.bag as db
    >>> bag = db.from_sequence([np.arange(n, dtype=np.int16) for n in range(6)], npartitions=3)
    >>> store = to_ragged(bag.map(lambda x: x * 2), os.path.join(tempfile.mkdtemp(), "b.ragged"))
    >>> len(store), store[5].tolist()
    (6, [0, 2, 4, 6, 8])
    """
    import dask

    from npystream.formats.ragged import RaggedArray
    from npystream.formats.ragged_parts import (
        create_target,
        describe_part,
        find_mismatch,
        finish_assembly,
        plan_assembly,
    )

    dst = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.dirname(dst)):
        raise StoreNotFoundError("the directory to write the store in does not exist; create it first",
                                 path=os.path.dirname(dst))
    refuse_existing(dst, overwrite)
    staging = temp_name(dst, "parts-" + uuid.uuid4().hex[:12])
    tmp = temp_name(dst)
    options = {"dtype": dtype, "kind": kind, "cast": cast, "durable": False}
    try:
        os.mkdir(staging)
        partitions = bag.to_delayed(optimize_graph=True)
        names = [os.path.join(staging, f"part-{k:06d}.ragged") for k in range(len(partitions))]
        writes = [dask.delayed(_write_bag_part, pure=False)(p, names[k], k, options)
                  for k, p in enumerate(partitions)]
        _compute_writes(dask, writes, dst)
        if not names:
            from npystream.formats.ragged import save_ragged

            save_ragged(tmp, [], dtype=dtype, kind=kind, durable=durable)
            from npystream._atomic import commit

            commit(tmp, dst, overwrite=overwrite)
            return RaggedArray(dst)
        infos = [describe_part(n) for n in names]
        mismatch = find_mismatch(infos)
        if mismatch is not None and cast is not None and mismatch[2]:
            ref = next(p for p in infos if p.count)
            redo = [k for k, p in enumerate(infos) if p.count and p.dtype != ref.dtype]
            again = dict(options, dtype=ref.dtype, kind="array")
            _compute_writes(dask, [dask.delayed(_write_bag_part, pure=False)(partitions[k], names[k], k, again)
                                   for k in redo], dst)
            infos = [describe_part(n) for n in names]
            mismatch = find_mismatch(infos)
        if mismatch is not None:
            k, message, _ = mismatch
            first = sum(p.count for p in infos[:k])
            raise CastError(f"partition {k} {message}; pass cast='same_kind' (or kind='object') to "
                            "store them together", path=dst, index=first)
        plan = plan_assembly(infos)
        create_target(plan, tmp)
        dask.compute(*[dask.delayed(_copy_part, pure=False)(plan, k, tmp) for k in range(len(infos))])
        finish_assembly(plan, tmp, dst, overwrite=overwrite, durable=durable)
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        remove_path(staging)
    return RaggedArray(dst)


class NpyBlockWriter:
    """``target[key] = block`` writes the block into a ``.npy`` file's data at its byte offsets (for ``da.store``)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.offset = int(offset)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        strides = []
        step = self.dtype.itemsize
        for n in reversed(self.shape):
            strides.append(step)
            step *= n
        self.strides = tuple(reversed(strides))

    def __setitem__(self, key: Any, value: Any) -> None:
        offset, shape, strides, _ = _sub_block(self.offset, self.shape, self.strides, key)
        if math.prod(shape) == 0 or self.dtype.itemsize == 0:
            return
        try:
            view = _map_view(self.path, offset, shape, strides, self.dtype, "r+")
        except FileNotFoundError:
            raise StoreNotFoundError(f"block {_describe_key(key)}: the output file is missing on this worker; "
                                     "workers must share the filesystem of the destination",
                                     path=self.path) from None
        view[...] = np.asarray(value).reshape(shape)
        view.base.flush()
        del view


def to_npy(array: Any, path: str | os.PathLike[str], *, overwrite: bool = False, durable: bool = False) -> str:
    """Write a ``dask.array.Array`` to one standard ``.npy`` (C order) in parallel; return the path.

    The client writes the header (the one encoder, :func:`npystream.formats.npy.encode_header`)
    and sizes the file under a temporary name beside ``path``; each block is
    written at its byte offsets by its own task; the file is renamed into
    place when every block is written (removed on any error).
    ``durable=True`` fsyncs it before the rename.
    """
    import dask.array as da

    from npystream.formats.npy import encode_header

    if not isinstance(array, da.Array):
        raise TypeError(f"to_npy writes a dask.array.Array, got {type(array).__name__}")
    if array.dtype.hasobject:
        raise TypeError(f"dtype {array.dtype} holds Python objects; write object arrays with "
                        "npystream.save_objects (or to_ragged for a bag)")
    if any(math.isnan(c) for cs in array.chunks for c in cs):
        raise ValueError("the array has unknown chunk sizes; call array.compute_chunk_sizes() first")
    dst = os.path.abspath(os.fspath(path))
    header = encode_header(array.dtype, array.shape)
    nbytes = math.prod(array.shape) * array.dtype.itemsize
    with atomic_output(dst, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + nbytes)
        if nbytes:
            target = NpyBlockWriter(tmp, len(header), array.shape, array.dtype)
            da.store(array, target, lock=False, compute=True)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return dst
