"""check_dtype_state accepts every state numpy itself writes, and the checked state rebuilds the same dtype."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npystream.errors import UnsafePickleError
from npystream.formats.pickle_safety import DtypeProto, check_dtype, check_dtype_state

_DTYPES = hnp.nested_dtypes(
    subtype_strategy=hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
    max_leaves=6,
    max_itemsize=512,
)


@settings(max_examples=200, deadline=None)
@given(d=_DTYPES)
def test_numpy_states_pass_and_rebuild(d: np.dtype) -> None:
    cls, args, state = d.__reduce__()
    assert cls is np.dtype
    checked = check_dtype_state(state)
    assert checked == state
    fresh = np.dtype(*args)
    fresh.__setstate__(checked)
    assert fresh == d and fresh.flags == d.flags and fresh.itemsize == d.itemsize
    assert check_dtype(fresh) == d
    proto = DtypeProto(np.dtype(*args))  # what BUILD runs in safe mode
    proto.__setstate__(state)
    assert proto.dtype == d and proto.dtype.flags == d.flags


@pytest.mark.parametrize(
    "d",
    [
        np.dtype("f4", metadata={"k": 1}),
        np.dtype("M8[3ms]"),
        np.dtype("m8[us]", metadata={"a": 1}),
        np.dtype([("t", "M8[s]"), ("o", "O")]),
        np.dtype({"names": ["a"], "formats": ["f4"], "titles": ["T"], "offsets": [0]}),
        np.dtype([("a", "f4"), ("b", "i1")], align=True),
        np.dtype(("f4", (2, 3))),
        np.dtype([("o", "O", (2,)), ("x", ">i8")]),
    ],
    ids=str,
)
def test_special_states_pass(d: np.dtype) -> None:
    state = d.__reduce__()[2]
    assert check_dtype_state(state) == state


@pytest.mark.parametrize(
    "state",
    [
        (3, "|", None, -1, -1, 63),  # numpy 2.4 segfaulted on this one
        (1, "<", None, 5, 8, 8),
        (3, "<", None, ("a",), {"a": (5, 0)}, 8, 1, 16),
        (3, "<", None, ("a", "b"), {"a": (np.dtype("f8"), 0)}, 8, 1, 16),
        (3, "|", (5, (2,)), None, None, 16, 8, 0),
        (3, "|", (np.dtype("f8"), (-1,)), None, None, 16, 8, 0),
        (4, "<", None, None, None, -1, -1, 0, (None, 5)),
        (3, "<", None, None, None, -1, -1, 2**40),
        (3, "<", None, None, {}, -1, -1, 0),
        (3, b"x", None, None, None, -1, -1, 0),
        ("3", "<", None, None, None, -1, -1, 0),
        (3, "<"),
        [3, "<", None, None, None, -1, -1, 0],
    ],
    ids=repr,
)
def test_forged_states_refused(state: object) -> None:
    with pytest.raises(UnsafePickleError, match="refused before numpy sees it"):
        check_dtype_state(state)


def _no_placeholders(x: object, depth: int = 0) -> None:
    """No safe-mode placeholder anywhere inside ``x`` (dict keys, sets and other classes' attributes included)."""
    from npystream.formats.pickle_safety import ArrayProto

    assert type(x) not in (DtypeProto, ArrayProto), f"a placeholder was handed out: {x!r}"
    assert depth < 50
    if isinstance(x, dict):
        for k, v in x.items():
            _no_placeholders(k, depth + 1)
            _no_placeholders(v, depth + 1)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for v in x:
            _no_placeholders(v, depth + 1)
    elif isinstance(x, np.ndarray) and x.dtype.hasobject:
        for v in x.ravel().tolist():
            _no_placeholders(v, depth + 1)
    elif hasattr(x, "__dict__"):
        _no_placeholders(vars(x), depth + 1)


def _save(path, items) -> list:
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(path, arr, allow_pickle=True)
    return list(np.load(path, allow_pickle=True))


@pytest.mark.parametrize("trusted", [False, True])
def test_dtypes_as_dict_keys_and_set_members_match_np_load(tmp_path, trusted):
    """Dtypes where the finaliser used to look only at values: dict keys (plain and inside tuples), sets, frozensets."""
    from objcases import assert_same_elements

    import npystream

    path = tmp_path / "k.npy"
    want = _save(path, [
        {np.dtype("f4"): 1, "k": np.dtype(">i2"), (np.dtype("i1"), 2): "tuple key"},
        [np.dtype("M8[s]"), (np.dtype("U3"),), {np.dtype("f2"), np.dtype("c8")}],
        {frozenset([np.dtype("f8")]): [np.arange(3)]},
        frozenset({np.dtype([("a", "<i4"), ("b", "O")])}),
    ])
    got = list(npystream.iter_objects(path, trusted=trusted))
    assert_same_elements(got, want)
    _no_placeholders(got)
    with npystream.open(path, trusted=trusted, nsidx=False) as arr:
        again = [arr[i] for i in range(len(arr))]
    assert_same_elements(again, want)
    _no_placeholders(again)


def test_allowed_global_objects_get_real_arrays_and_dtypes(tmp_path):
    """Safe mode with allowed_globals: an allowed class's instance holding arrays and dtypes gets the real ones
    (the program runs again with real objects once every array state and dtype was checked), as np.load gives."""
    import collections

    from objcases import assert_same_elements

    import npystream

    path = tmp_path / "o.npy"
    want = _save(path, [
        collections.OrderedDict(x=np.arange(3), d=np.dtype("f4"), s=[np.zeros(2)]),
        "plain",
        collections.OrderedDict(y=np.ones((2, 2), order="F"), again=np.dtype(">u2")),
    ])
    opts = {"allowed_globals": ["collections.OrderedDict"]}
    got = list(npystream.iter_objects(path, **opts))
    assert_same_elements(got, want)
    _no_placeholders(got)
    for zero_copy in (True, False):
        with npystream.open(path, zero_copy=zero_copy, nsidx=False, **opts) as arr:
            again = [arr[i] for i in range(len(arr))]
        assert_same_elements(again, want)
        _no_placeholders(again)


def test_checked_globals_kept_as_values_are_the_real_ones(tmp_path):
    """Classes safe mode wraps (np.ndarray, bytearray, bytes, np.dtype) stored as values, nested or not."""
    from objcases import assert_same_elements

    import npystream

    path = tmp_path / "c.npy"
    want = _save(path, [[np.ndarray, bytearray], {"t": (bytes, np.dtype)}, np.ndarray, {np.dtype}])
    got = list(npystream.iter_objects(path))
    assert_same_elements(got, want)
    assert got[0][0] is np.ndarray and got[0][1] is bytearray and got[1]["t"] == (bytes, np.dtype)
    with npystream.open(path, nsidx=False) as arr:
        assert_same_elements([arr[i] for i in range(len(arr))], want)


def test_has_special_c_check():
    """The C pre-check that lets finalize skip walking plain containers: exact answers, conservative when unsure."""
    from npystream.formats import pickle_safety as ps

    if ps._has_special is None:
        pytest.skip("C accelerator not active")
    types = ps._SPECIAL_TYPES
    proto = DtypeProto(np.dtype("f4"))
    assert not ps._has_special({"a": [1, 2.5, "x", b"y", None, True], "b": (1, (2,))}, types)
    assert ps._has_special({"a": [1, (2, proto)]}, types)
    assert ps._has_special({(1, proto): 0}, types)  # dict keys are looked at
    assert ps._has_special([ps.ArrayProto()], types)
    assert ps._has_special({1, 2}, types)  # sets: left to the Python walk
    deep: list = []
    for _ in range(150):
        deep = [deep]
    assert ps._has_special(deep, types)  # deeper than 100: left to the Python walk
    shared = [1] * 10
    assert not ps._has_special([shared] * 5000, types)
    assert ps._has_special([shared] * 200_000, types)  # over 100,000 containers: left to the Python walk




def _leaf_strategy():
    return st.one_of(
        st.integers(-(2**70), 2**70),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.none(),
        st.sampled_from([np.dtype("f4"), np.dtype(">i2"), np.dtype("M8[ms]"), np.dtype([("a", "<u1"), ("b", "O")]),
                         np.ndarray, bytearray, bytes, np.dtype]),
        hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(max_dims=2, max_side=3)),
    )


def _tree_strategy():
    hashable = st.one_of(st.integers(), st.text(max_size=3),
                         st.sampled_from([np.dtype("f8"), np.dtype("<U2"), bytes, np.ndarray]))
    return st.recursive(
        _leaf_strategy(),
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.tuples(kids, kids),
            st.dictionaries(st.one_of(hashable, st.tuples(hashable, hashable)), kids, max_size=3),
            st.frozensets(hashable, max_size=3),
            st.sets(hashable, max_size=3),
        ),
        max_leaves=10,
    )


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_nested_values_match_np_load_and_hold_no_placeholder(tmp_path_factory, data):
    """Random trees of containers (dict keys, sets, tuples) holding arrays, dtypes and classes safe mode wraps,
    pickled with protocols 2-5, 0-d or 1-d: iteration, random access and a short-read pipe equal np.load's
    elements, and no placeholder or wrapper is handed out."""
    import io
    import pickle
    import warnings

    from objcases import assert_same_elements
    from short_reads import ShortReads

    import npystream

    items = data.draw(st.lists(_tree_strategy(), min_size=1, max_size=4))
    proto = data.draw(st.sampled_from([None, 2, 3, 5]))
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    if len(items) == 1 and data.draw(st.booleans()):
        arr = arr.reshape(())
    path = tmp_path_factory.mktemp("tree") / "t.npy"
    with warnings.catch_warnings(), open(path, "wb") as f:
        warnings.simplefilter("ignore")
        if proto is None:  # what np.save writes (protocol 4)
            np.save(f, arr, allow_pickle=True)
        else:  # what other numpy versions and writers produce
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
            pickle.dump(arr, f, protocol=proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = list(np.load(path, allow_pickle=True).flat)
    got = list(npystream.iter_objects(path))
    assert_same_elements(got, want)
    _no_placeholders(got)
    with npystream.open(path, nsidx=False) as a:
        again = [a[i] for i in range(len(a))] if a.shape else [a[()]]
    assert_same_elements(again, want)
    _no_placeholders(again)
    streamed = list(npystream.iter_objects(io.BufferedReader(ShortReads(path.read_bytes(), step=997))))
    assert_same_elements(streamed, want)
    _no_placeholders(streamed)
