"""Ragged store <-> awkward: zero-copy ``ak.Array`` over the mapped buffers, bulk import.

awkward is optional: it is imported inside these functions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from npystream.errors import UnsupportedError
from npystream.interop.arrow import _flat

__all__ = ["ragged_to_awkward", "awkward_blocks"]


def _import_awkward() -> Any:
    try:
        import awkward as ak
    except ImportError:
        raise UnsupportedError(
            "awkward is not installed; pip install 'npystream[awkward]' (or awkward)"
        ) from None
    return ak


def ragged_to_awkward(r: Any) -> Any:
    """An ``ak.Array`` of the store (or view): a ``ListOffsetArray`` over the mapped offsets and
    values (no copy for contiguous views of native-endian data); strings as awkward strings;
    N-D elements whose inner dimensions agree become lists of regular sub-arrays."""
    ak = _import_awkward()
    st = r._st
    if st.kind == "object":
        raise UnsupportedError("kind='object' elements are pickles; awkward has no type for them",
                               path=st.path)
    vals, offs = _flat(r)
    if st.kind == "array" and not st.dtype.isnative:
        vals = vals.astype(st.dtype.newbyteorder("="))
    contents = ak.contents
    index = ak.index
    if st.kind in ("str", "bytes"):
        char, arr = ("char", "string") if st.kind == "str" else ("byte", "bytestring")
        content = contents.NumpyArray(vals, parameters={"__array__": char})
        layout = contents.ListOffsetArray(index.Index64(offs), content, parameters={"__array__": arr})
        return ak.Array(layout)
    if st.ndim == 0:
        return ak.Array(contents.NumpyArray(np.asarray(vals[offs[0] : offs[-1]])))
    if st.ndim == 1:
        return ak.Array(contents.ListOffsetArray(index.Index64(offs), contents.NumpyArray(vals)))
    shapes = np.asarray(r.shapes)
    inner = shapes[:1, 1:] if len(shapes) else np.ones((1, st.ndim - 1), dtype=np.int64)
    if len(shapes) and not (shapes[:, 1:] == inner).all():
        raise UnsupportedError(
            "elements differ in more than their first dimension; awkward export needs regular "
            "inner dimensions", path=st.path,
        )
    inner_shape = tuple(int(x) for x in inner[0])
    size = int(np.prod(inner_shape))
    if size == 0:
        raise UnsupportedError("elements have a zero-length inner dimension", path=st.path)
    data = vals.reshape((-1,) + inner_shape) if vals.size % size == 0 else None
    if data is None:  # pragma: no cover - guarded by the shapes check on open
        raise UnsupportedError("values do not divide into the inner shape", path=st.path)
    return ak.Array(contents.ListOffsetArray(index.Index64(offs // size), contents.NumpyArray(data)))


def awkward_blocks(obj: Any) -> tuple[str, np.dtype | None, int, Iterator[Any]]:
    """(kind, dtype, ndim, blocks) for an awkward array of lists of numbers (or strings/bytes)."""
    ak = _import_awkward()
    layout = ak.to_layout(obj)
    if isinstance(layout, ak.contents.ListArray):
        layout = layout.to_ListOffsetArray64(True)
    if isinstance(layout, ak.contents.RegularArray):
        layout = layout.to_ListOffsetArray64(True)
    if not isinstance(layout, ak.contents.ListOffsetArray):
        raise UnsupportedError(
            f"cannot write an awkward {type(layout).__name__} (type {obj.type if hasattr(obj, 'type') else '?'}); "
            "a ragged store takes a list of lists of numbers, strings or bytestrings"
        )
    param = layout.parameter("__array__")
    content = layout.content
    if isinstance(content, ak.contents.RegularArray) and isinstance(content.content,
                                                                     ak.contents.NumpyArray):
        inner = np.asarray(content.content.data)
        content = ak.contents.NumpyArray(inner[: len(content) * content.size].reshape(
            (len(content), content.size) + inner.shape[1:]))
    if not isinstance(content, ak.contents.NumpyArray):
        raise UnsupportedError(
            f"the awkward list content is a {type(content).__name__}; expected plain numbers "
            "(no options/None, records or deeper nesting)"
        )
    offs = np.asarray(layout.offsets).astype(np.int64, copy=False)
    data = np.asarray(content.data)
    if param == "string":
        kind, ndim = "str", 1
    elif param == "bytestring":
        kind, ndim = "bytes", 1
    else:
        kind, ndim = "array", data.ndim
    size = int(np.prod(data.shape[1:])) if data.ndim > 1 else 1
    flat = data.reshape(-1) if data.flags.c_contiguous else np.ascontiguousarray(data).reshape(-1)

    def gen() -> Iterator[Any]:
        step = 1 << 16
        for lo in range(0, len(offs) - 1, step):
            o = offs[lo : lo + step + 1]
            a, b = int(o[0]) * size, int(o[-1]) * size
            shapes = None
            if ndim >= 2:
                shapes = np.empty((len(o) - 1, ndim), dtype=np.int64)
                shapes[:, 0] = np.diff(o)
                shapes[:, 1:] = data.shape[1:]
            yield flat[a:b], (o - o[0]) * size, shapes

    return kind, data.dtype if kind == "array" else np.dtype("u1"), ndim, gen()
