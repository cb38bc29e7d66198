"""Virtual concatenation of memory-mapped arrays: :func:`concat` -> :class:`ConcatArray`.

``npystream.concat(["a.npy", "b.npy"], axis=0)`` maps each file (reading only
its header) and behaves like ``np.concatenate`` of them without reading or
copying any data:

* numpy indexing: integers (negative too), slices with any step, integer
  arrays and boolean masks, tuples over inner axes (``c[5:9, 3]``), ``None``
  and ``...``.  A selection that falls inside one part returns that part's
  own result (a view of its ``np.memmap`` for ints and slices: zero copy); one
  that spans parts is gathered into a new array, reading only the selected
  rows (the hull of an integer array on an inner axis);
* ``len``, ``shape``, ``dtype``, ``ndim``, ``size``, ``nbytes``, iteration over
  rows (axis 0), ``np.asarray(c)`` (reads everything), and it is an operand of
  :func:`npystream.lazy` (blocks are read part by part);
* any ``axis``: for ``axis=1`` a row is stitched from each part.

Items may be paths of ``.npy`` files, ``"archive.npz:member"`` (stored
members), arrays and memmaps, and other ``ConcatArray`` s (flattened when they
share the axis).  Shapes must agree except along ``axis``; dtypes must be equal
unless ``dtype=`` is given (each selection is then cast on read, never in
place); a mismatch raises :class:`~npystream.errors.ShapeError` naming the item
and both shapes/dtypes.

Files under a view: each file part keeps its descriptor; an indexing call
checks (``fstat``) that the file still holds the bytes its header promised and
raises :class:`~npystream.errors.TruncatedError` otherwise, instead of letting
the mapping ``SIGBUS`` -- except ``c[i]`` returning a row view, which reads no
byte (an ``fstat`` would double the cost of a row read).  A view handed out is
a plain memmap: reading it after its file was truncated can still ``SIGBUS``,
as with ``np.load``.  A file deleted after it was opened stays readable (POSIX
keeps its bytes while it is mapped).

Public structure, for other back ends (Dask, the loader): ``parts`` (the
arrays, memmaps for files), ``paths`` (the file of each part, or ``None``),
``axis``, ``offsets`` (start of each part along ``axis``, plus the total).

>>> import numpy as np
>>> c = concat([np.arange(3), np.arange(10, 14)])
>>> c.shape, c[2:5].tolist(), c[[-1, 0]].tolist(), int(c[4])
((7,), [2, 10, 11], [13, 0], 11)
"""

from __future__ import annotations

import bisect
import builtins
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from npystream.errors import ShapeError, TruncatedError, UnsupportedError

__all__ = ["concat", "ConcatArray"]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class _FilePart:
    """Where a part's bytes live: an open descriptor and the size the header promised."""

    __slots__ = ("path", "fd", "data_offset", "nbytes", "c_order")

    def __init__(self, path: str, fd: int, data_offset: int, nbytes: int, c_order: bool) -> None:
        self.path = path
        self.fd = fd
        self.data_offset = data_offset
        self.nbytes = nbytes
        self.c_order = c_order

    def check(self) -> None:
        size = os.fstat(self.fd).st_size
        if size < self.data_offset + self.nbytes:
            raise TruncatedError(
                f"the file is now {size} bytes, but the concat view needs "
                f"{self.data_offset + self.nbytes}: it was truncated after npystream.concat opened "
                "it; open the files again",
                path=self.path, offset=size,
            )


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_file(item: Any) -> tuple[Any, _FilePart | None]:
    from npystream.formats.fixed import open_npy
    from npystream.formats.npy import read_header
    from npystream.sources import open_source

    name = os.fspath(item)
    if not os.path.exists(name) and ":" in name:
        archive, member = name.rsplit(":", 1)
        if os.path.isfile(archive):
            from npystream.archive import NpzArchive

            with NpzArchive(archive) as z:
                arr = z[member]
            if not isinstance(arr, np.ndarray):
                raise UnsupportedError(f"member {member!r} holds Python objects; concat needs fixed "
                                       "dtypes", path=archive)
            return arr, None
    try:
        fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError:
        from npystream.errors import StoreNotFoundError

        raise StoreNotFoundError("no such file; concat opens existing .npy files only",
                                 path=name) from None
    try:
        with builtins.open(fd, "rb", closefd=False) as f:
            src = open_source(f)
            header = read_header(src)
            if header.pickled:
                raise UnsupportedError(
                    f"holds Python objects (dtype {header.dtype}); concat needs fixed dtypes: convert "
                    "it with `npystream convert` first", path=name)
            if header.nbytes == 0:
                order = "F" if header.fortran_order else "C"
                arr = np.zeros(header.shape, header.dtype, order=order)
            else:
                arr = open_npy(src, header, mode="r")
    except BaseException:
        os.close(fd)
        raise
    c_order = not header.fortran_order or len(header.shape) <= 1
    return arr, _FilePart(name, fd, header.data_offset, header.nbytes or 0, c_order)


def _local_slice(r: range, off: int, end: int) -> slice | None:
    """The members of ``r`` in ``[off, end)`` as a slice of the part that starts at ``off``."""
    step = r.step
    if step > 0:
        first = r.start if r.start >= off else r.start + -(-(off - r.start) // step) * step
        if first >= min(r.stop, end):
            return None
        return slice(first - off, min(r.stop, end) - off, step)
    top = end - 1
    first = r.start if r.start <= top else r.start - -(-(r.start - top) // -step) * -step
    if first < off or first <= r.stop:
        return None
    stop = max(r.stop, off - 1) - off
    return slice(first - off, None if stop < 0 else stop, step)


class ConcatArray:
    """A read-only virtual ``np.concatenate(parts, axis)``; see the module docstring."""

    def __init__(self, items: Sequence[Any], axis: int = 0, dtype: Any = None) -> None:
        if isinstance(items, (str, os.PathLike, np.ndarray)):
            raise TypeError("concat takes a sequence of arrays or paths, e.g. concat([a, b]); "
                            f"got a single {type(items).__name__}")
        items = list(items)
        if not items:
            raise ValueError("need at least one array to concatenate")
        parts: list[Any] = []
        files: list[_FilePart | None] = []
        labels: list[str] = []
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        try:
            for i, item in enumerate(items):
                if isinstance(item, (str, os.PathLike)):
                    arr, fp = _open_file(item)
                    if fp is not None:
                        self._fds.append(fp.fd)
                    parts.append(arr)
                    files.append(fp)
                    labels.append(os.fspath(item))
                elif isinstance(item, ConcatArray):
                    parts.append(item)
                    files.append(None)
                    labels.append(f"item {i} (a ConcatArray)")
                elif isinstance(item, np.ndarray) or (hasattr(item, "shape") and hasattr(item, "dtype")
                                                      and hasattr(item, "__getitem__")):
                    if np.dtype(item.dtype).hasobject:
                        raise UnsupportedError(f"item {i} holds Python objects (dtype object); concat "
                                               "needs fixed dtypes")
                    parts.append(item)
                    files.append(None)
                    labels.append(f"item {i}")
                else:
                    raise TypeError(f"item {i} is a {type(item).__name__}: concat takes .npy paths, "
                                    "arrays/memmaps and ConcatArrays")
            first = parts[0]
            ndim = len(first.shape)
            if ndim == 0:
                raise ShapeError("zero-dimensional arrays cannot be concatenated", path=labels[0])
            if not _is_int(axis):
                raise TypeError(f"axis must be an int, got {axis!r}")
            ax = int(axis) + ndim if axis < 0 else int(axis)
            if not 0 <= ax < ndim:
                raise np.exceptions.AxisError(axis, ndim)
            base_dtype = np.dtype(first.dtype)
            for part, label in zip(parts, labels):
                shape = tuple(part.shape)
                if len(shape) != ndim or shape[:ax] + shape[ax + 1:] != tuple(first.shape[:ax]) + tuple(first.shape[ax + 1:]):
                    raise ShapeError(
                        f"has shape {shape}, which does not concatenate with {labels[0]}'s "
                        f"{tuple(first.shape)} along axis {ax}: every axis but {ax} must be equal",
                        path=label)
                if dtype is None and np.dtype(part.dtype) != base_dtype:
                    raise ShapeError(
                        f"has dtype {np.dtype(part.dtype)}, {labels[0]} has {base_dtype}; pass "
                        f"dtype= (CLI: --dtype) to cast on read (e.g. concat(items, dtype={np.result_type(base_dtype, part.dtype).str!r}))",
                        path=label)
        except BaseException:
            self._finalizer()
            raise
        # flatten nested views along the same axis, so lookups stay one level deep
        flat_parts: list[Any] = []
        flat_files: list[_FilePart | None] = []
        for part, fp in zip(parts, files):
            if isinstance(part, ConcatArray) and part.axis == ax and part._cast is None:
                flat_parts.extend(part.parts)
                flat_files.extend(part._files)
            else:
                flat_parts.append(part)
                flat_files.append(fp)
        self._init(flat_parts, flat_files, ax, np.dtype(dtype) if dtype is not None else base_dtype,
                   dtype is not None)

    def _init(self, parts: list[Any], files: list[_FilePart | None], axis: int, dtype: np.dtype,
              cast: bool) -> None:
        self.parts: tuple[Any, ...] = tuple(parts)
        self._files = tuple(files)
        self.axis = axis
        self._dtype = dtype
        self._cast = dtype if cast and any(np.dtype(p.dtype) != dtype for p in parts) else None
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + int(p.shape[axis]))
        self.offsets: tuple[int, ...] = tuple(starts)
        # parts whose c[i] is a view of the part (ndarray rows, no cast): the fast path
        self._row_views = [self._cast is None and isinstance(p, np.ndarray) and p.ndim > 1 for p in parts]
        self._starts = starts[:-1]
        shape = list(parts[0].shape)
        shape[axis] = starts[-1]
        self._shape = tuple(int(d) for d in shape)

    @classmethod
    def _from_parts(cls, parts: list[Any], files: list[Any], axis: int, dtype: np.dtype,
                    cast: bool, owner: ConcatArray) -> ConcatArray:
        new = cls.__new__(cls)
        new._fds = []
        new._owner = owner  # keeps the descriptors open while the sub-view lives
        new._finalizer = weakref.finalize(new, _close_fds, new._fds)
        new._init(parts, files, axis, dtype, cast)
        return new

    # --- description ------------------------------------------------------
    @property
    def paths(self) -> tuple[str | None, ...]:
        """The file each part was mapped from (``None`` for arrays given directly)."""
        return tuple(fp.path if fp is not None else None for fp in self._files)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return math.prod(self._shape)

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        return (f"ConcatArray(shape={self._shape}, dtype={self._dtype}, axis={self.axis}, "
                f"parts={len(self.parts)})")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by file names when every part is a whole file (nothing copied), else by value."""
        dtype = self._dtype if self._cast is not None else None
        if all(fp is not None for fp in self._files):
            return (ConcatArray, (list(self.paths), self.axis, dtype))
        parts = [np.asarray(p) if isinstance(p, np.memmap) else p for p in self.parts]
        return (ConcatArray, (parts, self.axis, dtype))

    def close(self) -> None:
        """Close the file descriptors kept for truncation checks (views stay valid)."""
        self._finalizer()

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._shape[0]):
            yield self[i]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        for fp in self._files:
            if fp is not None:
                fp.check()
        out = np.concatenate([np.asarray(p) for p in self.parts], axis=self.axis,
                             dtype=self._dtype if self._cast is not None else None)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _part_result(self, p: int, key: Any) -> Any:
        fp = self._files[p]
        if fp is not None:
            fp.check()
        res = self.parts[p][key]
        return res if self._cast is None else np.asarray(res).astype(self._cast)

    # --- indexing ---------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if self.axis == 0 and (type(key) is int or isinstance(key, np.integer)):
            n = self._shape[0]
            i = int(key)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for axis 0 with size {n}")
            p = bisect.bisect_right(self._starts, i) - 1
            if self._row_views[p]:
                return self.parts[p][i - self._starts[p]]  # a view: no byte read, so no fstat
            return self._part_result(p, i - self._starts[p])
        entries, axis_pos = self._expand(key)
        sel = entries[axis_pos]
        n = self._shape[self.axis]
        if _is_int(sel):
            i = int(sel)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {int(sel)} is out of bounds for axis {self.axis} with size {n}")
            p = bisect.bisect_right(self._starts, i) - 1
            return self._part_result(p, self._with(entries, axis_pos, i - self._starts[p]))
        if isinstance(sel, slice):
            r = range(*sel.indices(n))
            if len(r) == 0:
                return self._part_result(0, self._with(entries, axis_pos, slice(0, 0)))
            p0 = bisect.bisect_right(self._starts, r[0]) - 1
            p1 = bisect.bisect_right(self._starts, r[-1]) - 1
            if p0 == p1:
                off = self._starts[p0]
                stop: int | None = r[-1] - off + (1 if r.step > 0 else -1)
                if stop is not None and stop < 0:
                    stop = None
                return self._part_result(p0, self._with(entries, axis_pos, slice(r[0] - off, stop, r.step)))
            return self._gather(entries, axis_pos, r)
        idx = sel  # an integer array
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -n or hi >= n:
                bad = lo if lo < -n else hi
                raise IndexError(f"index {bad} is out of bounds for axis {self.axis} with size {n}")
            if lo < 0:
                idx = np.where(idx < 0, idx + n, idx)
                lo, hi = int(idx.min()), int(idx.max())
            p0 = bisect.bisect_right(self._starts, lo) - 1
            p1 = bisect.bisect_right(self._starts, hi) - 1
            if p0 == p1:
                return self._part_result(p0, self._with(entries, axis_pos, idx - self._starts[p0]))
        else:
            return self._part_result(0, self._with(entries, axis_pos, idx))
        return self._gather(entries, axis_pos, idx)

    @staticmethod
    def _with(entries: list[Any], pos: int, value: Any) -> tuple[Any, ...]:
        out = list(entries)
        out[pos] = value
        return tuple(out)

    def _expand(self, key: Any) -> tuple[list[Any], int]:
        """Key entries (masks turned into index arrays, ``...`` into slices) and the entry of ``axis``."""
        if not isinstance(key, tuple):
            key = (key,)
        items: list[Any] = []
        for k in key:
            if k is None or k is Ellipsis or isinstance(k, slice) or _is_int(k):
                items.append(k)
                continue
            if isinstance(k, (bool, np.bool_)):
                raise IndexError("boolean scalar indices are not supported on a ConcatArray")
            arr = np.asarray(k)
            if isinstance(k, (list, tuple)) and arr.size == 0:
                arr = arr.astype(np.intp)  # numpy reads [] as an empty integer index
            if arr.dtype == bool:
                items.append(("mask", arr))
            elif arr.dtype.kind in "iu":
                items.append(arr.astype(np.intp, copy=False))
            else:
                raise IndexError("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis "
                                 "(`None`) and integer or boolean arrays are valid indices")
        used = sum(k[1].ndim if isinstance(k, tuple) else 1 for k in items
                   if k is not None and k is not Ellipsis)
        ndim = len(self._shape)
        if sum(1 for k in items if k is Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if used > ndim:
            raise IndexError(f"too many indices for array: array is {ndim}-dimensional, but {used} "
                             "were indexed")
        entries: list[Any] = []
        dim = 0
        axis_pos = -1
        if Ellipsis not in [k for k in items if not isinstance(k, (tuple, np.ndarray))]:
            items.append(Ellipsis)
        for k in items:
            if k is None:
                entries.append(None)
            elif k is Ellipsis:
                for _ in range(ndim - used):
                    if dim == self.axis:
                        axis_pos = len(entries)
                    entries.append(slice(None))
                    dim += 1
                used = ndim  # a second (implicit) ellipsis adds nothing
            elif isinstance(k, tuple):
                mask = k[1]
                want = self._shape[dim:dim + mask.ndim]
                if mask.shape != want:
                    raise IndexError(
                        f"boolean index did not match indexed array along axis {dim}; size of axis "
                        f"is {want[0] if want else 0} but size of corresponding boolean axis is "
                        f"{mask.shape[0] if mask.ndim else 0}")
                for arr in np.nonzero(mask):
                    if dim == self.axis:
                        axis_pos = len(entries)
                    entries.append(arr)
                    dim += 1
            else:
                if dim == self.axis:
                    axis_pos = len(entries)
                entries.append(k)
                dim += 1
        return entries, axis_pos

    def _gather(self, entries: list[Any], axis_pos: int, sel: Any) -> np.ndarray:
        """Read a selection spanning parts: per-part reads of the hull, then numpy's own indexing."""
        stage1: list[Any] = []  # per real axis, what to read from each part (axis entry: placeholder)
        stage2: list[Any] = []
        dim = 0
        for j, e in enumerate(entries):
            if e is None:
                stage2.append(None)
                continue
            size = self._shape[dim]
            if j == axis_pos:
                stage1.append(None)
                stage2.append(slice(None) if isinstance(sel, range)
                              else np.arange(sel.size).reshape(sel.shape))
            elif _is_int(e):
                i = int(e) + size if int(e) < 0 else int(e)
                if not 0 <= i < size:
                    raise IndexError(f"index {int(e)} is out of bounds for axis {dim} with size {size}")
                stage1.append(slice(i, i + 1))
                stage2.append(0)
            elif isinstance(e, slice):
                stage1.append(e)
                stage2.append(slice(None))
            else:
                arr = np.where(e < 0, e + size, e) if e.size and e.min() < 0 else e
                if arr.size and (arr.min() < 0 or arr.max() >= size):
                    bad = int(e.min()) if arr.min() < 0 else int(e.max())
                    raise IndexError(f"index {bad} is out of bounds for axis {dim} with size {size}")
                lo = int(arr.min()) if arr.size else 0
                hi = int(arr.max()) + 1 if arr.size else 0
                stage1.append(slice(lo, hi))
                stage2.append(arr - lo)
            dim += 1
        ax = self.axis
        if isinstance(sel, range):
            pieces = []
            step = sel.step
            p0 = bisect.bisect_right(self._starts, sel[0]) - 1
            p1 = bisect.bisect_right(self._starts, sel[-1]) - 1
            order = range(p0, p1 + 1) if step > 0 else range(p0, p1 - 1, -1)
            for p in order:
                sl = _local_slice(sel, self.offsets[p], self.offsets[p + 1])
                if sl is None:
                    continue
                key1 = list(stage1)
                key1[ax] = sl
                pieces.append(self._part_result(p, tuple(key1)))
            block = np.concatenate([np.asarray(x) for x in pieces], axis=ax)
        else:
            flat = sel.reshape(-1)
            pids = np.searchsorted(np.asarray(self.offsets), flat, side="right") - 1
            key1 = list(stage1)
            key1[ax] = slice(0, 0)
            template = np.asarray(self._part_result(0, tuple(key1)))
            shape = list(template.shape)
            shape[ax] = flat.size
            block = np.empty(shape, self._dtype)
            # group the positions by part (one stable sort), read each part's rows at once
            order = np.argsort(pids, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(pids, minlength=len(self.parts)))])
            dest: list[Any] = [slice(None)] * len(shape)
            for p in range(len(self.parts)):
                if bounds[p] == bounds[p + 1]:
                    continue
                where = order[bounds[p]:bounds[p + 1]]
                key1[ax] = flat[where] - self.offsets[p]
                dest[ax] = where
                block[tuple(dest)] = self._part_result(p, tuple(key1))
            if sum(1 for k in stage2 if not (isinstance(k, slice) and k == slice(None))) == 1:
                # only the axis was indexed: numpy leaves the index's dimensions in its place
                return block.reshape(block.shape[:ax] + sel.shape + block.shape[ax + 1:])
        if all(isinstance(k, slice) and k == slice(None) for k in stage2):
            return block
        return block[tuple(stage2)]

    def select(self, key: Any) -> Any:
        """Like ``c[key]``, but a basic selection (ints and slices) spanning parts is again a ConcatArray
        over views of the parts: nothing is read (used by :func:`npystream.lazy` to push indexing down)."""
        keys = key if isinstance(key, tuple) else (key,)
        if not all(isinstance(k, slice) or _is_int(k) for k in keys) or len(keys) > self.ndim:
            return self[key]
        entries = list(keys) + [slice(None)] * (self.ndim - len(keys))
        sel = entries[self.axis]
        if not isinstance(sel, slice):
            return self[key]
        n = self._shape[self.axis]
        r = range(*sel.indices(n))
        if len(r) == 0:
            return self[key]
        p0 = bisect.bisect_right(self._starts, r[0]) - 1
        p1 = bisect.bisect_right(self._starts, r[-1]) - 1
        if p0 == p1 or r.step != 1:
            return self[key]
        parts, files = [], []
        for p in range(p0, p1 + 1):
            off, end = self.offsets[p], self.offsets[p + 1]
            e = list(entries)
            e[self.axis] = slice(max(r.start, off) - off, min(r.stop, end) - off)
            fp = self._files[p]
            if fp is not None:
                fp.check()
            parts.append(self.parts[p][tuple(e)])
            files.append(None)  # a sub-view is not a whole file any more
        new_axis = self.axis - sum(1 for k in entries[:self.axis] if _is_int(k))
        return ConcatArray._from_parts(parts, files, new_axis, self._dtype, self._cast is not None, self)

    # --- writing ------------------------------------------------------------
    def copyable(self) -> bool:
        """True when the data is the parts' file bytes back to back (axis 0, whole C-order files)."""
        return (self.axis == 0 and self._cast is None
                and all(fp is not None and fp.c_order for fp in self._files))

    def save(self, path: Any, *, overwrite: bool = False, progress: bool | None = None,
             durable: bool = False) -> str:
        """Write one standard ``.npy`` (atomically); whole files along axis 0 are copied in the kernel.

        Otherwise the rows are streamed block by block (:func:`npystream.save_npy`).
        """
        if not self.copyable():
            from npystream.deferred import save_npy

            return save_npy(path, self, overwrite=overwrite, progress=progress, durable=durable)
        import sys

        from npystream._atomic import atomic_output
        from npystream._progress import ByteProgress
        from npystream.formats.fixed import _copy_range
        from npystream.formats.npy import encode_header

        name = os.fspath(path)
        header = encode_header(self._dtype, self._shape)
        show = sys.stderr.isatty() if progress is None else bool(progress)
        bar = ByteProgress(self.nbytes, show, "concat")
        try:
            with atomic_output(name, overwrite=overwrite) as tmp, builtins.open(tmp, "wb") as out:
                out.write(header)
                out.flush()
                pos = len(header)
                for fp in self._files:
                    if fp is None:  # pragma: no cover - copyable() said every part is a file
                        raise UnsupportedError("a part is not a file; use save_npy")
                    fp.check()
                    _copy_range(fp.fd, out.fileno(), fp.data_offset, fp.nbytes, bar, dst_offset=pos)
                    pos += fp.nbytes
                if durable:
                    os.fsync(out.fileno())
        finally:
            bar.close()
        return name


def concat(items: Sequence[Any], axis: int = 0, dtype: Any = None) -> ConcatArray:
    """A virtual ``np.concatenate(items, axis)`` over ``.npy`` paths, memmaps and arrays; reads nothing.

    See :class:`ConcatArray` (and the module docstring) for indexing and errors.
    """
    return ConcatArray(items, axis=axis, dtype=dtype)

