"""Byte sources: one small interface over paths, file objects, pipes, gzip and zip members.

Every format reader takes a :class:`ByteSource`.  A source reads forward,
knows how many bytes it has handed out (``tell``), and says what it can do:

* ``seekable`` -- ``seek``/``read_at`` work (random access, offset index);
* ``mappable`` -- ``mmap_target()`` names a real file and the byte offset at
  which this source's byte 0 lives there, so callers can ``np.memmap`` it or
  ``map()`` it for zero-copy views;
* ``size`` -- total length in bytes when known (``None`` for pipes and
  compressed streams).

Sources know nothing of numpy formats.  :func:`sniff` is the one place that
tells a container from its first bytes (zip, gzip, or anything else).
:func:`open_source` turns whatever
the user passed (path, ``"-"`` for stdin, binary file object, bytes, an
existing source) into a source; gzip is recognised by its magic bytes and
read as a forward-only stream (seeking inside gzip is emulated by
re-decompressing, which would make "random access" quadratic).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import mmap
import os
import sys
import zipfile
import zlib
from typing import IO, Any, BinaryIO

from npystream.errors import (
    FormatError,
    NotSeekableError,
    StoreNotFoundError,
    TruncatedError,
    UnsupportedError,
)

__all__ = [
    "ByteSource",
    "FileSource",
    "StreamSource",
    "MemorySource",
    "WindowSource",
    "open_source",
    "source_name",
    "read_upto",
    "GZIP_MAGIC",
    "ZIP_MAGICS",
    "sniff",
    "sniff_path",
    "peek_head",
]

GZIP_MAGIC = b"\x1f\x8b"
# numpy's two zip prefixes (np.load): a local file header, or the end record of an empty archive.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
HEAD_BYTES = 8  # enough for every magic any reader checks (.npy's is 6)
# What gzip/zlib/zipfile raise on cut or corrupt compressed data (EOFError: cut gzip).
_DECOMPRESS_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile)
DECOMPRESS_ERRORS = _DECOMPRESS_ERRORS  # for readers that decompress outside a ByteSource (convert)
_SKIP_CHUNK = 1 << 20


def read_upto(f: Any, n: int) -> bytes:
    """Read ``n`` bytes from file object ``f``, fewer only at its end.

    A file object may return fewer bytes than asked (pipes, sockets, raw
    files, wrappers that read in random sizes, as numpy's own tests feed
    ``np.load``), so every read from a caller's object loops.
    """
    if n <= 0:
        return b""
    chunk = f.read(n)
    if not chunk or len(chunk) >= n:
        return bytes(chunk or b"")
    parts = [bytes(chunk)]
    got = len(chunk)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(bytes(more))
        got += len(more)
    return b"".join(parts)


def source_name(obj: object) -> str:
    """A printable name for error messages: the path, or the file object's name, or its type."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj) if not isinstance(obj, bytes) else obj.decode(errors="replace")
    name = getattr(obj, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)) and name:
        return str(os.fspath(name)) if not isinstance(name, bytes) else name.decode(errors="replace")
    return f"<{type(obj).__name__}>"


class ByteSource:
    """A forward byte stream that knows its position and whether it can seek or be mapped."""

    name: str = "<bytes>"
    seekable: bool = False
    mappable: bool = False
    size: int | None = None

    # -- forward reading -------------------------------------------------
    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes (fewer only at end of data)."""
        raise NotImplementedError

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` (a writable buffer) as far as data allows; return the count."""
        view = memoryview(buf).cast("B")
        total = 0
        while total < len(view):
            chunk = self.read(len(view) - total)
            if not chunk:
                break
            view[total : total + len(chunk)] = chunk
            total += len(chunk)
        return total

    def read_exact(self, n: int, what: str = "data") -> bytes:
        """Read exactly ``n`` bytes or raise :class:`TruncatedError` naming the offset and ``what``."""
        start = self.tell()
        parts = []
        got = 0
        while got < n:
            chunk = self.read(n - got)
            if not chunk:
                raise TruncatedError(
                    f"file ends after {got} of the {n} bytes of {what}",
                    path=self.name,
                    offset=start + got,
                )
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def tell(self) -> int:
        """Bytes consumed from the start of this source."""
        raise NotImplementedError

    def skip(self, n: int) -> None:
        """Move forward ``n`` bytes (seek when possible, else read and discard)."""
        if self.seekable:
            target = self.tell() + n
            if self.size is not None and target > self.size:
                raise TruncatedError(
                    f"file ends {target - self.size} bytes before the end of a {n}-byte skip",
                    path=self.name,
                    offset=self.size,
                )
            self.seek(target)
            return
        left = n
        while left > 0:
            chunk = self.read(min(left, _SKIP_CHUNK))
            if not chunk:
                raise TruncatedError(
                    f"file ends {left} bytes before the end of a {n}-byte skip",
                    path=self.name,
                    offset=self.tell(),
                )
            left -= len(chunk)

    # -- random access -----------------------------------------------------
    def seek(self, offset: int) -> None:
        """Go to absolute ``offset`` (seekable sources only)."""
        raise NotSeekableError(
            "this source can only be read forward (a pipe, stdin or a compressed stream); "
            "random access needs a seekable file: save it to disk first",
            path=self.name,
        )

    def read_at(self, offset: int, n: int) -> bytes:
        """Read up to ``n`` bytes at ``offset`` (seekable only); moves the position."""
        self.seek(offset)
        return self.read(n)

    def mmap_target(self) -> tuple[str | int, int] | None:
        """``(path_or_fileno, base_offset)`` of the real file holding this source, or None."""
        return None

    def map(self) -> memoryview:
        """A read-only memoryview of the whole source (mappable sources only)."""
        raise NotSeekableError("this source cannot be memory-mapped", path=self.name)

    def release_pages(self, start: int, end: int) -> None:
        """Drop the mapping's pages of bytes ``[start, end)`` (whole pages) from this process.

        A hint for readers done with that part of a mapped file: the file's
        pages stay in the page cache and views into them stay valid (the next
        access maps them again), but the process no longer holds them, so
        that closing the map at the end (and the resident size) does not
        grow with the file.  A no-op for unmapped sources.
        """

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Release the underlying file if this source opened it."""

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        flags = [f for f in ("seekable", "mappable") if getattr(self, f)]
        return f"<{type(self).__name__} {self.name!r} {' '.join(flags) or 'stream'}>"


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # not on Windows


class _MapMixin:
    """Lazily create one read-only mmap of ``mmap_target()`` and serve views of it."""

    _mm: mmap.mmap | None = None
    _view: memoryview | None = None

    def map(self) -> memoryview:  # type: ignore[override]
        if self._view is None:
            target = self.mmap_target()  # type: ignore[attr-defined]
            size = self.size  # type: ignore[attr-defined]
            if target is None or size is None:
                raise NotSeekableError("this source cannot be memory-mapped", path=self.name)  # type: ignore[attr-defined]
            where, base = target
            if size == 0:
                self._view = memoryview(b"")
                return self._view
            if isinstance(where, int):
                fd = where
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            else:
                with open(where, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._mm = mm
            self._view = memoryview(mm)[base : base + size]
        return self._view

    def release_pages(self, start: int, end: int) -> None:
        mm = self._mm
        target = self.mmap_target()  # type: ignore[attr-defined]
        if mm is None or target is None or end <= start or _DONTNEED is None:
            return
        base = target[1]
        lo = (base + start) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = (base + end) // mmap.PAGESIZE * mmap.PAGESIZE  # the page holding `end` stays
        if hi > lo:
            with contextlib.suppress(OSError, ValueError):  # a hint: never an error
                mm.madvise(_DONTNEED, lo, hi - lo)

    def _close_map(self) -> None:
        # Views handed out keep the mapping alive through their exporter;
        # an mmap with live exports refuses close(), which is fine: it is
        # closed when the last view dies.
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                pass
            self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


class FileSource(_MapMixin, ByteSource):
    """A seekable binary file (opened from a path, or a caller's file object we do not close)."""

    def __init__(self, file: BinaryIO | IO[bytes], name: str, *, owned: bool) -> None:
        self._f = file
        self.name = name
        self._owned = owned
        self.seekable = True
        start = file.tell()
        file.seek(0, os.SEEK_END)
        self.size = file.tell()
        file.seek(start)
        self._path: str | None = None
        fileno = None
        try:
            fileno = file.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            fileno = None
        self._fileno = fileno
        if owned:
            self._path = name
        elif fileno is not None and isinstance(getattr(file, "name", None), str) and os.path.isfile(file.name):
            self._path = file.name
        self.mappable = fileno is not None

    def read(self, n: int) -> bytes:
        return read_upto(self._f, n)

    def readinto(self, buf: Any) -> int:
        readinto = getattr(self._f, "readinto", None)
        if readinto is None:
            return super().readinto(buf)
        view = memoryview(buf).cast("B")
        total = 0
        while total < len(view):
            got = readinto(view[total:])
            if not got:
                break
            total += got
        return total

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int) -> None:
        self._f.seek(offset)

    def mmap_target(self) -> tuple[str | int, int] | None:
        # the descriptor first: it is the file whose header was read, even if the path was
        # replaced since (mapping by path would map whatever is at the path now)
        if self._fileno is not None:
            return self._fileno, 0
        if self._path is not None:
            return self._path, 0
        return None

    @property
    def path(self) -> str | None:
        """The file's path on disk, when known (for ``np.memmap``)."""
        return self._path

    def close(self) -> None:
        self._close_map()
        if self._owned:
            self._f.close()


class StreamSource(ByteSource):
    """A forward-only stream: pipe, stdin, socket file, gzip or deflated zip member."""

    def __init__(
        self,
        file: IO[bytes],
        name: str,
        *,
        owned: bool,
        size: int | None = None,
        also_close: IO[bytes] | None = None,
    ) -> None:
        self._f = file
        self.name = name
        self._owned = owned
        self._also_close = also_close
        self._pos = 0
        self.size = size

    def _bad_data(self, exc: Exception) -> FormatError:
        """Decompressor errors (cut or corrupt gzip/zip data) as our errors, with name and offset."""
        if isinstance(exc, EOFError):
            return TruncatedError(
                f"the compressed stream ends early ({exc}); the file is truncated",
                path=self.name,
                offset=self._pos,
            )
        return FormatError(
            f"the compressed data is corrupt ({type(exc).__name__}: {exc})",
            path=self.name,
            offset=self._pos,
        )

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except TruncatedError:
            raise
        except _DECOMPRESS_ERRORS as exc:
            raise self._bad_data(exc) from None

    def readinto(self, buf: Any) -> int:
        try:
            return self._readinto(buf)
        except TruncatedError:
            raise
        except _DECOMPRESS_ERRORS as exc:
            raise self._bad_data(exc) from None

    def _read(self, n: int) -> bytes:
        chunk = read_upto(self._f, n)  # pipes return short counts: loop until n or EOF
        self._pos += len(chunk)
        return chunk

    def _readinto(self, buf: Any) -> int:
        readinto = getattr(self._f, "readinto", None)
        if readinto is None:
            got = super().readinto(buf)
            return got
        view = memoryview(buf).cast("B")
        total = 0
        while total < len(view):
            got = readinto(view[total:])
            if not got:
                break
            total += got
        self._pos += total
        return total

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._owned:
            self._f.close()
        if self._also_close is not None:
            self._also_close.close()


class MemorySource(ByteSource):
    """Bytes already in memory (tests, small inputs); seekable and 'mappable' as a memoryview."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<bytes>") -> None:
        self._view = memoryview(data).cast("B")
        self.name = name
        self.size = len(self._view)
        self.seekable = True
        self._pos = 0

    def read(self, n: int) -> bytes:
        end = min(self._pos + max(n, 0), self.size or 0)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        self._pos = offset

    def map(self) -> memoryview:
        return self._view.toreadonly()


class WindowSource(_MapMixin, ByteSource):
    """A byte range ``[base, base + size)`` of a seekable file: a stored (uncompressed) zip member.

    Reads go through its own file handle, so several windows on one archive are independent.
    """

    def __init__(self, path: str, base: int, size: int, name: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._path = path
        self._base = base
        self.size = size
        self.name = name
        self.seekable = True
        self.mappable = True
        self._pos = 0
        self._f.seek(base)

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self.size - self._pos))  # type: ignore[operator]
        chunk = self._f.read(n)
        self._pos += len(chunk)
        return chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        self._pos = offset
        self._f.seek(self._base + offset)

    def mmap_target(self) -> tuple[str | int, int]:
        return self._path, self._base

    def close(self) -> None:
        self._close_map()
        self._f.close()


def sniff(head: bytes) -> str | None:
    """The container a file's first bytes announce: ``"zip"``, ``"gzip"``, or None for anything else.

    Zip is numpy's rule (:data:`ZIP_MAGICS`); a ``.npy`` is None here (its
    magic is the format reader's business).

    >>> sniff(b"PK\\x03\\x04rest"), sniff(b"\\x1f\\x8b\\x08"), sniff(b"\\x93NUMPY")
    ('zip', 'gzip', None)
    """
    head = bytes(head[:4])
    if head in ZIP_MAGICS:
        return "zip"
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    return None


def sniff_path(path: Any) -> tuple[str | None, bytes]:
    """``(sniff(head), head)`` for the first :data:`HEAD_BYTES` bytes of a regular file.

    ``(None, b"")`` for anything else:
    ``"-"`` (stdin), directories and missing paths (the caller's reader
    reports those).
    """
    path = os.fspath(path)
    if path == "-" or not os.path.isfile(path):
        return None, b""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return sniff(head), head


def peek_head(f: Any, n: int = HEAD_BYTES) -> bytes:
    """Up to ``n`` next bytes of binary file object ``f`` without consuming them, or ``b""``.

    A seekable file is read and sought back; a buffered stream is peeked
    (which waits for its first bytes); anything else, or an error, gives ``b""``.
    """
    try:
        if _is_seekable(f):
            pos = f.tell()
            head = read_upto(f, n)
            f.seek(pos)
        else:
            peek = getattr(f, "peek", None)
            head = peek(n)[:n] if peek is not None else b""
    except (OSError, ValueError, AttributeError):
        return b""
    return bytes(head) if isinstance(head, (bytes, bytearray, memoryview)) else b""


def _has_gzip_magic(f: IO[bytes]) -> bool:
    """True when the next bytes of ``f`` are the gzip magic; never consumes them."""
    return sniff(peek_head(f)) == "gzip"


def _is_seekable(f: IO[bytes]) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def open_source(obj: Any, *, name: str | None = None) -> ByteSource:
    """Turn a path, ``"-"`` (stdin), binary file object, bytes or source into a :class:`ByteSource`.

    Paths to gzip data (detected by magic bytes, whatever the suffix) and
    ``gzip.GzipFile`` objects become forward-only streams.  A caller's file
    object is never closed by the source; a path the source opened is.
    A missing path raises :class:`StoreNotFoundError` (a ``FileNotFoundError``).
    """
    if isinstance(obj, ByteSource):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return MemorySource(obj, name or "<bytes>")
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path == "-":
            stdin = sys.stdin.buffer
            if _has_gzip_magic(stdin):  # `cat x.npy.gz | ...`: peeks, so waits for the first bytes
                return StreamSource(gzip.GzipFile(fileobj=stdin, mode="rb"), name or "<stdin>", owned=True)
            return StreamSource(stdin, name or "<stdin>", owned=False)
        if os.path.isdir(path):
            raise UnsupportedError(
                "is a directory, not a .npy, .npz or gzip file; a ragged store (NAME.ragged) opens with "
                "npystream.open(path), whose iter_batches() streams its values",
                path=path,
            )
        try:
            f = open(path, "rb")  # noqa: SIM115 - owned by the source
        except FileNotFoundError:
            raise StoreNotFoundError("no such file", path=path) from None
        if _has_gzip_magic(f):
            return StreamSource(
                gzip.GzipFile(fileobj=f, mode="rb"), name or path, owned=True, also_close=f
            )
        if not _is_seekable(f):  # a FIFO or character device given by path
            return StreamSource(f, name or path, owned=True)
        return FileSource(f, name or path, owned=True)
    if isinstance(obj, zipfile.ZipExtFile):
        return StreamSource(obj, name or source_name(obj), owned=False)
    if hasattr(obj, "read"):
        label = name or source_name(obj)
        if isinstance(obj, gzip.GzipFile):
            return StreamSource(obj, label, owned=False)
        if _has_gzip_magic(obj):  # raw gzip bytes: decompress (closing the wrapper keeps obj open)
            return StreamSource(gzip.GzipFile(fileobj=obj, mode="rb"), label, owned=True)
        if not _is_seekable(obj):
            return StreamSource(obj, label, owned=False)
        return FileSource(obj, label, owned=False)
    raise TypeError(
        f"expected a path, '-', a binary file object, bytes or a ByteSource, got {type(obj).__name__}"
    )
