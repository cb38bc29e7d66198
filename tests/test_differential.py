"""Differential test: random object arrays of every element kind numpy writes, read by npystream == ``np.load``.

Hypothesis builds object arrays whose elements are numpy scalars of every
dtype, arrays of every dtype (byte orders, metadata, structured, datetime,
0-d, empty, non-contiguous, Fortran), Python scalars, str/bytes/bytearray,
slices and ranges, dtypes, nested lists/tuples/dicts/sets/frozensets and
object arrays, shared references; outer arrays 0-d, 1-D or N-D in C or
Fortran order; dates, Decimals and OrderedDicts too.  Each is saved with
``np.save`` or by hand with pickle protocols 2-5 and read back in safe mode
(everything generated is on the safe allow-list or named in
``allowed_globals``) and with ``trusted=True``, through a path, ``open()``
(elements and slices; zero-copy on and off), a real pipe, gzip and bytes.
Every element must equal ``np.load(path, allow_pickle=True).flat[i]``
exactly (:func:`objcases.assert_same_element`: type, value, dtype with byte
order, scalar type and metadata, shape, memory order, aliasing).

The pure-Python backend runs the same test under ``NPYSTREAM_PURE_PYTHON=1``
(``tests/run.sh`` runs the suite on both).  Example counts come from the
hypothesis profile (``ci`` by default; ``--hypothesis-profile=dev`` for a
long run).  Containers mix freely up to ``MAX_DEPTH`` levels; ``DEEP_SPINES``
adds chains of one-child containers up to ``MAX_SPINE`` (20) levels deep
around any element, the shapes whose bounds streams cannot see early.
"""

from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from objcases import assert_same_element, npy_preamble, obj_array

import npystream

MAX_DEPTH = 3  # container levels around a leaf (see the module docstring)
# classes np.save users store that safe mode reads once named (everything else generated is on the allow-list)
ALLOWED = ["collections.OrderedDict", "datetime.date", "datetime.timedelta", "decimal.Decimal"]

# ---------------------------------------------------------------------------
# dtypes and arrays

_E = "?"  # any byte order
_PLAIN = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness=_E),
    hnp.unsigned_integer_dtypes(endianness=_E),
    hnp.floating_dtypes(endianness=_E, sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness=_E),
    hnp.datetime64_dtypes(endianness=_E),
    hnp.timedelta64_dtypes(endianness=_E),
    hnp.byte_string_dtypes(endianness=_E, max_len=4),
    hnp.unicode_string_dtypes(endianness=_E, max_len=4),
    st.sampled_from([np.dtype(np.longdouble), np.dtype(np.clongdouble), np.dtype(">M8[ns]")]),
)
_META = st.dictionaries(st.text(max_size=3), st.one_of(st.integers(-5, 5), st.text(max_size=3)), min_size=1, max_size=2)
_STRUCTURED = hnp.array_dtypes(subtype_strategy=_PLAIN, min_size=1, max_size=3, allow_subarrays=True)
DTYPES = st.one_of(
    _PLAIN,
    _STRUCTURED,
    st.builds(lambda d, m: np.dtype(d, metadata=m), _PLAIN, _META),
    st.builds(lambda d: np.dtype(d, align=True), _STRUCTURED),
    st.builds(lambda d: np.dtype((np.record, d)), _STRUCTURED),
)


def _layout(arr: np.ndarray, how: str) -> np.ndarray:
    if how == "F":
        return np.asfortranarray(arr)
    if how == "strided" and arr.ndim:
        return arr[..., ::2]
    return arr


ARRAYS = st.builds(
    _layout,
    DTYPES.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))),
    st.sampled_from(["C", "F", "strided"]),
)
NUMPY_SCALARS = DTYPES.flatmap(lambda d: hnp.arrays(d, ())).map(lambda a: a[()])

# ---------------------------------------------------------------------------
# Python leaves and containers

_SMALL = st.one_of(st.none(), st.integers(-10, 10))
_HASHABLE_DTYPES = st.one_of(  # set members and dict keys must equal themselves: no NaN, no NaT
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness=_E),
    hnp.unsigned_integer_dtypes(endianness=_E),
    hnp.byte_string_dtypes(endianness=_E, max_len=4),
    hnp.unicode_string_dtypes(endianness=_E, max_len=4),
)
HASHABLE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False),
    st.complex_numbers(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.builds(range, st.integers(-5, 5), st.integers(-5, 5), st.sampled_from([1, 2, -1])),
    hnp.arrays(_HASHABLE_DTYPES, ()).map(lambda a: a[()]),  # numpy scalars without NaN or NaT
    _PLAIN,
)
LEAVES = st.one_of(
    HASHABLE,
    st.floats(),  # NaN, inf, -0.0
    st.binary(max_size=6).map(bytearray),
    st.builds(slice, _SMALL, _SMALL, _SMALL),
    NUMPY_SCALARS,
    ARRAYS,
    st.dates(),
    st.timedeltas(),
    st.decimals(allow_nan=False, places=3),
    st.binary(min_size=1, max_size=4).map(np.void),  # raw void scalars and arrays (no field names)
    st.binary(max_size=8).map(lambda b: np.frombuffer(b[: len(b) // 2 * 2], "V2").copy()),
    DTYPES,
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(HASHABLE, children, max_size=3),
        st.dictionaries(HASHABLE, children, max_size=3).map(collections.OrderedDict),  # a class's SETITEMS
        st.sets(HASHABLE, max_size=3),
        st.frozensets(HASHABLE, max_size=3),
        st.lists(children, min_size=1, max_size=4).map(obj_array),  # a nested object ndarray
        children.map(lambda x: [x, x]),  # one object twice: a memo back-reference
        st.builds(lambda x, y: {"a": x, "b": (x, y)}, children, children),
        # slices holding arrays and dtypes (safe mode must hand over the real objects)
        st.builds(slice, children, children),
    )


def _values(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return LEAVES
    return st.one_of(LEAVES, _containers(_values(depth - 1)))


MAX_SPINE = 20  # levels of one-child containers around an element (issue: "nested ... to depth 20")
_WRAPS = (
    lambda x: [x],
    lambda x: (x,),
    lambda x: {0: x},
    lambda x: (1, x),
    lambda x: [x, None, x],
    lambda x: collections.OrderedDict(k=x),
    lambda x: obj_array([x]),
)


@st.composite
def _deep_spine(draw: Any) -> Any:
    """A leaf or small container wrapped in 5-20 levels of randomly chosen one-child containers."""
    x = draw(_values(1))
    for _ in range(draw(st.integers(5, MAX_SPINE))):
        x = draw(st.sampled_from(_WRAPS))(x)
    return x


DEEP_SPINES = _deep_spine()
ELEMENTS = st.one_of(_values(MAX_DEPTH), DEEP_SPINES)


@st.composite
def object_arrays(draw: Any) -> np.ndarray:
    """An object array of 1-7 elements (or a 0-d one), reshaped N-D in C or Fortran order."""
    items = draw(st.lists(ELEMENTS, min_size=1, max_size=6))
    if draw(st.booleans()):  # one object in two elements: a memo back-reference across elements
        items.append(items[0])
    n = len(items)
    shape = draw(st.sampled_from([(n,), (1, n), (n, 1), *([(2, n // 2)] if n % 2 == 0 else []), *([()] if n == 1 else [])]))
    return obj_array(items, shape=shape, order=draw(st.sampled_from(["C", "F"])))


# ---------------------------------------------------------------------------
# writing and reading


def _file_bytes(arr: np.ndarray, protocol: int | None) -> bytes:
    """The .npy numpy writes (np.save), or its header followed by pickle.dumps(arr, protocol)."""
    if protocol is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    return npy_preamble(arr) + pickle.dumps(arr, protocol=protocol)


def _through_pipe(data: bytes, policy: dict[str, Any]) -> list[Any]:
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as out:
            try:
                out.write(data)
            except BrokenPipeError:  # the reader stopped early: its error is what the test reports
                pass

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        with os.fdopen(r, "rb") as f:
            return list(npystream.iter_objects(f, **policy))
    finally:
        writer.join()


def _readers(path: Path, data: bytes, trusted: bool, count: int, one_d: bool) -> dict[str, Any]:
    """name -> a function returning the elements in C order."""
    policy: dict[str, Any] = {"trusted": True} if trusted else {"allowed_globals": ALLOWED}
    out: dict[str, Any] = {
        "path": lambda: list(npystream.iter_objects(path, **policy)),
        "bytes": lambda: list(npystream.iter_objects(data, **policy)),
        "pipe": lambda: _through_pipe(data, policy),
        "gzip": lambda: list(npystream.iter_objects(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))), **policy)),
    }
    if one_d:
        for zero_copy in (False, True):

            def elements(zero_copy: bool = zero_copy) -> list[Any]:
                with npystream.open(path, zero_copy=zero_copy, **policy) as arr:
                    got = [arr[i] for i in range(count)]
                    if count > 1:  # a slice yields the same elements
                        for a, b in zip(list(arr[1:]), got[1:]):
                            assert_same_element(a, b)
                    return got

            out[f"open(zero_copy={zero_copy})"] = elements
    return out


def _expected(path: Path) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(np.load(path, allow_pickle=True).flat)


@given(arr=object_arrays(), protocol=st.sampled_from([None, 2, 3, 4, 5]))
def test_every_reader_matches_np_load(tmp_path_factory: pytest.TempPathFactory, arr: np.ndarray, protocol: int | None) -> None:
    data = _file_bytes(arr, protocol)
    path = tmp_path_factory.mktemp("diff") / "x.npy"
    path.write_bytes(data)
    want = _expected(path)
    for trusted in (False, True):
        for name, read in _readers(path, data, trusted, len(want), arr.ndim == 1).items():
            try:
                got = read()
            except Exception as exc:
                raise AssertionError(f"{name}, trusted={trusted}, protocol={protocol}: {type(exc).__name__}: {exc}") from None
            assert len(got) == len(want), (name, trusted, protocol)
            for i, (g, w) in enumerate(zip(got, want)):
                try:
                    assert_same_element(g, w)
                except AssertionError as exc:
                    raise AssertionError(f"{name}, trusted={trusted}, protocol={protocol}, element {i}: {exc}") from None
