"""Lazy ``.npz`` archives: a read-only mapping whose stored members are ``np.memmap`` views.

Byte layout (PKWARE APPNOTE; what ``np.savez`` / ``np.savez_compressed`` write)::

    for each member:
      local file header   b"PK\\x03\\x04", 26 fixed bytes; at +26 the file-name
                          length n (uint16 LE), at +28 the extra-field length m
                          (uint16 LE); then the name (n bytes) and extra (m bytes,
                          ZIP64 sizes live here: numpy always writes force_zip64)
      member data         at header_offset + 30 + n + m: a whole .npy file,
                          stored (method 0) or deflated (method 8)
    central directory     one record per member: name, method, sizes, CRC,
                          header_offset (ZIP64 extra when >= 4 GiB)
    [ZIP64 end record + locator]   when offsets/sizes/count overflow 32/16 bits
    end of central dir    b"PK\\x05\\x06" ...

Opening an archive reads only the end record and the central directory (via
:mod:`zipfile`).  A stored member's ``.npy`` bytes are contiguous in the zip
file, so after reading its 30-byte local header and its ``.npy`` header the
array is an ``np.memmap`` at ``data start + data_offset``: no copy, no
extraction.  The local header's extra length MUST be read from the local
header (it may differ from the central directory's).  Deflated members cannot
be mapped; they are read with :meth:`NpzArchive.load` (into memory) or
streamed with :meth:`NpzArchive.iter_batches`.  CRCs are not checked for
memory-mapped members (that would read the whole member); streamed members
are checked by :mod:`zipfile` when they are read to the end, and
:meth:`NpzArchive.load` checks stored members (it reads them whole anyway).

Member names follow numpy: ``arr_0.npy`` is available as ``'arr_0'`` (the
full file name works too).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream.errors import (
    FormatError,
    NotSeekableError,
    StoreNotFoundError,
    TruncatedError,
    UnsupportedError,
)
from npystream.formats.fixed import BatchIterator, batches_from_source, open_npy, read_array
from npystream.formats.npy import MAX_HEADER_SIZE, NpyHeader, read_header
from npystream.sources import ByteSource, MemorySource, StreamSource, WindowSource, read_upto

__all__ = ["NpzArchive", "NpzMember"]

_LOCAL = struct.Struct("<4s22xHH")  # signature, (skipped fixed fields), name length, extra length
_LOCAL_MAGIC = b"PK\x03\x04"
# Options passed on to ObjectArray for object-dtype members (see npystream.archive.NpzArchive).
_OBJECT_OPTIONS = frozenset({"trusted", "allowed_globals", "encoding", "fix_imports", "zero_copy", "nsidx"})
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflated",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}


@dataclass(frozen=True)
class NpzMember:
    """What the zip directory and the member's ``.npy`` header say about one member."""

    name: str
    filename: str
    compression: str
    file_size: int
    compress_size: int
    header: NpyHeader | None
    error: str | None
    data_offset: int | None

    @property
    def can_memmap(self) -> bool:
        """True when ``archive[name]`` returns an ``np.memmap`` (stored, fixed dtype)."""
        return (
            self.compression == "stored"
            and self.header is not None
            and not self.header.pickled
            and self.data_offset is not None
        )


class NpzArchive(Mapping[str, np.ndarray]):
    """A ``.npz`` opened lazily: ``archive[name]`` maps a stored member, nothing is extracted.

    Works as a context manager; :meth:`close` releases the zip file (arrays
    already returned stay valid: each ``np.memmap`` holds its own mapping).

    >>> import io, os, tempfile, numpy as np
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "x.npz")
    >>> np.savez(p, x=np.arange(3), w=np.ones((2, 2)))
    >>> with NpzArchive(p) as z:
    ...     (list(z), type(z["w"]).__name__, z["x"].tolist())
    (['x', 'w'], 'memmap', [0, 1, 2])
    """

    def __init__(
        self, file: Any, *, max_header_size: int = MAX_HEADER_SIZE, **object_options: Any
    ) -> None:
        unknown = sorted(set(object_options) - _OBJECT_OPTIONS)
        if unknown:
            raise TypeError(
                f"NpzArchive got unexpected options {unknown}; it takes max_header_size and, "
                f"for object members, {sorted(_OBJECT_OPTIONS)}"
            )
        self._object_options = object_options
        self._fileobj: Any = None  # a caller's file object without a path on disk (we never close it)
        if not isinstance(file, (str, os.PathLike)):
            if not (hasattr(file, "read") and hasattr(file, "seek")):
                raise TypeError(
                    f"NpzArchive needs a path to a .npz file or a seekable binary file object, "
                    f"got {type(file).__name__}"
                )
            name = getattr(file, "name", None)
            if isinstance(name, str) and os.path.isfile(name):
                file = name  # a real file: map its stored members like for a path
            else:
                self._fileobj = file
        if self._fileobj is not None:
            self.path = f"<{type(self._fileobj).__name__}>"
        else:
            path = os.fspath(file)
            self.path = path.decode() if isinstance(path, bytes) else path
        self._max_header_size = max_header_size
        try:
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(
                self._fileobj if self._fileobj is not None else self.path
            )
        except FileNotFoundError:
            raise StoreNotFoundError("no such file", path=self.path) from None
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):  # pragma: no cover - caught above
                raise
            raise FormatError(
                f"not a valid .npz (zip) archive: {exc}; expected a file written by np.savez "
                "or np.savez_compressed",
                path=self.path,
            ) from exc
        except NotImplementedError as exc:  # "zip file version 14.9" and the like
            raise UnsupportedError(
                f"the zip archive needs a feature Python's zipfile lacks ({exc}); expected a file "
                "written by np.savez or np.savez_compressed",
                path=self.path,
            ) from exc
        if self._fileobj is not None:
            self._size = self._fileobj.seek(0, os.SEEK_END)
        else:
            self._size = os.path.getsize(self.path)
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            self._infos[key] = info
        self._starts: dict[str, int] = {}

    # -- mapping protocol --------------------------------------------------
    @property
    def files(self) -> list[str]:
        """Member names as numpy's ``NpzFile.files`` gives them (``.npy`` stripped)."""
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def _key(self, name: str) -> str | None:
        if name in self._infos:
            return name
        if name.endswith(".npy") and name[:-4] in self._infos:
            return name[:-4]
        return None

    def _info(self, name: str) -> tuple[str, zipfile.ZipInfo]:
        if self._zip is None:
            raise ValueError(f"{self.path}: the archive is closed")
        key = self._key(name) if isinstance(name, str) else None
        if key is None:
            names = ", ".join(repr(k) for k in list(self._infos)[:20])
            more = "" if len(self._infos) <= 20 else f" and {len(self._infos) - 20} more"
            raise KeyError(f"{name!r} is not a member of {self.path}; members: {names}{more}")
        return key, self._infos[key]

    def __getitem__(self, name: str) -> np.ndarray:
        """A stored fixed-dtype member as a read-only ``np.memmap``; an object member as an ObjectArray.

        A compressed fixed-dtype member raises :class:`~npystream.errors.NotSeekableError`
        naming :meth:`load` and :meth:`iter_batches`.
        """
        key, info = self._info(name)
        src = self.member_source(key)
        handed_over = False
        try:
            header = read_header(src, max_header_size=self._max_header_size)
            if header.pickled:
                handed_over = True  # the ObjectArray owns (and closes) the source from here
                return self._object_member(key, src, header)
            if info.compress_type != zipfile.ZIP_STORED:
                method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
                raise NotSeekableError(
                    f"member {key!r} is compressed ({method}, as np.savez_compressed writes) and "
                    f"cannot be memory-mapped; read it into memory with archive.load({key!r}) or "
                    f"stream it with bounded memory with archive.iter_batches({key!r}, batch_size)",
                    path=self.path,
                )
            return open_npy(src, header, mode="r")
        finally:
            if not handed_over:
                src.close()

    def _object_member(self, key: str, src: ByteSource, header: NpyHeader) -> Any:
        """The reader of an object member; it takes ownership of ``src``.

        Formats do not unpickle: this base refuses with a clear error, and
        :class:`npystream.NpzArchive` (in :mod:`npystream.archive`, what
        ``npystream.open`` returns) overrides it to return an
        :class:`~npystream.ObjectArray` with the archive's safety options.
        """
        src.close()
        raise UnsupportedError(
            f"member {key!r} holds Python objects (dtype {header.dtype}, {header.count} "
            "elements, pickled); npystream.formats.npz.NpzArchive maps fixed-dtype members only: "
            "open the archive with npystream.open(path) or npystream.NpzArchive(path), which "
            "read object members",
            path=self.path,
        )

    # -- explicit access -----------------------------------------------------
    def load(self, name: str, *, max_bytes: int | None = None) -> np.ndarray:
        """Read a member into a fresh in-memory array (stored, deflated, and object members).

        Only the bytes the member's ``.npy`` header promises are read (never
        more, whatever the zip directory says), after checking that the
        directory's size holds them.  ``max_bytes`` refuses a member whose
        data would exceed it before anything is inflated (a zip bomb:
        2 MB that inflate to 2 GiB).  The zip CRC is checked: by
        :mod:`zipfile` for deflated members, here for stored ones.
        """
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
        key, info = self._info(name)
        if max_bytes is not None and info.file_size > max_bytes:
            raise FormatError(
                f"member {key!r} inflates to {info.file_size} bytes, over max_bytes={max_bytes}; "
                "raise max_bytes or stream it with iter_batches()",
                path=self.path,
            )
        src = self.member_source(key)
        try:
            header = read_header(src, max_header_size=self._max_header_size)
        except BaseException:
            src.close()
            raise
        if header.pickled:
            if info.compress_type == zipfile.ZIP_STORED:
                self._check_crc(key, info, None, None)
            with self._object_member(key, src, header) as objects:
                return np.asarray(objects)
        with src:
            if max_bytes is not None and header.nbytes is not None and header.nbytes > max_bytes:
                raise FormatError(
                    f"member {key!r} holds {header.nbytes} bytes of data (shape {header.shape}, dtype "
                    f"{header.dtype}), over max_bytes={max_bytes}; raise max_bytes or stream it with "
                    "iter_batches()",
                    path=self.path,
                )
            arr = read_array(src, header)
        if info.compress_type == zipfile.ZIP_STORED:
            self._check_crc(key, info, header, arr)
        return arr

    def _check_crc(self, key: str, info: zipfile.ZipInfo, header: NpyHeader | None, arr: Any) -> None:
        """Compare a stored member's CRC-32 with the zip directory's (np.load raises BadZipFile too).

        With ``arr`` (the data just read) only the header and any bytes after
        the data are read again; without, the whole member, in 1 MiB steps.
        """
        start = self._data_start(key, info)
        crc = 0
        pos = 0
        if arr is not None and header is not None and header.nbytes:
            crc = zlib.crc32(self._read_at(start, header.data_offset))
            flat = arr.T if arr.flags.f_contiguous and not arr.flags.c_contiguous else arr
            crc = zlib.crc32(flat.reshape(-1).view(np.uint8), crc)
            pos = header.data_offset + header.nbytes
        while pos < info.file_size:
            chunk = self._read_at(start + pos, min(1 << 20, info.file_size - pos))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        if crc != info.CRC:
            raise FormatError(
                f"member {key!r} fails its CRC-32 check (0x{crc:08x}, the zip directory says "
                f"0x{info.CRC:08x}): its bytes were damaged; re-create or re-download the archive",
                path=self.path,
                offset=start,
            )

    def iter_batches(
        self,
        name: str,
        batch_size: int | None = None,
        *,
        batch_bytes: int | None = None,
        axis: int = 0,
    ) -> BatchIterator:
        """Blocks of a member along ``axis`` (see :func:`npystream.iter_batches`).

        Stored members give memmap views; deflated members are decompressed one
        block at a time (memory stays at about one block).
        """
        key, _ = self._info(name)
        return batches_from_source(
            self.member_source(key),
            batch_size,
            batch_bytes=batch_bytes,
            axis=axis,
            owned=True,
            max_header_size=self._max_header_size,
        )

    def _data_start(self, key: str, info: zipfile.ZipInfo) -> int:
        start = self._starts.get(key)
        if start is not None:
            return start
        if not 0 <= info.header_offset <= self._size - _LOCAL.size:
            raise FormatError(
                f"member {key!r}: its local header offset {info.header_offset} lies outside the "
                f"{self._size}-byte archive (corrupt or cut archive); re-create it",
                path=self.path,
            )
        raw = self._read_at(info.header_offset, _LOCAL.size)
        if len(raw) < _LOCAL.size:
            raise TruncatedError(
                f"the local header of member {key!r} is cut short ({len(raw)} of {_LOCAL.size} bytes)",
                path=self.path,
                offset=info.header_offset + len(raw),
            )
        magic, name_len, extra_len = _LOCAL.unpack(raw)
        if magic != _LOCAL_MAGIC:
            raise FormatError(
                f"member {key!r}: expected a local file header {_LOCAL_MAGIC!r}, found {magic!r}; "
                "the central directory points to the wrong place (corrupt archive)",
                path=self.path,
                offset=info.header_offset,
            )
        start = info.header_offset + _LOCAL.size + name_len + extra_len
        end = start + info.compress_size
        if end > self._size:
            raise TruncatedError(
                f"member {key!r} needs bytes up to {end} but the archive is {self._size} bytes",
                path=self.path,
                offset=self._size,
            )
        self._starts[key] = start
        return start

    def _read_at(self, offset: int, n: int) -> bytes:
        if self._fileobj is not None:
            self._fileobj.seek(offset)
            return read_upto(self._fileobj, n)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def member_source(self, name: str) -> ByteSource:
        """A byte source over a member's ``.npy`` bytes (the caller closes it).

        Stored members give a seekable, mappable
        :class:`~npystream.sources.WindowSource` into the zip file; other
        members a forward-only :class:`~npystream.sources.StreamSource` that
        decompresses as it is read.
        """
        key, info = self._info(name)
        if info.flag_bits & 0x1:
            raise UnsupportedError(
                f"member {key!r} is encrypted; decrypt the archive first", path=self.path
            )
        label = f"{self.path}[{key}]"
        if info.compress_type == zipfile.ZIP_STORED:
            start = self._data_start(key, info)
            if self._fileobj is not None:  # no file to map: the member's bytes, read once (like np.load)
                data = self._read_at(start, info.file_size)
                if len(data) != info.file_size:
                    raise TruncatedError(f"member {key!r} is cut short", path=self.path, offset=start + len(data))
                return MemorySource(data, label)
            return WindowSource(self.path, start, info.file_size, label)
        try:
            stream = self.zipfile.open(info)
        except NotImplementedError as exc:
            raise UnsupportedError(f"member {key!r}: {exc}", path=self.path) from None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise FormatError(
                f"member {key!r}: its local header cannot be read ({type(exc).__name__}: {exc}); "
                "the archive is corrupt",
                path=self.path,
                offset=info.header_offset,
            ) from exc
        return StreamSource(stream, label, owned=True, size=info.file_size)

    def member_info(self, name: str) -> NpzMember:
        """Compression, sizes and the ``.npy`` header of one member (reads only its header)."""
        key, info = self._info(name)
        compression = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        header = None
        error = None
        data_offset = None
        try:
            with self.member_source(key) as src:
                header = read_header(src, max_header_size=self._max_header_size)
                if info.compress_type == zipfile.ZIP_STORED:
                    data_offset = self._data_start(key, info) + header.data_offset
        except (FormatError, UnsupportedError) as exc:
            error = str(exc)
        return NpzMember(
            name=key,
            filename=info.filename,
            compression=compression,
            file_size=info.file_size,
            compress_size=info.compress_size,
            header=header,
            error=error,
            data_offset=data_offset,
        )

    @property
    def zipfile(self) -> zipfile.ZipFile:
        """The underlying :class:`zipfile.ZipFile` (like numpy's ``NpzFile.zip``)."""
        if self._zip is None:
            raise ValueError(f"{self.path}: the archive is closed")
        return self._zip

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Close the zip file; arrays already returned stay valid."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._zip is None else f"{len(self)} members"
        return f"<NpzArchive {self.path!r} {state}>"
