"""The ``.npy`` header: parse, validate and encode.

Byte layout (numpy's NEP 1 format, versions 1.0, 2.0 and 3.0)::

    offset  size  content
    0       6     magic b"\\x93NUMPY"
    6       1     major version (1, 2 or 3)
    7       1     minor version (0)
    8       2|4   header length L, little-endian: uint16 for 1.0, uint32 for 2.0/3.0
    10|12   L     header: a Python dict literal, latin-1 (1.0/2.0) or UTF-8 (3.0),
                  padded with spaces and ending in b"\\n" so that the data offset
                  is a multiple of 64 (numpy writes 64; readers MUST NOT rely on it)
    10+L|12+L     data: C- or Fortran-ordered raw array bytes, or a pickle when the
                  dtype holds Python objects

The dict MUST have exactly the keys ``descr`` (a dtype description accepted by
``numpy.lib.format.descr_to_dtype``), ``fortran_order`` (bool) and ``shape``
(a tuple of non-negative ints).  Parsing is safe: the header length is capped
(``max_header_size``, numpy's default 10,000 bytes: ``ast.literal_eval`` on
an unbounded string can exhaust memory and the stack), then the text is read
with ``ast.literal_eval`` only.  Python-2 writers put ``L`` suffixes on
longs (``(10L,)``); for versions 1.0/2.0 those are removed, as numpy does.

Every violation raises :class:`~npystream.errors.FormatError` naming the file,
the byte offset, what was found and what was expected; a header cut short also
raises it as :class:`~npystream.errors.TruncatedError` (an ``EOFError``).
"""

from __future__ import annotations

import ast
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream.errors import FormatError, TruncatedError, UnsupportedError
from npystream.sources import ByteSource, open_source, sniff

__all__ = [
    "MAGIC",
    "NpyHeader",
    "read_header",
    "parse_header",
    "encode_header",
    "encode_header_in_place",
    "header_room",
    "open_with_header",
    "MAX_HEADER_SIZE",
    "ARRAY_ALIGN",
    "GROWTH_DIGITS",
]

MAGIC = b"\x93NUMPY"
MAX_HEADER_SIZE = 10_000
ARRAY_ALIGN = 64
GROWTH_DIGITS = 21  # room left for the shape to grow in place (numpy's GROWTH_AXIS_MAX_DIGITS)
_INT64_MAX = 2**63 - 1

# version -> (length field struct, text encoding)
_VERSIONS: dict[tuple[int, int], tuple[struct.Struct, str]] = {
    (1, 0): (struct.Struct("<H"), "latin1"),
    (2, 0): (struct.Struct("<I"), "latin1"),
    (3, 0): (struct.Struct("<I"), "utf8"),
}
_KEYS = ("descr", "fortran_order", "shape")
_PY2_LONG = re.compile(r"(\d+)L\b")


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: enough to map, stream or unpickle the data after it."""

    version: tuple[int, int]
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int
    pickled: bool
    nbytes: int | None

    @property
    def count(self) -> int:
        """Number of elements (product of the shape; 1 for 0-d)."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def expected_size(self) -> int | None:
        """Total file size the header promises (None for pickled data)."""
        return None if self.nbytes is None else self.data_offset + self.nbytes


def _fail(msg: str, path: str, offset: int) -> FormatError:
    return FormatError(msg, path=path, offset=offset)


def _literal(text: str, version: tuple[int, int], path: str, offset: int) -> Any:
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        if version <= (2, 0) and "L" in text:
            try:
                return ast.literal_eval(_PY2_LONG.sub(r"\1", text))
            except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                pass
        raise _fail(
            f"header is not a Python literal ({type(exc).__name__}: {exc}); found {text[:80]!r}, "
            "expected a dict like {'descr': '<f4', 'fortran_order': False, 'shape': (3,)}",
            path,
            offset,
        ) from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(
    text: str, version: tuple[int, int], data_offset: int, *, path: str = "<bytes>", offset: int = 0
) -> NpyHeader:
    """Validate the header dict ``text`` (already decoded) and build an :class:`NpyHeader`."""
    d = _literal(text, version, path, offset)
    if not isinstance(d, dict):
        raise _fail(f"header is a {type(d).__name__}, expected a dict", path, offset)
    keys = set(d)
    if keys != set(_KEYS):
        missing = sorted(set(_KEYS) - keys, key=str)
        extra = sorted(keys - set(_KEYS), key=str)
        detail = "; ".join(
            p for p in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if p
        )
        raise _fail(f"header keys are wrong ({detail}); expected exactly {list(_KEYS)}", path, offset)
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(_is_int(x) for x in shape):
        raise _fail(f"header 'shape' is {shape!r}, expected a tuple of ints", path, offset)
    if any(x < 0 for x in shape):
        raise _fail(f"header 'shape' {shape!r} has a negative dimension", path, offset)
    if any(x > _INT64_MAX for x in shape):
        raise _fail(
            f"header 'shape' {shape!r} has a dimension over 2**63 - 1, which no array can have",
            path,
            offset,
        )
    fortran = d["fortran_order"]
    if not isinstance(fortran, bool):
        raise _fail(f"header 'fortran_order' is {fortran!r}, expected True or False", path, offset)
    descr = d["descr"]
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception as exc:  # numpy raises TypeError/ValueError/KeyError/... for bad descrs
        raise _fail(
            f"header 'descr' {descr!r} is not a dtype description ({type(exc).__name__}: {exc})",
            path,
            offset,
        ) from None
    count = 1
    for dim in shape:
        count *= dim
    pickled = bool(dtype.hasobject)
    nbytes = None if pickled else count * dtype.itemsize
    if count > _INT64_MAX or (nbytes is not None and nbytes > _INT64_MAX - data_offset):
        raise _fail(
            f"header 'shape' {shape!r} with dtype {dtype} overflows: {count} elements "
            f"({'?' if nbytes is None else nbytes} bytes) exceed what a 64-bit file can hold",
            path,
            offset,
        )
    return NpyHeader(
        version=version,
        shape=shape,
        dtype=dtype,
        fortran_order=fortran,
        data_offset=data_offset,
        pickled=pickled,
        nbytes=nbytes,
    )


def _read_from(src: ByteSource, max_header_size: int) -> NpyHeader:
    path = src.name
    base = src.tell()
    magic = src.read(len(MAGIC))
    if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
        raise TruncatedError(
            f"file ends after {len(magic)} bytes, inside the 6-byte .npy magic", path=path, offset=base
        )
    if magic != MAGIC:
        hint = (
            "; it looks like a zip (.npz) archive: open it with npystream.open(path)"
            if sniff(magic) == "zip"
            else ""
        )
        raise _fail(
            f"not a .npy file: found magic {magic!r}, expected {MAGIC!r}{hint}", path, base
        )
    ver = src.read_exact(2, "the .npy format version")
    version = (ver[0], ver[1])
    if version not in _VERSIONS:
        raise _fail(
            f"unknown .npy format version {version[0]}.{version[1]}, expected 1.0, 2.0 or 3.0",
            path,
            base + 6,
        )
    length_struct, encoding = _VERSIONS[version]
    (hlen,) = length_struct.unpack(src.read_exact(length_struct.size, "the header length"))
    text_offset = base + 8 + length_struct.size
    if hlen > max_header_size:
        raise _fail(
            f"header is {hlen} bytes, over the limit of {max_header_size} "
            "(a guard against memory exhaustion when parsing); pass max_header_size= "
            "to read a file you trust",
            path,
            base + 8,
        )
    raw = src.read_exact(hlen, f"the {hlen}-byte header")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _fail(f"header is not valid {encoding}: {exc}", path, text_offset + exc.start) from None
    if not text.endswith("\n"):
        # numpy writes the newline; older writers too.  A missing one means a
        # corrupted length field more often than not, so say so.
        raise _fail(
            f"header does not end with a newline (found {text[-10:]!r}); the header length "
            f"field ({hlen}) is probably wrong",
            path,
            text_offset,
        )
    return parse_header(text, version, text_offset + hlen - base, path=path, offset=text_offset)


def read_header(source: Any, *, max_header_size: int = MAX_HEADER_SIZE) -> NpyHeader:
    """Read and validate the header of a ``.npy`` file, path, file object or stream.

    Reads exactly the header bytes, never past them: a file object is left
    positioned at the start of the data.  ``data_offset`` is relative to the
    position where reading started.

    >>> import io, numpy as np
    >>> buf = io.BytesIO(); np.save(buf, np.zeros((2, 3), '<f4')); _ = buf.seek(0)
    >>> h = read_header(buf); (h.shape, h.dtype.str, h.data_offset, h.nbytes)
    ((2, 3), '<f4', 128, 24)
    """
    if not _is_int(max_header_size) or max_header_size <= 0:
        raise ValueError(f"max_header_size must be a positive int, got {max_header_size!r}")
    src = open_source(source)
    try:
        return _read_from(src, max_header_size)
    finally:
        if src is not source:
            src.close()


def open_with_header(file: Any, *, max_header_size: int = MAX_HEADER_SIZE) -> tuple[ByteSource, NpyHeader]:
    """Open ``file`` as a source and read its header; the source is closed if the header is bad.

    The caller owns the returned source (positioned at the data) and closes it.
    """
    src = open_source(file)
    try:
        return src, read_header(src, max_header_size=max_header_size)
    except BaseException:
        if src is not file:
            src.close()
        raise


def _dict_text(dtype: Any, shape: tuple[int, ...], fortran_order: bool) -> str:
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    return f"{{'descr': {descr!r}, 'fortran_order': {bool(fortran_order)!r}, 'shape': {shape!r}, }}"


def encode_header(
    dtype: Any,
    shape: tuple[int, ...],
    fortran_order: bool = False,
    *,
    version: tuple[int, int] | None = None,
    grow: bool = True,
    extra_pad: int = 0,
    size: int | None = None,
) -> bytes:
    """The full preamble (magic, version, length, dict, padding, newline) for an array.

    Byte-identical to what ``np.save`` writes.  The result's length is a
    multiple of 64 so the data that follows is aligned.  ``grow=True`` (the
    default, as numpy does) pads the dict so the growing axis (first, or last
    when ``fortran_order``) can be rewritten in place with up to 21 digits and
    the header keeps its length (for writers that learn the count at the
    end); ``grow=False`` omits that padding.  ``version=None`` picks the
    oldest version that can hold the header, as numpy does.  ``extra_pad``
    adds that many spaces (a writer that shortens the data after the header
    by that much keeps every offset).  ``size`` pads the preamble to exactly
    that many bytes instead (see :func:`header_room`); a header that does
    not fit raises ``ValueError``.

    >>> import io
    >>> buf = io.BytesIO(); np.save(buf, np.zeros((2, 3)))
    >>> buf.getvalue().startswith(encode_header("<f8", (2, 3)))
    True
    >>> len(encode_header("<f8", (2, 3), grow=False, size=header_room("<f8", 2)))
    128
    """
    shape = tuple(int(x) for x in shape)
    text = _dict_text(dtype, shape, fortran_order)
    if size is not None:
        return _encode_sized(text, size, version)
    if grow and shape:
        text += " " * max(0, GROWTH_DIGITS - len(repr(shape[-1 if fortran_order else 0])))
    versions = [version] if version is not None else [(1, 0), (2, 0), (3, 0)]
    for ver in versions:
        if ver not in _VERSIONS:
            raise ValueError(f"unknown .npy version {ver!r}, expected (1, 0), (2, 0) or (3, 0)")
        length_struct, encoding = _VERSIONS[ver]
        try:
            body = text.encode(encoding)
        except UnicodeEncodeError:
            if version is not None:
                raise ValueError(f"this dtype needs .npy version 3.0 (UTF-8 field names), not {ver}") from None
            continue
        prefix = 8 + length_struct.size
        total = prefix + len(body) + 1
        pad = ARRAY_ALIGN - total % ARRAY_ALIGN + extra_pad  # 1..64, exactly numpy's rule
        hlen = len(body) + pad + 1
        if hlen >= 1 << (8 * length_struct.size):
            if version is not None:
                raise ValueError(f"header of {hlen} bytes does not fit .npy version {ver}")
            continue
        return MAGIC + bytes(ver) + length_struct.pack(hlen) + body + b" " * pad + b"\n"
    raise ValueError("header does not fit any .npy version")  # pragma: no cover - 4 GiB header



def _encode_sized(text: str, size: int, version: tuple[int, int] | None) -> bytes:
    """``text`` as a preamble of exactly ``size`` bytes (the oldest version whose length field holds it)."""
    for ver in [version] if version is not None else [(1, 0), (2, 0), (3, 0)]:
        length_struct, encoding = _VERSIONS[ver]
        try:
            body = text.encode(encoding)
        except UnicodeEncodeError:
            continue
        hlen = size - len(MAGIC) - 2 - length_struct.size
        if hlen >= 1 << (8 * length_struct.size):
            continue
        if len(body) + 1 > hlen:
            break
        return MAGIC + bytes(ver) + length_struct.pack(hlen) + body + b" " * (hlen - len(body) - 1) + b"\n"
    raise ValueError(f"the .npy header {text!r} does not fit in {size} bytes")


def header_room(dtype: Any, ndim: int, fortran_order: bool = False) -> int:
    """The length of a preamble that holds ``dtype`` with any ``ndim``-D shape of int64 sizes.

    A multiple of 64.  Writers that rewrite the shape in place as data arrives
    reserve this much (``encode_header(..., size=header_room(...))``).

    >>> header_room("<f8", 1), header_room("<f8", 3)
    (128, 128)
    """
    text = _dict_text(dtype, (_INT64_MAX,) * ndim, fortran_order)
    for length_struct, encoding in _VERSIONS.values():
        try:
            body = text.encode(encoding)
        except UnicodeEncodeError:
            continue
        need = len(MAGIC) + 2 + length_struct.size + len(body) + 1
        size = need + (-need) % ARRAY_ALIGN
        if size - len(MAGIC) - 2 - length_struct.size < 1 << (8 * length_struct.size):
            return size
    raise UnsupportedError("the dtype description is too long for a .npy header")  # pragma: no cover - 4 GiB


def encode_header_in_place(header: NpyHeader, shape: tuple[int, ...]) -> bytes | None:
    """A preamble for ``shape`` exactly ``header.data_offset`` bytes long, or None when it does not fit.

    Same version, dtype and order as ``header``; the dict is padded with spaces
    up to the old length, so overwriting the first ``data_offset`` bytes of the
    file changes the shape and nothing else (how :func:`npystream.append_npy`
    grows a file in place).  Files written by ``np.save`` or npystream leave
    room for :data:`GROWTH_DIGITS` digits in the growing axis.
    """
    length_struct, encoding = _VERSIONS[header.version]
    prefix = len(MAGIC) + 2 + length_struct.size
    hlen = header.data_offset - prefix
    try:
        body = _dict_text(header.dtype, tuple(int(x) for x in shape), header.fortran_order).encode(encoding)
    except UnicodeEncodeError:  # pragma: no cover - the old header held the same field names
        return None
    if len(body) + 1 > hlen or hlen >= 1 << (8 * length_struct.size):
        return None
    return MAGIC + bytes(header.version) + length_struct.pack(hlen) + body + b" " * (hlen - len(body) - 1) + b"\n"
