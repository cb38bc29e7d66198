"""A tiny pickle assembler for hand-written hostile object ``.npy`` files.

A valid file written by numpy looks like (protocol 2/3 opcodes, no memo)::

    PROTO 3
    GLOBAL numpy._core.multiarray _reconstruct; GLOBAL numpy ndarray; (0,); b'b'; TUPLE3; REDUCE
    MARK 1, shape, dtype('O8', False, True) BUILD (3, '|', None, None, None, -1, -1, 63),
         is_fortran, EMPTY_LIST MARK e0 e1 ... APPENDS
    TUPLE BUILD STOP

:func:`envelope` builds exactly that around hand-written element opcodes, so a
test can damage one field at a time; :func:`npy_file` puts the ``.npy``
header in front.  ``test_objects_hostile.py`` checks that the benign versions
load with ``np.load`` (so the assembler is right) before it damages them.
"""

from __future__ import annotations

import struct

import numpy as np

from npystream.formats.npy import encode_header

RECONSTRUCT = ("numpy._core.multiarray", "_reconstruct")
NDARRAY = ("numpy", "ndarray")
DTYPE = ("numpy", "dtype")
OBJECT_FLAGS = 63  # numpy's flags for dtype('O'): NPY_ITEM_HASOBJECT | ... (what numpy writes)


def glob(module: str, name: str) -> bytes:
    """GLOBAL opcode (protocol 0-3 text form)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL (protocol 4 form)."""
    return short_uni(module) + short_uni(name) + b"\x93"


def uni(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def short_uni(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def raw_bytes(data: bytes) -> bytes:
    """SHORT_BINBYTES or BINBYTES (protocol 3)."""
    if len(data) < 256:
        return b"C" + bytes([len(data)]) + data
    return b"B" + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
    """BININT1 / BININT / LONG1 for ``n``."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tuple_of(items: list[bytes]) -> bytes:
    """A tuple of already-encoded items (TUPLE1/2/3 or MARK ... TUPLE)."""
    if len(items) == 0:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def shape_ops(shape: tuple[int, ...]) -> bytes:
    return tuple_of([integer(n) for n in shape])


def dtype_ops(code: str, endian: str = "|", flags: int = 0, *, elsize: int = -1, alignment: int = -1) -> bytes:
    """``dtype(code, False, True)`` then BUILD with numpy's 8-item state tuple."""
    state = b"(" + integer(3) + uni(endian) + b"NNN" + integer(elsize) + integer(alignment) + integer(flags) + b"t"
    return glob(*DTYPE) + uni(code) + b"\x89\x88\x87R" + state + b"b"


def reconstruct_head(cls: tuple[str, str] = NDARRAY, shape0: bytes = b"K\x00\x85", typecode: bytes = b"C\x01b") -> bytes:
    """``_reconstruct(cls, (0,), b'b')``."""
    return glob(*RECONSTRUCT) + glob(*cls) + shape0 + typecode + b"\x87R"


def array_elem(
    code: str,
    endian: str,
    shape: tuple[int, ...],
    data: bytes,
    *,
    flags: int = 0,
    fortran: bool = False,
) -> bytes:
    """Opcodes of one numeric ndarray element, as numpy pickles it (raw bytes state)."""
    return (
        reconstruct_head()
        + b"("
        + integer(1)
        + shape_ops(shape)
        + dtype_ops(code, endian, flags)
        + (b"\x88" if fortran else b"\x89")
        + raw_bytes(data)
        + b"tb"
    )


def object_array_elem(shape: tuple[int, ...], items: list[bytes]) -> bytes:
    """Opcodes of a nested object ndarray element with the given (encoded) items."""
    return (
        reconstruct_head()
        + b"("
        + integer(1)
        + shape_ops(shape)
        + dtype_ops("O8", "|", OBJECT_FLAGS)
        + b"\x89]"
        + (b"(" + b"".join(items) + b"e" if items else b"")
        + b"tb"
    )


def envelope(
    elements: list[bytes] | bytes,
    shape: tuple[int, ...] | None = None,
    *,
    fortran: bool = False,
    proto: int = 3,
    prefix: bytes = b"",
    suffix: bytes = b"",
) -> bytes:
    """The pickle numpy writes for an object array whose elements are the given opcode strings.

    ``elements`` as a list: one opcode string per element, ``shape`` defaulting
    to ``(len(elements),)``; as bytes: the raw content between the list's MARK
    and APPENDS (``shape`` required).  ``prefix`` goes right after PROTO,
    ``suffix`` after STOP.
    """
    if isinstance(elements, list):
        body = b"".join(elements)
        if shape is None:
            shape = (len(elements),)
    else:
        body = elements
        if shape is None:
            raise ValueError("shape is required when elements is raw bytes")
    return (
        b"\x80"
        + bytes([proto])
        + prefix
        + reconstruct_head()
        + b"("
        + integer(1)
        + shape_ops(shape)
        + dtype_ops("O8", "|", OBJECT_FLAGS)
        + (b"\x88" if fortran else b"\x89")
        + b"]"
        + (b"(" + body + b"e" if body else b"")
        + b"tb."
        + suffix
    )


def npy_file(body: bytes, shape: tuple[int, ...], descr: str | np.dtype = "O", fortran: bool = False) -> bytes:
    """A ``.npy`` header for an object array of ``shape`` followed by ``body``."""
    return encode_header(np.dtype(descr), shape, fortran) + body


def header_len(shape: tuple[int, ...], descr: str | np.dtype = "O") -> int:
    """Length of the header :func:`npy_file` writes (the byte offset of the pickle)."""
    return len(encode_header(np.dtype(descr), shape, False))
