"""Fixed-dtype ``.npy`` data: a zero-copy ``np.memmap``, or bounded-memory batches from streams.

Byte layout of the data part (after the header described in :mod:`npystream.formats.npy`)::

    data_offset            header.nbytes bytes = prod(shape) * dtype.itemsize
                           elements in C order (fortran_order False: last axis
                           varies fastest) or Fortran order (first axis fastest),
                           in the byte order the descr says (``<``, ``>``, ``|``)
    data_offset + nbytes   end of the array; numpy ignores any bytes after it

Two ways to reach those bytes:

* :func:`open_npy` -- a seekable file on disk (or a stored ``.npz`` member) is
  mapped with ``np.memmap`` at ``data_offset``: no copy, equal to
  ``np.load(path)``.  The length is checked first, so a file shorter than its
  header promises raises :class:`~npystream.errors.TruncatedError` (a
  ``FormatError``) at open, not ``SIGBUS`` on first touch.  (A file truncated
  by someone else *after* it was opened can still ``SIGBUS``; no mmap reader
  can prevent that.)
* :func:`iter_batches` -- consecutive blocks along axis 0: views of the
  memmap for mappable files, fresh arrays read with ``readinto`` for streams
  (pipes, stdin, gzip, deflated zip members), so memory stays at one block.
  A stream must end where its header says (bytes after the data, or garbage
  after the last gzip member, raise ``FormatError``, as ``convert`` does).

**Fortran order.**  A block is always ``a[i:i + n]`` along the axis you ask
for (default ``axis=0``, numpy's ``a[i:j]``), whatever the storage order, so
code does not change meaning with the file's ``fortran_order`` flag.  For a
C-ordered file axis 0 is contiguous on disk; for a Fortran-ordered file with
``ndim >= 2`` it is the *last* axis that is contiguous.  From a mappable file
both axes work (views; axis-0 blocks of a Fortran file are strided).  From a
stream only the contiguous axis can be read with bounded memory (row 0 of a
Fortran file is spread over the whole file), so ``axis=0`` on a Fortran
stream raises :class:`~npystream.errors.UnsupportedError` and names
``axis=-1``; blocks along the last axis come back Fortran-contiguous.

**Writing.**  :func:`create_npy` writes a complete header (the one encoder in
:mod:`npystream.formats.npy`, with room for the first axis to grow), sizes the
file and returns a writable ``np.memmap``.  :func:`append_npy` grows axis 0 of
a C-order file in place, in this order: rows written after the data the header
describes (overwriting any tail an interrupted append left), fsync, then the
first ``data_offset`` bytes rewritten with the longer shape in one ``pwrite``
(:func:`~npystream.formats.npy.encode_header_in_place`), fsync.  A reader, or a
process killed at any instant, sees the old or the new shape, and the header
never promises more bytes than the file holds.  A header with no room left is
rewritten once into a temporary file that replaces the original.
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from npystream.errors import FormatError, NotSeekableError, TruncatedError, UnsupportedError
from npystream.formats.npy import MAX_HEADER_SIZE, NpyHeader, read_header
from npystream.sources import ByteSource, MemorySource, StreamSource, open_source, sniff

__all__ = ["open_npy", "iter_batches", "batches_from_source", "read_array", "BatchIterator",
           "create_npy", "append_npy",
           "DEFAULT_BATCH_BYTES"]

DEFAULT_BATCH_BYTES = 8 << 20  # 8 MiB: large enough to amortise per-block cost, small next to RAM
_READ_CHUNK = 256 << 10  # bytes per readinto call when filling a block from a stream
_MODES = {"r": "r", "readonly": "r", "r+": "r+", "readwrite": "r+", "c": "c", "copyonwrite": "c"}


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _refuse_pickled(header: NpyHeader, name: str, what: str) -> None:
    if header.pickled:
        raise UnsupportedError(
            f"{what} needs a fixed dtype, but this .npy holds Python objects "
            f"(dtype {header.dtype}, {header.count} elements, pickled); "
            "stream its elements with npystream.iter_objects(path), or open it with "
            "npystream.open(path) for random access",
            path=name,
        )


def _check_length(src: ByteSource, header: NpyHeader, start: int) -> None:
    """Raise TruncatedError when the source is shorter than the data the header promises."""
    if src.size is None or header.nbytes is None:
        return
    available = src.size - start
    if available < header.nbytes:
        raise TruncatedError(
            f"data is {max(available, 0)} bytes but the header promises {header.nbytes} "
            f"(shape {header.shape}, dtype {header.dtype}); the file is truncated: "
            "re-create or re-download it",
            path=src.name,
            offset=start + max(available, 0),
        )


def _stream_hint(src: ByteSource) -> str:
    kind = "a compressed or forward-only stream (gzip, pipe, stdin or deflated zip member)"
    if isinstance(src, StreamSource):
        kind = "a forward-only stream (gzip, pipe, stdin or deflated zip member)"
    elif not src.mappable:
        kind = "a file object without a file descriptor"
    return (
        f"it is {kind}, which cannot be memory-mapped; stream it with bounded memory with "
        "npystream.iter_batches(source, batch_size), or decompress/save it to a file "
        "on disk first (e.g. `gunzip -k x.npy.gz`) and open that"
    )


def open_npy(src: ByteSource, header: NpyHeader, *, mode: str = "r") -> np.ndarray:
    """Map the fixed-dtype data after ``header`` as an ``np.memmap`` (equal to ``np.load``).

    ``src`` must be positioned just after the header (where :func:`read_header`
    leaves it).  ``mode`` is ``np.memmap``'s: ``'r'`` read-only, ``'r+'``
    writes go to the file, ``'c'`` copy-on-write.  In-memory bytes give a plain
    ``np.ndarray`` view instead (``'c'`` gives a writable copy).  The source
    is not closed.
    """
    mm_mode = _MODES.get(mode) if isinstance(mode, str) else None
    if mm_mode is None:
        raise ValueError(
            f"mode must be 'r', 'r+' or 'c' (np.memmap's modes), got {mode!r}; "
            "'w+' would overwrite the file: use numpy.lib.format.open_memmap to create one"
        )
    _refuse_pickled(header, src.name, "memory-mapping")
    start = src.tell()
    order = "F" if header.fortran_order else "C"
    if isinstance(src, MemorySource):
        _check_length(src, header, start)
        if mm_mode == "r+":
            raise UnsupportedError(
                "mode='r+' writes through to a file, but these bytes are in memory; "
                "use mode='r' or 'c', or save them to a file",
                path=src.name,
            )
        view = src.map()[start : start + header.nbytes]
        arr = _from_bytes(view, header.dtype, header.shape, order)
        return arr.copy(order="K") if mm_mode == "c" else arr
    target = src.mmap_target() if src.mappable else None
    if target is None:
        raise NotSeekableError(_stream_hint(src), path=src.name)
    _check_length(src, header, start)
    where, base = target
    if mm_mode == "r+" and isinstance(where, int) and getattr(src, "path", None):
        where = src.path  # writing needs a writable handle: the descriptor may be read-only
    offset = base + start
    try:
        if isinstance(where, int):
            with builtins.open(where, "r+b" if mm_mode == "r+" else "rb", closefd=False) as f:
                arr = np.memmap(f, dtype=header.dtype, mode=mm_mode, offset=offset,
                                shape=header.shape, order=order)
            path = getattr(src, "path", None)
            if path is not None:  # numpy names no file for a descriptor; say which one it is
                arr.filename = os.path.abspath(path)
            return arr
        return np.memmap(where, dtype=header.dtype, mode=mm_mode, offset=offset,
                         shape=header.shape, order=order)
    except (ValueError, OverflowError) as exc:
        # The length was checked; what is left is a file that shrank since it was
        # opened, or a shape numpy cannot represent (e.g. more than 64 dimensions).
        raise FormatError(
            f"cannot map shape {header.shape} dtype {header.dtype} at byte {offset}: {exc}",
            path=src.name,
        ) from None


def _from_bytes(buf: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """An array over ``buf`` (exactly its bytes), whatever the dtype (datetime, void, itemsize 0)."""
    if dtype.itemsize == 0:
        return np.zeros(shape, dtype=dtype, order=order)
    raw = np.frombuffer(buf, dtype=np.uint8)
    return raw.view(dtype).reshape(shape, order=order)


def read_array(src: ByteSource, header: NpyHeader) -> np.ndarray:
    """Read the data after ``header`` into a fresh in-memory array (like ``np.load`` without mmap)."""
    _refuse_pickled(header, src.name, "reading a fixed-dtype array")
    _check_length(src, header, src.tell())  # a lying header must not cost a huge allocation
    order = "F" if header.fortran_order else "C"
    return _read_block(src, header.dtype, header.shape, order, index=0)


def _read_block(
    src: ByteSource, dtype: np.dtype, shape: tuple[int, ...], order: str, *, index: int
) -> np.ndarray:
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype, order=order)
    start = src.tell()
    buf = np.empty(nbytes, dtype=np.uint8)
    # Fill in slices: some streams (zip members) serve readinto through read(n) and
    # bytes concatenation, so one big call would hold a few block-sized temporaries.
    got = 0
    while got < nbytes:
        want = min(_READ_CHUNK, nbytes - got)
        n = src.readinto(buf[got : got + want])
        got += n
        if n < want:
            break
    if got < nbytes:
        raise TruncatedError(
            f"data ends {nbytes - got} bytes early: the block of shape {shape} starting at "
            f"row {index} needs {nbytes} bytes, the source had {got}; the file is truncated",
            path=src.name,
            offset=start + got,
        )
    return buf.view(dtype).reshape(shape, order=order)


def _maps(src: ByteSource) -> bool:
    """True when blocks can be views (a mappable file, or bytes in memory)."""
    return isinstance(src, MemorySource) or src.mappable


class BatchIterator(Iterator[np.ndarray]):
    """Iterator of consecutive blocks of a fixed-dtype ``.npy``; also a context manager.

    ``header`` (shape, dtype, order) is known before the first block.
    ``batch_rows`` is the number of rows (along ``axis``) per block; the last
    block may be shorter.  The source is closed at the end, on ``close()``, or
    on leaving a ``with`` block (if npystream opened it).
    """

    def __init__(
        self, src: ByteSource, header: NpyHeader, batch_rows: int, axis: int, *, owned: bool
    ) -> None:
        self.header = header
        self.batch_rows = batch_rows
        self.axis = axis
        self.name = src.name
        self._src: ByteSource | None = src
        self._owned = owned
        # Files are mapped now, so a truncated file fails at the call, not at the first block.
        self._whole = open_npy(src, header, mode="r") if _maps(src) else None
        self._gen = self._blocks(src)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the whole array."""
        return self.header.shape

    @property
    def dtype(self) -> np.dtype:
        """Dtype of every block (byte order as stored, like ``np.load``)."""
        return self.header.dtype

    def __len__(self) -> int:
        """Number of blocks in total (not the number left)."""
        if not self.header.shape:
            return 1
        return -(-self.header.shape[self.axis] // self.batch_rows)

    def _blocks(self, src: ByteSource) -> Iterator[np.ndarray]:
        header = self.header
        shape = header.shape
        rows = self.batch_rows
        whole = self._whole
        self._whole = None  # the generator holds it; close() can then release it
        if whole is not None:
            if not shape:
                yield whole
                return
            for i in range(0, shape[self.axis], rows):
                yield whole[i : i + rows] if self.axis == 0 else whole[..., i : i + rows]
            return
        order = "F" if header.fortran_order else "C"
        if not shape:
            yield _read_block(src, header.dtype, shape, order, index=0)
            _check_stream_end(src, header)
            return
        n = shape[self.axis]
        for i in range(0, n, rows):
            k = min(rows, n - i)
            block_shape = (k, *shape[1:]) if self.axis == 0 else (*shape[:-1], k)
            yield _read_block(src, header.dtype, block_shape, order, index=i)
        _check_stream_end(src, header)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        try:
            return next(self._gen)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop early and release the source (views already handed out stay valid)."""
        self._gen.close()
        self._whole = None
        if self._src is not None and self._owned:
            self._src.close()
        self._src = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<BatchIterator {self.name!r} shape={self.shape} dtype={self.dtype} "
                f"batch_rows={self.batch_rows} axis={self.axis}>")


def _check_stream_end(src: ByteSource, header: NpyHeader) -> None:
    """A stream (gzip, pipe) must end where the header says, like ``npystream convert`` requires.

    Reading one byte more also makes gzip check what follows its last member
    (trailing garbage is a FormatError from the source, as in the converter).
    """
    at = src.tell()
    if src.read(1):
        raise FormatError(
            "bytes follow the data the header describes "
            f"(shape {header.shape}, dtype {header.dtype}); expected the stream to end there",
            path=src.name,
            offset=at,
        )


def _rows_per_batch(header: NpyHeader, axis: int, batch_size: Any, batch_bytes: Any) -> int:
    if batch_size is not None:
        return int(batch_size)
    shape = header.shape
    if not shape:
        return 1
    row_items = math.prod(d for j, d in enumerate(shape) if j != axis)
    row_bytes = row_items * header.dtype.itemsize
    if row_bytes == 0:
        return max(shape[axis], 1)
    return max(1, int(batch_bytes) // row_bytes)


def _check_batch_args(batch_size: Any, batch_bytes: Any, axis: Any) -> None:
    if batch_size is not None and batch_bytes is not None:
        raise ValueError("pass batch_size (rows) or batch_bytes, not both")
    for label, value in (("batch_size", batch_size), ("batch_bytes", batch_bytes)):
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not _is_int(axis) or axis not in (0, -1):
        raise ValueError(
            f"axis must be 0 (blocks of rows, numpy's a[i:j]) or -1 (blocks of the last axis, "
            f"contiguous in a Fortran-ordered file), got {axis!r}"
        )


def batches_from_source(
    src: ByteSource,
    batch_size: int | None = None,
    *,
    batch_bytes: int | None = None,
    axis: int = 0,
    owned: bool = False,
    max_header_size: int = MAX_HEADER_SIZE,
) -> BatchIterator:
    """:func:`iter_batches` on an already-open source (closed at the end when ``owned``)."""
    _check_batch_args(batch_size, batch_bytes, axis)
    try:
        if src.seekable:
            pos = src.tell()
            head = src.read(4)
            src.seek(pos)
            if sniff(head) == "zip":
                raise UnsupportedError(
                    "this is a zip archive (.npz), not a .npy: stream one member with "
                    "npystream.open(path).iter_batches(name, batch_size)",
                    path=src.name,
                )
        header = read_header(src, max_header_size=max_header_size)
        _refuse_pickled(header, src.name, "iter_batches")
        ax = axis
        if header.shape and axis == -1:
            ax = len(header.shape) - 1
        streaming = not _maps(src)
        contiguous_axis = len(header.shape) - 1 if header.fortran_order else 0
        if streaming and len(header.shape) >= 2 and ax != contiguous_axis:
            order_word = "Fortran" if header.fortran_order else "C"
            fix = "axis=-1" if header.fortran_order else "axis=0"
            raise UnsupportedError(
                f"blocks along axis {axis} of a {order_word}-ordered array (shape {header.shape}) "
                "are spread over the whole file, so a forward-only stream cannot yield them with "
                f"bounded memory; pass {fix} (the contiguous axis), or save the data to a "
                "seekable file on disk, where any axis works as memmap views",
                path=src.name,
            )
        if not header.shape:
            ax = 0
        rows = _rows_per_batch(header, ax, batch_size,
                               DEFAULT_BATCH_BYTES if batch_bytes is None else batch_bytes)
        return BatchIterator(src, header, rows, ax, owned=owned)
    except BaseException:
        if owned:
            src.close()
        raise


def iter_batches(
    source: Any,
    batch_size: int | None = None,
    *,
    batch_bytes: int | None = None,
    axis: int = 0,
    max_header_size: int = MAX_HEADER_SIZE,
) -> BatchIterator:
    """Yield consecutive blocks of a fixed-dtype ``.npy`` along ``axis`` with bounded memory.

    ``source`` is a path, ``"-"`` (stdin), a binary file object (pipe, gzip
    file...), bytes or a :class:`~npystream.sources.ByteSource`; gzip is
    detected by content.  ``batch_size`` counts rows (entries along
    ``axis``); ``batch_bytes`` asks for blocks of at most that many bytes (at
    least one row); with neither, blocks are about 8 MiB.  Blocks from a
    file on disk are read-only views of one ``np.memmap`` (no copy); from a
    stream each is a fresh array and memory stays at about one block.  A 0-d
    array yields itself once; an array with no rows yields nothing.  See the
    module docstring for Fortran-ordered files (``axis=-1``).

    >>> import io, numpy as np
    >>> buf = io.BytesIO(); np.save(buf, np.arange(10)); _ = buf.seek(0)
    >>> [b.tolist() for b in iter_batches(buf, 4)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    _check_batch_args(batch_size, batch_bytes, axis)
    src = open_source(source)
    return batches_from_source(src, batch_size, batch_bytes=batch_bytes, axis=axis,
                               owned=src is not source, max_header_size=max_header_size)


# --------------------------------------------------------------------------- #
# writing: create a .npy to fill through a memmap, append rows in place
# --------------------------------------------------------------------------- #

_APPEND_BLOCK_BYTES = 8 << 20  # rows are written in blocks of about this many bytes


def _writable_dtype(dtype: Any, what: str, path: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise UnsupportedError(
            f"{what} needs a fixed dtype, got {dtype} (Python objects); write object arrays with "
            "npystream.save_objects(path, elements)",
            path=path,
        )
    return dtype


def create_npy(path: Any, shape: Any, dtype: Any = np.float64, fortran_order: bool = False, *,
               overwrite: bool = False) -> np.memmap:
    """Create a new ``.npy`` of ``shape``/``dtype`` and return it as a writable ``np.memmap``.

    The header is complete and correct before the data is written, so
    ``np.add(a, 2, out=create_npy("b.npy", a.shape, a.dtype))`` leaves a file
    any numpy reads.  The file is sized with ``ftruncate`` (sparse, zero-filled)
    and appears under its name only with its full header (temp + rename).
    The header leaves room for the first axis to grow (:func:`append_npy`).
    An existing ``path`` is refused unless ``overwrite=True``.
    """
    from npystream._atomic import atomic_output
    from npystream.formats.npy import encode_header

    name = os.fspath(path)
    dtype = _writable_dtype(dtype, "create_npy", name)
    shape = (int(shape),) if _is_int(shape) else tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    header = encode_header(dtype, shape, fortran_order)
    nbytes = math.prod(shape) * dtype.itemsize
    with atomic_output(name, overwrite=overwrite) as tmp:
        with builtins.open(tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + nbytes)
    if nbytes == 0:
        # np.memmap cannot map zero bytes: the file is complete, an empty array stands for it
        return np.zeros(shape, dtype=dtype, order="F" if fortran_order else "C")  # type: ignore[return-value]
    return np.memmap(name, dtype=dtype, mode="r+", offset=len(header), shape=shape,
                     order="F" if fortran_order else "C")


def append_npy(path: Any, rows: Any, *, durable: bool = True) -> tuple[int, ...]:
    """Append ``rows`` along axis 0 to the C-order ``.npy`` at ``path``, in place; return the new shape.

    ``rows`` has the file's trailing shape (``(k, *shape[1:])``, or one row of
    ``shape[1:]``) and its dtype (lists are converted to it).  Crash safety:
    the rows are written after the current data and (``durable``) fsynced, and
    only then is the shape in the header rewritten, in place, in one write of
    the first ``data_offset`` bytes -- so a process killed at any instant
    leaves a file ``np.load`` reads with either the old or the new row count
    (bytes after the data the header describes are ignored, and overwritten
    by the next append).  When the header has no room for the longer shape,
    the file is rewritten once into a temporary with a roomy header and
    renamed over the original.  Fortran-order files, 0-d files and rows of
    another trailing shape or dtype raise :class:`~npystream.errors.NpyStreamError`.
    """
    from npystream._atomic import atomic_output
    from npystream.errors import CastError, ShapeError
    from npystream.formats.npy import encode_header, encode_header_in_place

    name = os.fspath(path)
    header = read_header(name)
    _refuse_pickled(header, name, "append_npy")
    if header.fortran_order and len(header.shape) > 1:
        raise UnsupportedError(
            f"cannot append rows to a Fortran-ordered array (shape {header.shape}): its rows are "
            "not contiguous on disk; rewrite it in C order first (npystream.save_npy(new, "
            "np.ascontiguousarray(...)))",
            path=name,
        )
    if not header.shape:
        raise UnsupportedError("cannot append rows to a 0-d array (it has no first axis)", path=name)
    tail = header.shape[1:]
    if not (hasattr(rows, "shape") and hasattr(rows, "dtype")):
        try:
            rows = np.asarray(rows, dtype=header.dtype)
        except (ValueError, TypeError) as exc:
            raise CastError(f"cannot convert the rows to the file's dtype {header.dtype}: {exc}",
                            path=name) from None
    rshape = tuple(rows.shape)
    if rshape == tail:
        rows = np.asarray(rows).reshape((1, *tail))
        rshape = (1, *tail)
    if rshape[1:] != tail or len(rshape) != len(header.shape):
        raise ShapeError(
            f"rows of shape {rshape} do not fit a file of shape {header.shape}: expected "
            f"(k, {', '.join(map(str, tail))}{',' if len(tail) == 1 else ''})" if tail else
            f"rows of shape {rshape} do not fit a file of shape {header.shape}: expected (k,)",
            path=name,
        )
    if not np.can_cast(np.dtype(rows.dtype), header.dtype, casting="equiv"):
        raise CastError(
            f"rows have dtype {np.dtype(rows.dtype)}, the file holds {header.dtype}; convert them "
            f"with rows.astype({header.dtype.str!r}) if that is what you mean",
            path=name,
        )
    old_end = header.data_offset + header.nbytes
    size = os.path.getsize(name)
    if size < old_end:
        raise TruncatedError(
            f"the file is {size} bytes but its header promises {old_end}; not appending to a "
            "truncated file", path=name, offset=size,
        )
    k = rshape[0]
    new_shape = (header.shape[0] + k, *tail)
    row_bytes = math.prod(tail) * header.dtype.itemsize
    step = max(1, _APPEND_BLOCK_BYTES // row_bytes) if row_bytes else max(k, 1)

    def write_rows(f: Any) -> None:
        for i in range(0, k, step):
            block = np.ascontiguousarray(np.asarray(rows[i:i + step]), dtype=header.dtype)
            f.write(block.data if block.size else b"")

    new_header = encode_header_in_place(header, new_shape)
    if new_header is None:
        fresh = encode_header(header.dtype, new_shape)
        with atomic_output(name, overwrite=True) as tmp, builtins.open(tmp, "wb") as out, \
                builtins.open(name, "rb") as src:
            out.write(fresh)
            out.flush()
            _copy_range(src.fileno(), out.fileno(), header.data_offset, header.nbytes,
                        dst_offset=len(fresh))
            out.seek(len(fresh) + header.nbytes)
            write_rows(out)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        return new_shape
    with builtins.open(name, "r+b") as f:
        f.seek(old_end)
        write_rows(f)
        f.truncate()
        f.flush()
        if durable:
            os.fsync(f.fileno())
        os.pwrite(f.fileno(), new_header, 0)  # one write of < 1 page: the shape flips at once
        if durable:
            os.fsync(f.fileno())
    return new_shape


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, progress: Any = None,
                dst_offset: int | None = None) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to ``dst_fd`` (at its position, or at
    ``dst_offset``) in the kernel: ``copy_file_range``, else ``sendfile``, else read/write."""
    chunk = 1 << 30 if progress is None else 64 << 20
    if dst_offset is None:
        dst_offset = os.lseek(dst_fd, 0, os.SEEK_CUR)
    done = 0
    mode = "cfr" if hasattr(os, "copy_file_range") else "sendfile"
    while done < count:
        want = min(chunk, count - done)
        n = 0
        if mode == "cfr":
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, offset + done, dst_offset + done)
            except OSError:
                mode = "sendfile"
                continue
        elif mode == "sendfile":
            try:
                os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)
                n = os.sendfile(dst_fd, src_fd, offset + done, want)
            except OSError:
                mode = "rw"
                continue
        else:
            data = os.pread(src_fd, min(want, 8 << 20), offset + done)
            n = os.pwrite(dst_fd, data, dst_offset + done) if data else 0
        if n <= 0:
            raise TruncatedError(f"source ended after {offset + done} bytes, {count - done} bytes short",
                                 offset=offset + done)
        done += n
        if progress is not None:
            progress.add(n)
    os.lseek(dst_fd, dst_offset + count, os.SEEK_SET)
