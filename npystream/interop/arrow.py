"""Ragged store <-> pyarrow: zero-copy export of mapped buffers, bulk import of list/string arrays.

pyarrow is optional: it is imported inside these functions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from npystream.errors import UnsupportedError

__all__ = ["ragged_to_arrow", "arrow_blocks"]

_BLOCK = 1 << 16


def _import_pyarrow() -> Any:
    try:
        import pyarrow as pa
    except ImportError:
        raise UnsupportedError(
            "pyarrow is not installed; pip install 'npystream[arrow]' (or pyarrow)"
        ) from None
    return pa


def _flat(r: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) covering the view: zero-copy for step-1 views (offsets not rebased)."""
    st = r._st
    n = len(r)
    if r._contiguous():
        a = r._rng.start if n else 0
        offs = st.offsets_np[a : a + n + 1]
        return st.values, offs
    blocks = list(r.iter_batches(_BLOCK))
    if not blocks:
        return st.values[:0], np.zeros(1, dtype=np.int64)
    vals = np.concatenate([b[0] for b in blocks])
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate([np.diff(b[1]) for b in blocks]), out=offs[1:])
    return vals, offs


def ragged_to_arrow(r: Any) -> Any:
    """A pyarrow array of the store (or view): ``LargeListArray`` for 1-D arrays,
    ``LargeStringArray``/``LargeBinaryArray`` for str/bytes, a flat array for 0-d elements.

    The mapped offsets and values become Arrow buffers without a copy when the
    view is contiguous and the dtype is a little-endian (native) Arrow primitive;
    otherwise the values are converted (big-endian -> native, bool -> bits).
    """
    pa = _import_pyarrow()
    st = r._st
    if st.kind == "object":
        raise UnsupportedError("kind='object' elements are pickles; Arrow has no type for them",
                               path=st.path)
    if st.kind == "array" and st.ndim >= 2:
        raise UnsupportedError(
            f"elements have ndim {st.ndim}; to_arrow() exports 0-d and 1-D elements only "
            "(flatten them, or use to_awkward() for regular inner dimensions)",
            path=st.path,
        )
    vals, offs = _flat(r)
    n = len(r)
    if st.kind in ("str", "bytes"):
        typ = pa.large_string() if st.kind == "str" else pa.large_binary()
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offs), pa.py_buffer(vals)])
    dtype = st.dtype
    if not dtype.isnative:
        vals = vals.astype(dtype.newbyteorder("="))
    try:
        typ = pa.from_numpy_dtype(vals.dtype)
    except (NotImplementedError, pa.ArrowNotImplementedError, TypeError):
        raise UnsupportedError(f"dtype {dtype.str!r} has no Arrow equivalent", path=st.path) from None
    if st.ndim == 0:
        return pa.array(np.asarray(vals[offs[0] : offs[-1]]), type=typ)
    if pa.types.is_primitive(typ) and not pa.types.is_boolean(typ):
        child = pa.Array.from_buffers(typ, len(vals), [None, pa.py_buffer(vals)])
    else:
        child = pa.array(np.asarray(vals), type=typ)
    return pa.LargeListArray.from_buffers(pa.large_list(typ), n, [None, pa.py_buffer(offs)],
                                          children=[child])


def _chunks(obj: Any, pa: Any) -> list[Any]:
    if isinstance(obj, pa.ChunkedArray):
        return list(obj.chunks)
    if isinstance(obj, pa.Array):
        return [obj]
    raise UnsupportedError(
        f"cannot write a {type(obj).__name__} to a ragged store; pass a pyarrow Array or ChunkedArray"
    )


def arrow_blocks(obj: Any) -> tuple[str, np.dtype | None, int, Iterator[Any]]:
    """(kind, dtype, ndim, blocks) for a pyarrow list/string/binary array; blocks are
    ``(values, offsets, None)`` numpy views of the Arrow buffers, offsets rebased to 0."""
    pa = _import_pyarrow()
    chunks = _chunks(obj, pa)
    typ = obj.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        kind = "array"
        vtype = typ.value_type
        if not (pa.types.is_integer(vtype) or pa.types.is_floating(vtype)
                or pa.types.is_boolean(vtype) or pa.types.is_temporal(vtype)):
            raise UnsupportedError(
                f"list values of Arrow type {vtype} are not a numpy primitive; "
                "nested lists are not supported"
            )
        dtype = np.dtype(vtype.to_pandas_dtype()) if not pa.types.is_temporal(vtype) else None
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        kind, dtype = "str", np.dtype("u1")
    elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        kind, dtype = "bytes", np.dtype("u1")
    else:
        raise UnsupportedError(
            f"Arrow type {typ} is not a list, string or binary type; a ragged store holds those"
        )
    for c in chunks:
        if c.null_count:
            raise UnsupportedError(
                f"the Arrow array has {c.null_count} nulls; a ragged store has no nulls "
                "(fill them, e.g. pyarrow.compute.fill_null(arr, []))"
            )

    def gen() -> Iterator[Any]:
        for c in chunks:
            for lo in range(0, len(c), _BLOCK):
                part = c.slice(lo, _BLOCK)
                if kind == "array":
                    offs = part.offsets.to_numpy().astype(np.int64, copy=False)
                    child = part.values
                    if child.null_count:
                        raise UnsupportedError("the Arrow list values contain nulls")
                    vals = child.to_numpy(zero_copy_only=False)
                else:
                    bufs = part.buffers()
                    width = np.int64 if pa.types.is_large_string(typ) or pa.types.is_large_binary(typ) \
                        else np.int32
                    offs = np.frombuffer(bufs[1], dtype=width)[part.offset : part.offset + len(part) + 1]
                    offs = offs.astype(np.int64, copy=False)
                    vals = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None \
                        else np.zeros(0, np.uint8)
                a, b = int(offs[0]), int(offs[-1])
                yield vals[a:b], offs - a, None

    if dtype is None:  # temporal list values: numpy decides the unit
        first = next((c.values for c in chunks if len(c.values)), None)
        dtype = first.to_numpy(zero_copy_only=False).dtype if first is not None else np.dtype("<M8[ns]")
    return kind, dtype, 1, gen()
