"""The public entry point :func:`open`: look at what a file is, hand it to the right reader.

Dispatch (by content, never by suffix alone):

* a directory -> a ragged store, :class:`npystream.RaggedArray`;
* zip magic ``PK`` -> a lazy ``.npz`` archive, :class:`npystream.NpzArchive`;
* ``.npy`` magic with a pickled dtype -> :class:`npystream.ObjectArray`;
* ``.npy`` magic with a fixed dtype -> an ``np.memmap`` (or, for streams that
  cannot be mapped, a clear error pointing at :func:`npystream.iter_batches`).

Readers are imported lazily so ``import npystream`` stays cheap.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from npystream.errors import FormatError, UnsupportedError
from npystream.formats.npy import MAGIC, read_header
from npystream.sources import open_source, peek_head, sniff, sniff_path

__all__ = ["open"]



def open(file: Any, mode: str = "r", **options: Any) -> Any:  # noqa: A001 - np.load-like API
    """Open a ``.npy``, ``.npz`` or ragged store for lazy, memory-bounded access.

    ``mode`` is ``np.memmap``'s (``'r'``, ``'r+'``, ``'c'``) for fixed-dtype
    ``.npy`` files; stores and archives are read-only.  Keyword ``options`` go
    to the reader: the safety options (``trusted``, ``allowed_globals``,
    ``encoding``, ``fix_imports``) and ``zero_copy`` for object arrays,
    ``max_header_size`` for headers.  ``lazy=True`` returns a fixed-dtype
    ``.npy`` as a :class:`npystream.LazyArray` over its memmap (deferred
    arithmetic, fused block-wise reductions).
    """
    if options.pop("lazy", False):
        arr = open(file, mode, **options)
        if not isinstance(arr, np.ndarray):
            raise UnsupportedError(
                f"lazy=True needs a fixed-dtype .npy, but this opens as a {type(arr).__name__}; "
                "open it without lazy=True (object arrays: npystream.iter_objects)",
                path=os.fspath(file) if isinstance(file, (str, os.PathLike)) else None,
            )
        from npystream.deferred import lazy

        return lazy(arr)
    if isinstance(file, (str, os.PathLike)) and os.path.isdir(file):
        from npystream.formats.ragged import RaggedArray

        if mode != "r":
            raise ValueError(f"ragged stores open read-only (mode='r'), got mode={mode!r}; "
                             "use npystream.RaggedWriter(path, mode='a') to append")
        return RaggedArray(file, **options)
    if isinstance(file, (str, os.PathLike)) and os.fspath(file) != "-" and os.path.isfile(file):
        kind, head = sniff_path(file)
        magic = head[: len(MAGIC)]
        if kind == "zip":
            from npystream.archive import NpzArchive

            if mode != "r":
                raise ValueError(f".npz archives open read-only (mode='r'), got mode={mode!r}")
            return NpzArchive(file, **options)
        if kind != "gzip" and not MAGIC.startswith(magic):
            raise FormatError(
                f"not a .npy, .npz or gzip file: starts with {magic!r}, expected {MAGIC!r} "
                "(.npy), b'PK' (.npz) or b'\\x1f\\x8b' (gzip)",
                path=os.fspath(file),
                offset=0,
            )
    if _is_zip_file_object(file):
        from npystream.archive import NpzArchive

        if mode != "r":
            raise ValueError(f".npz archives open read-only (mode='r'), got mode={mode!r}")
        return NpzArchive(file, **options)
    max_header_size = options.pop("max_header_size", None)
    src = open_source(file)
    try:
        header = (
            read_header(src) if max_header_size is None else read_header(src, max_header_size=max_header_size)
        )
        if header.pickled:
            from npystream.object_array import ObjectArray, numpy_filename

            if mode != "r":
                raise ValueError(
                    f"object arrays open read-only (mode='r'), got mode={mode!r}: their elements "
                    "are unpickled, not mapped; write a new file with npystream.save_objects"
                )

            arr = ObjectArray(src, header=header, **options)
            if arr.filename is not None:
                arr.filename = numpy_filename(file)
            return arr
        from npystream.formats.fixed import open_npy
        from npystream.object_array import numpy_filename

        arr = open_npy(src, header, mode=mode, **options)
        if isinstance(arr, np.memmap) and isinstance(file, (str, os.PathLike)) and getattr(src, "path", None) is not None:
            arr.filename = numpy_filename(file)  # as np.load(file, mmap_mode=...) has it
        if src is not file:  # the memmap holds its own mapping; release our file handle
            src.close()
        return arr
    except BaseException:
        if src is not file:
            src.close()
        raise


def _is_zip_file_object(file: Any) -> bool:
    """A seekable binary file object positioned at a zip archive's first bytes (never moves it)."""
    if isinstance(file, (str, bytes, os.PathLike)) or not hasattr(file, "read"):
        return False
    try:
        if not file.seekable() or file.tell() != 0:
            return False
    except (OSError, AttributeError, ValueError):
        return False
    return sniff(peek_head(file)) == "zip"
