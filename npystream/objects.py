"""``iter_objects``: stream the elements of an object-dtype ``.npy`` one at a time, safely.

>>> import io, numpy as np
>>> a = np.empty(3, dtype=object); a[:] = [1, "two", np.arange(3)]
>>> buf = io.BytesIO(); np.save(buf, a, allow_pickle=True); _ = buf.seek(0)
>>> [type(x).__name__ for x in iter_objects(buf)]
['int', 'str', 'ndarray']

See :mod:`npystream.formats.pickle_walk` for the design (scan, rewrite, one
persistent unpickler) and :mod:`npystream.formats.pickle_safety` for what
safe mode allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from npystream.errors import FormatError
from npystream.formats.npy import read_header
from npystream.formats.pickle_walk import SafetyPolicy, iter_elements
from npystream.sources import open_source

__all__ = ["iter_objects"]


def iter_objects(
    source: Any,
    *,
    trusted: bool = False,
    allowed_globals: Iterable[Any] = (),
    encoding: str = "ASCII",
    fix_imports: bool = True,
    zero_copy: bool = False,
) -> Iterator[Any]:
    """Yield the elements of a pickled ``.npy`` in C order, each equal to ``np.load(..., allow_pickle=True).flat[i]``.

    ``source`` is a path, ``"-"`` (stdin), a binary file object (seekable or
    not, gzip included) or bytes.  Safe by default: only what ``np.save``
    writes is unpickled (``allowed_globals`` extends the allow-list,
    ``trusted=True`` behaves like ``np.load(allow_pickle=True)``).
    ``encoding``/``fix_imports`` are ``np.load``'s, for Python 2 files.
    ``zero_copy=True`` (mappable files only) returns plain array elements as
    read-only views of the mapped file.  Arguments and the header are checked
    at call time; elements are read lazily with bounded memory.
    Structured dtypes yield numpy records (``np.void``); 0-d arrays yield their
    one object; empty arrays yield nothing.

    Seekable files are scanned once first (opcodes only, payloads skipped) so
    that every memo back-reference is exact and memory stays bounded.  Pipes
    and compressed streams cannot be scanned ahead: they decode through a
    window of a few MiB (elements decoded speculatively, checked when their
    batch closes) and keep only small shared objects between runs (see
    ``npystream.formats.pickle_stream``); a file that reads back a large
    object far behind raises ``UnsupportedError`` there -- read it from a
    seekable file instead.
    """
    policy = SafetyPolicy.make(
        trusted=trusted, allowed_globals=allowed_globals, encoding=encoding, fix_imports=fix_imports
    )
    if not isinstance(zero_copy, bool):
        raise TypeError(f"zero_copy must be True or False, got {zero_copy!r}")
    return iterate(source, policy, zero_copy=zero_copy)


def iterate(source: Any, policy: SafetyPolicy, **options: Any) -> Iterator[Any]:
    """:func:`iter_objects` with a ready policy and ``pickle_walk.iter_elements``'s options.

    For npystream's own readers (the converter passes ``release_behind`` and
    ``stream_above``); the source is opened, checked and closed as there.
    """
    src = open_source(source)
    owned = src is not source
    try:
        header = read_header(src)
        if not header.pickled:
            raise FormatError(
                f"dtype {header.dtype} holds no Python objects; use npystream.open() "
                "(memory map) or npystream.iter_batches() for fixed dtypes",
                path=src.name,
            )
        return iter_elements(src, header, policy, _on_close=src.close if owned else None, **options)
    except BaseException:
        if owned:
            src.close()
        raise
