"""Nested elements on every reader, and streams that never yield a wrong element (issue 10 items 2 and 5).

numpy (``np.load``) is the oracle.  The stream tests go through a real pipe
(``os.pipe`` and a writer thread), so the reader sees what ``cat FILE |``
gives it: short reads and no seeking.
"""

from __future__ import annotations

import gzip
import io
import pickle
import sys
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from objcases import assert_same_elements, expected_elements, npy_preamble, obj_array, through_pipe

import npystream
from npystream import FormatError
from npystream.formats import pickle_ops, pickle_stream


def _npy(arr: np.ndarray, protocol: int | None = None) -> bytes:
    if protocol is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    return npy_preamble(arr) + pickle.dumps(arr, protocol=protocol)


def _expected(data: bytes) -> list:
    return expected_elements(np.load(io.BytesIO(data), allow_pickle=True))


def _through_pipe(data: bytes, **kw):
    return through_pipe(data, **kw)


def _one(x: object) -> np.ndarray:
    return obj_array([x], shape=(1,))


def _nest(kind: str, depth: int, leaf: object) -> object:
    x = leaf
    for i in range(depth):
        if kind == "dict":
            x = {i: x}
        elif kind == "list":
            x = [x]
        elif kind == "tuple":
            x = (i, x)
        elif kind == "tuple3":
            x = (i, "k", x)
        elif kind == "odict":
            x = OrderedDict([(i, x)])
        else:
            x = [frozenset([i]), x]
    return x


# ---------------------------------------------------------------------------
# item 2: nesting is bounded by MAX_NESTING only


def _readers(data: bytes, tmp_path, **kw) -> dict[str, list]:
    path = tmp_path / "nested.npy"
    path.write_bytes(data)
    gz = tmp_path / "nested.npy.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    out = {
        "path": list(npystream.iter_objects(path, **kw)),
        "bytesio": list(npystream.iter_objects(io.BytesIO(data), **kw)),
        "gzip": list(npystream.iter_objects(gz, **kw)),
    }
    with open(path, "rb") as f:
        out["file"] = list(npystream.iter_objects(f, **kw))
    got, exc = _through_pipe(data, **kw)
    if exc is not None:
        raise exc
    out["pipe"] = got
    with npystream.open(path, **kw) as arr:
        out["open"] = [arr[i] for i in range(len(arr))]
    return out


def test_issue_reproducers_every_reader(tmp_path):
    """6 levels of dicts, 11 of single-item lists, 8 of lists around an array: np.load's values everywhere."""
    x: object = 0
    for i in range(6):
        x = {i: x}
    y: object = 0
    for _ in range(11):
        y = [y]
    z: object = np.arange(3)
    for _ in range(8):
        z = [z]
    for value in (x, y, z):
        data = _npy(_one(value))
        expected = _expected(data)
        for name, got in _readers(data, tmp_path).items():
            assert_same_element_list(got, expected, name)


def assert_same_element_list(got: list, expected: list, where: str) -> None:
    try:
        assert_same_elements(got, expected)
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from None


@pytest.mark.parametrize("kind", ["dict", "list", "tuple", "tuple3", "odict", "frozenset"])
@pytest.mark.parametrize("depth", [20, 60])
@pytest.mark.parametrize("protocol", [None, 2, 5])
def test_deep_elements_every_reader(tmp_path, kind, depth, protocol):
    """Depth 20 and 60 of every container numpy pickles without a MARK (and one with), in a batch too."""
    leaf = np.arange(5.0) if kind in ("list", "dict") else "leaf"
    items = [1, _nest(kind, depth, leaf), "s", _nest(kind, depth, 7)]
    data = _npy(obj_array(items), protocol=protocol)
    expected = _expected(data)
    allow = ["collections.OrderedDict"] if kind == "odict" else ()
    for name, got in _readers(data, tmp_path, allowed_globals=allow).items():
        assert_same_element_list(got, expected, name)


def test_nesting_limit_is_clear_and_configurable(monkeypatch):
    """Deeper than MAX_NESTING: a FormatError that names the limit and element 0; raising the limit reads it."""
    depth = pickle_ops.MAX_NESTING + 5
    value = _nest("dict", depth, 0)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # numpy's pickler recurses once per level
    try:
        alone = _npy(_one(value))  # appended alone (no batch): the element index is exact
        data = _npy(obj_array([value, 1]))
        with pytest.raises(FormatError, match="nested more than 1000 deep.*MAX_NESTING") as info:
            list(npystream.iter_objects(io.BytesIO(alone)))
        assert info.value.index == 0
        with pytest.raises(FormatError, match="nested more than 1000 deep.*MAX_NESTING") as info:
            list(npystream.iter_objects(io.BytesIO(data)))
        assert info.value.index in (0, 1)  # in a batch: never past the header's count
        monkeypatch.setattr(pickle_ops, "MAX_NESTING", 1200)
        got = list(npystream.iter_objects(io.BytesIO(data)))
        assert len(list(npystream.iter_objects(io.BytesIO(alone)))) == 1
    finally:
        sys.setrecursionlimit(old)
    assert got[1] == 1
    inner = got[0]
    for i in reversed(range(depth)):  # walk down without recursion
        assert list(inner) == [i]
        inner = inner[i]
    assert inner == 0


def test_too_many_slots_is_still_refused():
    """A pickle that pushes items without folding them (never written by numpy): refused early, clearly."""
    from hostile_pickles import envelope, integer, npy_file

    body = b"".join(integer(i) for i in range(5000))  # 5000 pending slots for a header count of 2
    data = npy_file(envelope(body, (2,)), (2,))
    with pytest.raises(FormatError, match="more elements than the header's 2"):
        list(npystream.iter_objects(io.BytesIO(data)))


# ---------------------------------------------------------------------------
# item 5: a stream never yields a wrong element


def test_issue_nested_tuples_around_big_arrays_through_a_pipe():
    """Elements keeping 4-6 objects pending over MBs of array bytes (what np.save writes): exact."""
    mid = np.arange(400_000, dtype="f8")  # 3.2 MB
    small = [np.arange(10.0)] * 3
    items: list = [*small]
    for depth in (4, 6):
        x: object = mid
        for i in range(depth):
            x = (mid + i, x)
        items.append(x)
    big = np.arange(1_500_000, dtype="f8")
    items.append(((big, 1), (2, (3, big + 1))))
    items.extend(small)
    data = _npy(obj_array(items))
    got, exc = _through_pipe(data)
    assert exc is None, exc
    assert_same_elements(got, _expected(data))


def test_files_above_the_index_threshold_are_exact_too(tmp_path):
    """A seekable file read front to back (above STREAM_ABOVE elements, forced here): the same exact elements."""
    from npystream.formats.npy import open_with_header
    from npystream.formats.pickle_walk import SafetyPolicy, iter_elements

    mid = np.arange(400_000, dtype="f8")
    x: object = mid
    for i in range(6):
        x = (mid + i, x)
    path = tmp_path / "chain.npy"
    path.write_bytes(_npy(obj_array([np.arange(3.0), x, "tail"])))
    src, header = open_with_header(path)
    with src:
        got = list(iter_elements(src, header, SafetyPolicy.make(), stream_above=0))
    assert_same_elements(got, _expected(path.read_bytes()))


_SIZES = [0, 1, 7, 300, 40_000, 330_000]  # float64 items: up to 2.6 MB per array


@hs.composite
def _arrays(draw):
    n = draw(hs.sampled_from(_SIZES))
    dtype = draw(hs.sampled_from(["<f8", "<i4", "|u1", ">f4"]))
    return np.arange(n).astype(dtype)


_leaves = hs.one_of(
    hs.integers(-(2**70), 2**70),
    hs.text(max_size=5),
    hs.binary(max_size=5),
    hs.none(),
    hs.floats(allow_nan=False),
    _arrays(),
)


def _containers(children):
    return hs.one_of(
        hs.tuples(children),
        hs.tuples(children, children),
        hs.tuples(children, children, children),
        hs.lists(children, min_size=1, max_size=4),
        hs.dictionaries(hs.integers(0, 9), children, min_size=1, max_size=3),
        hs.builds(slice, hs.integers(0, 9), hs.one_of(hs.none(), hs.integers(), hs.text(max_size=3))),
        hs.builds(lambda x: [x], children),
        hs.builds(lambda x: {"k": x}, children),
    )


_structures = hs.recursive(_leaves, _containers, max_leaves=12)


def _chain(value: object, depth: int) -> object:
    for i in range(depth):
        value = (i, value) if i % 2 else {i: value}
    return value


_big = hs.builds(lambda n, k: np.arange(n, dtype="<f8") + k, hs.sampled_from([1, 5_000, 330_000, 330_000]), hs.integers(0, 9))


@hs.composite
def _spines(draw):
    """A right-nested chain whose levels keep left siblings (big arrays too) pending: ``(a, (b, {"k": [(c, x)]}))``."""
    x = draw(hs.one_of(_big, _leaves))
    for kind in draw(hs.lists(hs.sampled_from(["tuple2", "tuple3", "dict", "list"]), max_size=9)):
        if kind == "tuple2":
            x = (draw(hs.one_of(_big, _leaves)), x)
        elif kind == "tuple3":
            x = (draw(hs.one_of(_big, _leaves)), draw(_big), x)
        elif kind == "dict":
            x = {"k": x}
        else:
            x = [x]
    return x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    items=hs.lists(hs.tuples(hs.one_of(_spines(), _spines(), _structures), hs.integers(0, 22)), min_size=1, max_size=6),
    filler=hs.sampled_from([0, 3, 995, 1200]),
    where=hs.integers(0, 1200),
    protocol=hs.sampled_from([None, 2, 4, 5]),
    spill_above=hs.sampled_from([None, 256 << 10]),
)
def test_pipe_equals_np_load_on_nested_structures(items, filler, where, protocol, spill_above):
    """Nested structures (chains up to depth 22 around arrays up to 2.6 MB), placed anywhere among
    small elements (batch bounds of 1000 included), through a real pipe: every element np.load's;
    also with the open batch spilled to a temporary file above a lowered SPILL_ABOVE."""
    elements: list = [_chain(v, d) for v, d in items]
    pos = min(where, filler)
    elements = [*range(pos), *elements, *range(filler - pos)]
    data = _npy(obj_array(elements), protocol=protocol)
    with pytest.MonkeyPatch.context() as mp:
        if spill_above is not None:
            mp.setattr(pickle_stream, "SPILL_ABOVE", spill_above)
        got, exc = _through_pipe(data)
    assert exc is None, exc
    assert_same_elements(got, _expected(data))
